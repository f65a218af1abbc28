"""The LSQ op's CPU kernels in C++ (``csrc/lsq_cpu.cpp``): one pass and one call per direction, built on first use.

A quantized model's eager CPU step calls the LSQ op about twice per layer; a compiled Inductor kernel costs tens of
microseconds per call there (dynamo's frame and guards, the wrapper), more than the arithmetic on a typical
activation. These kernels are built once per machine and torch release by ``torch.utils.cpp_extension`` (C++
compiler and ninja; cached under ``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``) with the
vector instructions torch itself uses here, and called like any torch function.

``kernels()`` is the loaded module, or ``None`` where it cannot be: set ``SAQ_HF_NATIVE_KERNELS=0`` to turn them off;
a failed build warns once and the op runs as before (compiled kernels or plain torch ops, the same bits).
"""

import hashlib
import logging
import os
import warnings
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "csrc" / "lsq_cpu.cpp"
_state: dict = {}

# torch.backends.cpu.get_cpu_capability() -> what ATen's vector types need to use those instructions.
_ISA_FLAGS = {
    "AVX512": ["-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma"],
    "AVX2": ["-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
}


def enabled() -> bool:
    return os.environ.get("SAQ_HF_NATIVE_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def _build():
    from torch.utils import cpp_extension

    capability = torch.backends.cpu.get_cpu_capability()
    flags = ["-O3", "-ffp-contract=off", *_ISA_FLAGS.get(capability, [])]
    # One build per source, flags and torch release, so an upgrade never loads a module built against another torch.
    tag = hashlib.sha256(f"{SOURCE.read_bytes()!r}{flags}{torch.__version__}".encode()).hexdigest()[:12]
    logger.info("saq_hf: loading the LSQ op's C++ CPU kernels (built on first use, about 20 s, then cached)")
    return cpp_extension.load(name=f"saq_hf_lsq_cpu_{tag}", sources=[str(SOURCE)], extra_cflags=flags,
                              verbose=False)


def kernels():
    """The built module (``op_forward``/``op_backward``: the whole op for one tensor; ``op_forward_many``/
    ``op_backward_many``: for a list; ``forward``/``backward``: the elementwise passes alone), or ``None``."""
    if "module" in _state:
        return _state["module"]
    if not enabled():
        return None  # not cached: the variable may be set back
    try:
        module = _build()
    except Exception as error:  # noqa: BLE001 - no compiler, no ninja, a failed build: the op has other paths
        warnings.warn(f"saq_hf: the C++ LSQ kernels could not be built, using torch ops on the CPU "
                      f"({type(error).__name__}: {str(error)[:300]})", stacklevel=3)
        module = None
    _state["module"] = module
    return module
