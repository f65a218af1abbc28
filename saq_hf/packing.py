"""Dense bit packing of integer weight codes: ``bits`` bits per code, no padding between codes.

Layout (the same for every bit-width 2..8): each code is stored offset-binary, ``u = code - qmin`` in
``0 .. 2**bits - 1``; the ``u`` are written in order into one little-endian bit stream, least significant
bit first, and the stream is zero-padded to a whole byte. So 8-bit codes are one per byte, 4-bit codes two
per byte (first code in the low nibble), 2-bit codes four per byte (first code in bits 0-1), and 3-bit codes
eight per three bytes (a code may straddle a byte boundary). ``n`` codes take ``ceil(n * bits / 8)`` bytes.
"""

import torch

_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)


def packed_size(count: int, bits: int) -> int:
    """Bytes that :func:`pack_codes` writes for ``count`` codes of ``bits`` bits."""
    return (count * bits + 7) // 8


def pack_codes(codes: torch.Tensor, bits: int, qmin: int) -> torch.Tensor:
    """Flatten ``codes`` (integers in ``qmin .. qmin + 2**bits - 1``) and pack them into a uint8 tensor."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    unsigned = codes.reshape(-1).to(torch.int32) - qmin
    if unsigned.numel() and (int(unsigned.min()) < 0 or int(unsigned.max()) >= 2**bits):
        raise ValueError(
            f"codes must lie in {qmin}..{qmin + 2**bits - 1} for {bits}-bit packing, "
            f"got {int(codes.min())}..{int(codes.max())}"
        )
    unsigned = unsigned.to(torch.uint8).cpu()
    if bits == 8:
        return unsigned
    stream = ((unsigned.unsqueeze(1) >> _BIT_SHIFTS[:bits]) & 1).reshape(-1)
    stream = torch.cat([stream, stream.new_zeros(-stream.numel() % 8)])
    return (stream.reshape(-1, 8) << _BIT_SHIFTS).sum(dim=1, dtype=torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, count: int, qmin: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``count`` codes as a flat int32 tensor."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != packed_size(count, bits):
        raise ValueError(
            f"packed codes must be a 1-D uint8 tensor of {packed_size(count, bits)} bytes for {count} "
            f"{bits}-bit codes, got {packed.dtype} of shape {tuple(packed.shape)}"
        )
    if bits == 8:
        return packed.to(torch.int32) + qmin
    stream = ((packed.unsqueeze(1) >> _BIT_SHIFTS) & 1).reshape(-1)[: count * bits]
    unsigned = (stream.reshape(count, bits).to(torch.int32) << _BIT_SHIFTS[:bits].to(torch.int32)).sum(dim=1)
    return unsigned.to(torch.int32) + qmin
