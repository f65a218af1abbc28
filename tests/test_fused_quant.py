"""The fused LSQ op gives bit for bit the outputs and gradients of the unfused autograd function it replaced: here its
compiled (Inductor) kernels and its plain-ops path, with the C++ CPU kernels off (those: tests/test_native_quant.py).

CPU always; on a machine with CUDA (``benchmarks/gpu_check.sh``) the same checks run on the GPU, with fp16 too.
"""

import pytest
import torch

from saq_hf.quant import lsq, native
from saq_hf.quant.lsq import lsq_fake_quantize, quant_range


class UnfusedLSQ(torch.autograd.Function):
    """The reference: saq-hf's LSQ op before fusion (commit 3ac8034), verbatim."""

    @staticmethod
    def forward(ctx, x, step_size, qn, qp, grad_scale):
        ctx.save_for_backward(x, step_size)
        ctx.qn, ctx.qp, ctx.grad_scale = qn, qp, grad_scale
        return (x / step_size).clamp_(qn, qp).round_().mul_(step_size)

    @staticmethod
    def backward(ctx, grad_output):
        x, step_size = ctx.saved_tensors
        scaled = x / step_size
        clipped = torch.clamp(scaled, ctx.qn, ctx.qp)
        inside = clipped == scaled
        grad_x = grad_output * inside
        grad_s = clipped.round_().sub_(scaled.mul_(inside)).mul_(grad_output)
        if step_size.dim() == 0:
            grad_s = grad_s.sum()
        else:
            dims = [d for d in range(grad_s.dim()) if step_size.shape[d] == 1]
            grad_s = grad_s.sum(dim=dims, keepdim=True)
        return grad_x, (grad_s * ctx.grad_scale).to(step_size.dtype), None, None, None


# (x shape, step-size shape): activations per tensor (ViT tokens, conv maps, classifier input), weights per
# channel (Linear, Conv2d) and per tensor.
LAYOUTS = [((6, 17, 48), ()), ((4, 8, 5, 5), ()), ((8, 40), ()), ((24, 40), (24, 1)), ((16, 8, 3, 3), (16, 1, 1, 1)),
           ((16, 8, 3, 3), ())]


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CASES = [(device, dtype) for device in DEVICES for dtype in (torch.float32, torch.bfloat16, torch.float16)
         if device == "cuda" or dtype != torch.float16]


def inputs(shape, step_shape, dtype, seed, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    step = (torch.rand(step_shape, generator=generator) * 0.2 + 0.01).to(dtype)
    x = (torch.randn(shape, generator=generator) * 0.3).to(dtype)
    # Exact ties (k + 0.5)·s and exact clip points, where round-half-even and the STE mask are decided.
    ties = (torch.randint(-10, 10, shape, generator=generator) + 0.5).to(dtype) * step
    x = torch.where(torch.rand(shape, generator=generator) < 0.2, ties, x)
    grad = torch.randn(shape, generator=generator).to(dtype)
    return x.to(device), step.to(device), grad.to(device)


def outputs_and_grads(function, x, step, grad, qn, qp, grad_scale):
    x, step = x.clone().requires_grad_(), step.clone().requires_grad_()
    out = function(x, step, qn, qp, grad_scale)
    out.backward(grad)
    return out.detach(), x.grad, step.grad


def same_bits(a, b):
    """Equal as bit patterns (so -0.0 differs from 0.0), not only as values."""
    as_int = {2: torch.int16, 4: torch.int32}[a.element_size()]
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(as_int), b.reshape(-1).view(as_int)))


@pytest.fixture
def no_native(monkeypatch):
    """The op's other paths: the C++ CPU kernels off, as where they cannot be built."""
    monkeypatch.setattr(native, "kernels", lambda: None)


@pytest.fixture
def always_fused(monkeypatch, no_native):
    """Small test tensors go through the compiled kernels too (by default they are left to plain ops)."""
    monkeypatch.setattr(lsq, "_FUSED_MIN_NUMEL", dict.fromkeys(lsq._FUSED_MIN_NUMEL, 0))


@pytest.mark.parametrize("device,dtype", CASES, ids=[f"{d}-{str(t)[6:]}" for d, t in CASES])
def test_fused_op_is_bit_identical_to_the_unfused_reference_at_every_bit_width(device, dtype, always_fused):
    checked = 0
    for bits in range(2, 9):
        for signed in (True, False):
            qn, qp = quant_range(bits, signed)
            for seed, (shape, step_shape) in enumerate(LAYOUTS):
                x, step, grad = inputs(shape, step_shape, dtype, seed + 100 * bits, device)
                grad_scale = 1.0 / (x.numel() * qp) ** 0.5
                expected = outputs_and_grads(UnfusedLSQ.apply, x, step, grad, qn, qp, grad_scale)
                fused = outputs_and_grads(lsq_fake_quantize, x, step, grad, qn, qp, grad_scale)
                for name, a, b in zip(("output", "grad x", "grad step"), fused, expected):
                    assert same_bits(a, b), (name, bits, signed, shape, step_shape, (a != b).sum().item())
                checked += 1
    assert checked == 7 * 2 * len(LAYOUTS)
    # The comparison was against the compiled kernels, not the plain-ops fallback (which is what bf16/fp16 on a
    # CPU run before torch 2.13, whose Inductor computes them in fp32 there).
    assert not lsq._compiler_failed
    kernels = {key[0]: kernel for key, kernel in lsq._compiled_kernels.items() if key[1:3] == (dtype, device)}
    assert {"_fake_quantize", "_fake_quantize_grads"} <= kernels.keys()
    fuses = device == "cuda" or dtype == torch.float32 or lsq._CPU_REDUCED_PRECISION_FUSES
    assert all((kernel is not None) == fuses for kernel in kernels.values())


def assert_double_backward_matches_the_reference():
    """x's gradient with ``create_graph`` and the gradient of that, through the op and through the reference."""
    x, step, _ = inputs((4, 32), (), torch.float32, 0)
    results = []
    for function in (UnfusedLSQ.apply, lsq_fake_quantize):
        xs = x.clone().requires_grad_()
        out = function(xs * xs, step, -8, 7, 0.1)
        (g,) = torch.autograd.grad(out.sum(), xs, create_graph=True)
        (gg,) = torch.autograd.grad(g.sum(), xs)
        results.append((g.detach(), gg))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_double_backward_runs_through_plain_ops_and_matches_the_reference(always_fused):
    assert_double_backward_matches_the_reference()


@pytest.mark.parametrize("device,dtype", CASES, ids=[f"{d}-{str(t)[6:]}" for d, t in CASES])
@pytest.mark.parametrize("path", ["fused", "plain"])
def test_without_the_step_size_gradient_x_gets_the_same_bits_and_the_step_size_zero(device, dtype, path, monkeypatch,
                                                                                    no_native):
    # step_grad=False (SAQ's descent pass, whose step-size gradient is replaced anyway) skips the step size's
    # per-element terms; the output and x's gradient are those of the full op, bit for bit. (Compiled, the same:
    # tests/test_compile.py.)
    monkeypatch.setattr(lsq, "_FUSED_MIN_NUMEL", dict.fromkeys(lsq._FUSED_MIN_NUMEL, 0 if path == "fused" else 2**62))
    calls = []
    run = lsq._run
    monkeypatch.setattr(lsq, "_run", lambda fn, *args: calls.append(fn.__name__) or run(fn, *args))
    for bits in (2, 4, 8):
        for signed in (True, False):
            qn, qp = quant_range(bits, signed)
            for seed, (shape, step_shape) in enumerate(LAYOUTS):
                x, step, grad = inputs(shape, step_shape, dtype, seed + 100 * bits, device)
                full = outputs_and_grads(lsq_fake_quantize, x, step, grad, qn, qp, 0.1)
                calls.clear()
                skipped = outputs_and_grads(lambda *a: lsq_fake_quantize(*a, step_grad=False), x, step, grad, qn,
                                            qp, 0.1)
                assert calls == ["_fake_quantize", "_fake_quantize_grad_x"]
                assert same_bits(skipped[0], full[0]) and same_bits(skipped[1], full[1]), (bits, signed, shape)
                assert skipped[2].shape == step.shape and skipped[2].dtype == step.dtype
                assert not skipped[2].any() and full[2].any()
    if path == "fused":
        assert not lsq._compiler_failed
        assert ("_fake_quantize_grad_x", dtype, device) in {key[:3] for key in lsq._compiled_kernels}
