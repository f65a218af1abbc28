"""Step time and peak memory of FP, QAT and the SAQ strategies, eager and compiled, next to peer fake-quant
implementations: one process, the same batch every step.

    python benchmarks/speed.py            # full run (CPU: about 15 minutes on 2 busy cores)
    python benchmarks/speed.py --quick    # 8 timed steps, half batches, no compiled modes: a smoke run

One step of a mode is the body of the Trainer's loop: ``SAQTrainer.training_step`` (one or two
forward/backward passes), gradient clipping, the AdamW step, the scheduler step and ``zero_grad``, on the
same batch every time. The modes of a config live side by side and are stepped in turn (rotating the
order each round), so load from other processes on a shared machine hits them alike; the device is
synchronised around each step. ``time`` is the median over the timed steps after warm-up; for ``every_k``
and ``looksam`` it is the amortised ``(median full step + (k-1) · median step in between) / k``.

Modes: ``fp``, ``qat`` (W4A4 LSQ), ``saq``, ``every_k``, ``looksam``, ``reuse_grad``; ``*_compiled``: the same with
``SAQTrainingArguments(torch_compile=True)`` (Inductor; compiled during warm-up; ``looksam_compiled`` only when named
in ``--modes``); ``*_cudagraphs`` (``fp``, ``qat``, ``saq``, ``looksam``; only when named): compiled with
``torch_compile_mode="reduce-overhead"``, Inductor's CUDA graphs (on a CPU the same as compiled); peers, on the same model,
batch and training step: ``torchao_qat`` (torchao's ``QATConfig`` prepare, int8 per-token asymmetric
activations and int4 weights in groups of 32; torchao only fake-quantizes ``nn.Linear``, so ConvNeXt's
convolutions stay in float there) and ``torch_lsq`` (our quantizers with PyTorch's learnable fake-quant ops,
``torch._fake_quantize_learnable_per_{tensor,channel}_affine``, in place of our fused op). A peer that
cannot run (torchao not installed) is skipped with the reason printed. ``qat_kd`` and ``saq_kd`` (only when named):
``qat`` and ``saq`` distilled from an FP teacher of the same architecture (``SAQTrainer(teacher_model=...)``).

Peak memory counts tensors only, the same way on both devices: bytes live when a step starts (parameters,
buffers, gradients, optimizer state of that mode's model) + the highest running total of what the step
allocates and frees. On CUDA the step's part is ``max_memory_allocated - memory_allocated`` around it; on
CPU, which has no allocator counter, it is read from ``torch.profiler(profile_memory=True)`` events. The
measured step is a perturbed one in every mode.

The device is whatever Accelerate picks (CUDA when present). Sizes per device are in ``CONFIGS``: on CPU
the ViT-B/16-width model keeps ViT-B's width (hidden 768, 12 heads, MLP 3072) with 2 layers, 64x64 images
(17 tokens) and batch 32; on CUDA it is the full ViT-B/16 (12 layers, 224x224, 197 tokens) at batch 64.
"""

import argparse
import importlib.util
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import types
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.profiler import ProfilerActivity, profile
from transformers import (
    ConvNextConfig,
    ConvNextForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from saq_hf import QuantConfig, SAQTrainer, SAQTrainingArguments, quantize_model  # noqa: E402
from saq_hf.quant import LSQQuantizer  # noqa: E402
from speed_report import GOALS, GPU_GOALS, goal_report, plot, print_table, ratios  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
NUM_LABELS = 10

VIT_TINY = dict(patch_size=4, hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=768)

# name -> (model family, config kwargs, image size, batch size) for each device type.
CONFIGS = {
    "cpu": {
        "vit-tiny": ("vit", VIT_TINY, 32, 16),
        "convnext-tiny": ("convnext", dict(hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 2, 1]), 32, 32),
        "vit-b16-width": ("vit", dict(patch_size=16, hidden_size=768, num_hidden_layers=2, num_attention_heads=12,
                                      intermediate_size=3072), 64, 32),
    },
    "cuda": {
        "vit-tiny": ("vit", VIT_TINY, 32, 128),
        "convnext-tiny": ("convnext", dict(hidden_sizes=[96, 192, 384, 768], depths=[3, 3, 9, 3]), 224, 64),
        "vit-b16": ("vit", dict(patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                intermediate_size=3072), 224, 64),
    },
}

# mode -> (model: fp / lsq (ours) / torch_lsq / torchao, SAQTrainingArguments fields)
MODES = {
    "fp": ("fp", {"saq_mode": "qat"}),
    "qat": ("lsq", {"saq_mode": "qat"}),
    "saq": ("lsq", {"saq_mode": "saq"}),
    "every_k": ("lsq", {"saq_mode": "saq", "saq_strategy": "every_k"}),
    "looksam": ("lsq", {"saq_mode": "saq", "saq_strategy": "looksam"}),
    "reuse_grad": ("lsq", {"saq_mode": "saq", "saq_strategy": "reuse_grad"}),
    "fp_compiled": ("fp", {"saq_mode": "qat", "torch_compile": True}),
    "qat_compiled": ("lsq", {"saq_mode": "qat", "torch_compile": True}),
    "saq_compiled": ("lsq", {"saq_mode": "saq", "torch_compile": True}),
    "looksam_compiled": ("lsq", {"saq_mode": "saq", "saq_strategy": "looksam", "torch_compile": True}),
    # CUDA graphs (Inductor's reduce-overhead mode); on a CPU the same as *_compiled, so not run there by default.
    "fp_cudagraphs": ("fp", {"saq_mode": "qat", "torch_compile": True, "torch_compile_mode": "reduce-overhead"}),
    "qat_cudagraphs": ("lsq", {"saq_mode": "qat", "torch_compile": True, "torch_compile_mode": "reduce-overhead"}),
    "saq_cudagraphs": ("lsq", {"saq_mode": "saq", "torch_compile": True, "torch_compile_mode": "reduce-overhead"}),
    "looksam_cudagraphs": ("lsq", {"saq_mode": "saq", "saq_strategy": "looksam", "torch_compile": True,
                                   "torch_compile_mode": "reduce-overhead"}),
    "torchao_qat": ("torchao", {"saq_mode": "qat"}),
    "torch_lsq": ("torch_lsq", {"saq_mode": "qat"}),
    # Distillation from a full-precision teacher of the same architecture (SAQTrainer(teacher_model=...)).
    "qat_kd": ("lsq", {"saq_mode": "qat"}),
    "saq_kd": ("lsq", {"saq_mode": "saq"}),
}
KD_MODES = ("qat_kd", "saq_kd")
# A full SAQ step every k-th step, a cheaper one in between.
AMORTISED = tuple(mode for mode, (_, fields) in MODES.items() if fields.get("saq_strategy") in ("every_k", "looksam"))
COMPILED_MODES = [mode for mode, (_, fields) in MODES.items() if fields.get("torch_compile")]
# Run only when named in --modes: the compiled LookSAM step and the CUDA-graph modes.
OPT_IN_MODES = ["looksam_compiled"] + [mode for mode in MODES if mode.endswith("_cudagraphs")] + list(KD_MODES)


def peer_unavailable(mode: str) -> str | None:
    """Why a peer mode cannot run here, or ``None``."""
    if mode == "torchao_qat":
        if importlib.util.find_spec("torchao") is None:
            return "torchao is not installed (pip install torchao)"
        try:  # an installed torchao built for another torch can fail at import
            importlib.import_module("torchao.quantization.qat")
        except Exception as error:  # noqa: BLE001 - whatever the import raises, the column is skipped with it
            return f"torchao is installed but does not import: {type(error).__name__}: {str(error)[:200]}"
    return None


PEERS = ("torchao_qat", "torch_lsq")


@contextmanager
def peer_failures(mode: str, failed: dict):
    """A peer that fails (e.g. a torchao build for another torch) is dropped from the run with its error kept and
    printed; a failure of one of our own modes is raised."""
    try:
        yield
    except Exception as error:
        if mode not in PEERS:
            raise
        failed[mode] = f"{type(error).__name__}: {str(error)[:300]}"
        print(f"{mode}: dropped, {failed[mode]}", flush=True)


def torch_learnable_fake_quantize(quantizer: LSQQuantizer, x: torch.Tensor) -> torch.Tensor:
    """LSQ with PyTorch's fused learnable fake-quant ops (zero point 0): the forward of a ``torch_lsq`` quantizer."""
    qn, qp = quantizer._known_range or quantizer._initialize_or_read(x)
    group_numel = x[0].numel() if quantizer.is_activation and x.dim() > 1 else x.numel() // quantizer.step_size.numel()
    grad_factor = 1.0 / (max(group_numel, 1) * qp) ** 0.5
    scale = quantizer.step_size.to(x.dtype).reshape(-1)
    zero_point = torch.zeros_like(scale)
    if quantizer.per_channel:
        return torch._fake_quantize_learnable_per_channel_affine(x, scale, zero_point, 0, qn, qp, grad_factor)
    return torch._fake_quantize_learnable_per_tensor_affine(x, scale, zero_point, qn, qp, grad_factor)


def prepare_torchao_qat(model):
    warnings.filterwarnings("ignore", module="torchao")
    logging.getLogger("torchao").setLevel(logging.ERROR)
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    quantize_(model, QATConfig(activation_config=IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False),
                               weight_config=IntxFakeQuantizeConfig(torch.int4, group_size=32), step="prepare"))
    return model


def build_model(family: str, kwargs: dict, image_size: int, kind: str):
    torch.manual_seed(0)
    if family == "vit":
        model = ViTForImageClassification(ViTConfig(image_size=image_size, num_labels=NUM_LABELS, **kwargs))
    else:
        model = ConvNextForImageClassification(ConvNextConfig(image_size=image_size, num_labels=NUM_LABELS, **kwargs))
    if kind == "torchao":
        return prepare_torchao_qat(model)
    if kind in ("lsq", "torch_lsq"):
        quantize_model(model, QuantConfig(w_bits=4, a_bits=4))
    if kind == "torch_lsq":
        for module in model.modules():
            if isinstance(module, LSQQuantizer):
                module.forward = types.MethodType(torch_learnable_fake_quantize, module)
    return model


def live_tensor_bytes(model, optimizer) -> int:
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def profiled_peak_bytes(prof) -> int:
    running = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        running += event.self_cpu_memory_usage
        peak = max(peak, running)
    return peak


class ModeRun:
    """One mode's model, SAQTrainer and optimizer; :meth:`step` is one step of the Trainer's loop."""

    def __init__(self, config: tuple, mode: str, device: torch.device, interval: int, out: str, bf16: bool,
                 checkpointing: bool = False):
        family, kwargs, image_size, batch_size = config
        kind, fields = MODES[mode]
        self.mode, self.device = mode, device
        self.model = build_model(family, kwargs, image_size, kind).to(device)
        # saq_start_ratio=0: the random-init models here would otherwise train plain QAT until they fit.
        args = SAQTrainingArguments(output_dir=out, per_device_train_batch_size=batch_size, learning_rate=1e-4, rho=0.05,
                                    saq_start_ratio=0.0, saq_interval=interval, report_to=[], use_cpu=device.type == "cpu", seed=0,
                                    bf16=bf16, **fields)
        # The KD modes' teacher: an FP model of the same architecture (its own random weights; the cost is the same).
        teacher = build_model(family, kwargs, image_size, "fp") if mode in KD_MODES else None
        self.trainer = SAQTrainer(model=self.model, args=args, teacher_model=teacher)
        if checkpointing:  # what Trainer.train() does with gradient_checkpointing=True
            enable = getattr(self.model, "activation_checkpointing_enable", None) or \
                self.model.gradient_checkpointing_enable
            enable({"use_reentrant": False})
        # What Trainer.train() does to the model on one device: placement and, with bf16, autocast in forward.
        self.model = self.trainer.accelerator.prepare_model(self.model)
        self.trainer.create_optimizer_and_scheduler(num_training_steps=10_000)
        self.trainer.current_gradient_accumulation_steps = 1
        generator = torch.Generator().manual_seed(0)
        self.batch = {"pixel_values": torch.randn(batch_size, 3, image_size, image_size, generator=generator),
                      "labels": torch.randint(0, NUM_LABELS, (batch_size,), generator=generator)}
        self.times: list[tuple[int, float]] = []

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self) -> None:
        trainer = self.trainer
        trainer.training_step(self.model, self.batch)
        trainer.accelerator.clip_grad_norm_(self.model.parameters(), trainer.args.max_grad_norm)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        self.model.zero_grad()
        trainer.state.global_step += 1

    def timed_step(self) -> None:
        self._sync()
        start = time.perf_counter()
        self.step()
        self._sync()
        self.times.append((self.trainer.state.global_step - 1, time.perf_counter() - start))

    def peak_memory_bytes(self, interval: int) -> int:
        while self.mode in AMORTISED and self.trainer.state.global_step % interval:
            self.step()
        live = live_tensor_bytes(self.model, self.trainer.optimizer)
        if self.device.type == "cuda":
            self._sync()
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.step()
            self._sync()
            return live + torch.cuda.max_memory_allocated(self.device) - before
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            self.step()
        return live + profiled_peak_bytes(prof)

    def seconds(self, warmup: int, interval: int) -> float:
        timed = [(step, s) for step, s in self.times if step >= warmup]
        if self.mode not in AMORTISED:
            return statistics.median(s for _, s in timed)
        saq = statistics.median(s for step, s in timed if step % interval == 0)
        plain = statistics.median(s for step, s in timed if step % interval != 0)
        return (saq + (interval - 1) * plain) / interval


def run_config(config: tuple, modes: list[str], device: torch.device, warmup: int, steps: int, interval: int,
               bf16: bool, checkpointing: bool = False) -> dict:
    # Each config compiles its own graphs; dynamo's per-function cache would otherwise fill up across configs. Within
    # a config every compiled mode adds graphs of the same forward code (fp, qat, SAQ's ascent and descent): room for
    # all of them, so none falls back to eager at dynamo's default limit of 8.
    torch._dynamo.reset()
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, max(64, getattr(torch._dynamo.config, limit)))
    with tempfile.TemporaryDirectory() as out:
        runs, failed = [], {}
        for mode in modes:
            with peer_failures(mode, failed):
                runs.append(ModeRun(config, mode, device, interval, out, bf16, checkpointing))
        for round_index in range(warmup + steps):
            shift = round_index % len(runs)
            for run in runs[shift:] + runs[:shift]:
                with peer_failures(run.mode, failed):
                    run.timed_step()
            runs = [run for run in runs if run.mode not in failed]
        result = {mode: {"failed": why} for mode, why in failed.items()}
        for run in runs:
            result[run.mode] = {"step_ms": 1000 * run.seconds(warmup, interval),
                                "peak_mib": run.peak_memory_bytes(interval) / 2**20,
                                "parameters": sum(p.numel() for p in run.model.parameters())}
        return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 timed steps, half batches, eager modes only")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (LSQ init, compiles, optimizer state)")
    parser.add_argument("--interval", type=int, default=5,
                        help="k of saq_strategy=every_k and looksam (default 5, as in regimes.py)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: a shared 2-core box)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (the Trainer's bf16=True)")
    parser.add_argument("--gradient_checkpointing", action="store_true",
                        help="activation checkpointing on every layer (the Trainer's gradient_checkpointing=True)")
    parser.add_argument("--configs", default=None, help="comma-separated subset of the config names")
    parser.add_argument("--modes", default=None, help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--out", type=Path, default=RESULTS / "speed.json")
    args = parser.parse_args(argv)

    device = Accelerator(cpu=not torch.cuda.is_available()).device
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    configs = CONFIGS["cuda" if device.type == "cuda" else "cpu"]
    if args.configs:
        configs = {name: configs[name] for name in args.configs.split(",")}
    modes = args.modes.split(",") if args.modes else [m for m in MODES if m not in OPT_IN_MODES
                                                      and not (args.quick and m in COMPILED_MODES)]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown mode(s) {unknown}; choose from {list(MODES)}")
    skipped = {m: why for m in modes if (why := peer_unavailable(m))}
    for mode, why in skipped.items():
        print(f"{mode}: skipped, {why}", flush=True)
    modes = [m for m in modes if m not in skipped]
    steps = 8 if args.quick else args.steps
    results = {}
    for name, (family, kwargs, image_size, batch_size) in configs.items():
        if args.quick:
            batch_size = max(2, batch_size // 2)
        measured = run_config((family, kwargs, image_size, batch_size), modes, device, args.warmup, steps,
                              args.interval, args.bf16, args.gradient_checkpointing)
        results[name] = {"family": family, "config": kwargs, "image_size": image_size, "batch_size": batch_size,
                         "modes": measured, "ratios": ratios(measured)}
        print(f"{name}: done", flush=True)

    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s)")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    command = "python benchmarks/speed.py" + ("" if argv is None else " " + " ".join(argv))
    if argv is None and len(sys.argv) > 1:
        command = "python benchmarks/speed.py " + " ".join(sys.argv[1:])
    print(f"\n{command}  |  {device.type}: {machine}  |  torch {torch.__version__}  |  W4A4, "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}{', gradient checkpointing' if args.gradient_checkpointing else ''}, AdamW, every_k/looksam k={args.interval}, {steps} timed steps (median)"
          + (f"  |  load average at the end {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}" if load else "") + "\n")
    print_table(results)
    goals = goal_report(results, GPU_GOALS if device.type == "cuda" else GOALS)
    print("\ngoals (worst config): " + ", ".join(
        f"{k} {v['worst']:.2f} {'<=' if v['met'] else '>'} {v['goal']}" for k, v in goals.items()))

    report = {"command": command, "device": device.type, "machine": machine, "torch": torch.__version__,
              "load_average_1_5_15_min": load, "quick": args.quick, "bf16": args.bf16, "timed_steps": steps,
              "warmup_steps": args.warmup, "every_k_interval": args.interval,
              "gradient_checkpointing": args.gradient_checkpointing, "modes": modes, "skipped": skipped,
              "memory_method": "tensor bytes live at step start + the step's allocation peak ("
              + ("cuda.max_memory_allocated)" if device.type == "cuda" else "torch.profiler memory events)"),
              "results": results, "goals": goals}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(results, args.out.with_suffix(".png"), f"{command} — {device.type}: {machine}")
    return report


if __name__ == "__main__":
    main()
