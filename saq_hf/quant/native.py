"""The LSQ op's CPU kernels in C++ (``csrc/lsq_cpu.cpp``): one pass and one call per direction, built on first use.

A quantized model's eager CPU step calls the LSQ op about twice per layer; a compiled Inductor kernel costs tens of
microseconds per call there (dynamo's frame and guards, the wrapper), more than the arithmetic on a typical
activation. These kernels are built once per machine and torch release by ``torch.utils.cpp_extension`` (C++
compiler and ninja) with the vector instructions torch itself uses here, and called like any torch function.

The built module is kept in ``$TORCH_EXTENSIONS_DIR/saq_hf`` (by default ``~/.cache/torch_extensions/saq_hf``), one
file per source, compiler flags and torch release. Each build runs in its own temporary folder and its result is
moved into place in one rename, so processes building at once (data-parallel workers) never wait on each other's
lock, and a build that was killed leaves nothing that blocks the next one.

``kernels()`` is the loaded module, or ``None`` where it cannot be: set ``SAQ_HF_NATIVE_KERNELS=0`` to turn them off;
a failed build warns once and the op runs as before (compiled kernels or plain torch ops, the same bits).
"""

import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import shutil
import tempfile
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


def cache_dir() -> Path:
    from torch.utils import cpp_extension

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()) / "saq_hf"


def _flags() -> list[str]:
    # -ffp-contract=off: no fused multiply-add where the torch ops round twice.
    return ["-O3", "-ffp-contract=off", *_ISA_FLAGS.get(torch.backends.cpu.get_cpu_capability(), [])]


def module_name() -> str:
    """One name per source, flags and torch release, so an upgrade never loads a module built against another."""
    tag = hashlib.sha256(f"{SOURCE.read_bytes()!r}{_flags()}{torch.__version__}".encode()).hexdigest()[:12]
    return f"saq_hf_lsq_cpu_{tag}"


def _compile(name: str, build_dir: str):
    """Build the extension in ``build_dir`` and load it."""
    from torch.utils import cpp_extension

    return cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=_flags(), build_directory=build_dir,
                              verbose=False, is_python_module=True)


def _import(name: str, path: Path):
    spec = importlib.util.spec_from_loader(name, importlib.machinery.ExtensionFileLoader(name, str(path)))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build():
    name = module_name()
    cache = cache_dir()
    target = cache / f"{name}.so"
    if target.is_file():
        return _import(name, target)
    logger.info("saq_hf: building the LSQ op's C++ CPU kernels (about 20 s, once per machine and torch release)")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=f".{name}-") as build_dir:
        module = _compile(name, build_dir)
        # A second build of one name in one process comes out renamed (name_v1), and would not import under the
        # cached name: only a module of this name is cached.
        if module.__name__ == name:
            staged = cache / f".{name}-{os.getpid()}.so"
            shutil.copyfile(module.__file__, staged)
            os.replace(staged, target)  # whole or not at all, whoever builds at the same time
    return module


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
