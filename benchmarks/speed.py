"""Step time and peak memory of FP, QAT and the SAQ strategies: one process, the same batch every step.

    python benchmarks/speed.py            # full run (about 6 minutes on 2 busy CPU cores)
    python benchmarks/speed.py --quick    # 8 timed steps and half batches: a smoke run

One step of a mode is the body of the Trainer's loop: ``SAQTrainer.training_step`` (one or two
forward/backward passes), gradient clipping, the AdamW step, the scheduler step and ``zero_grad``, on the
same batch every time. The five modes of a config live side by side and are stepped in turn (rotating the
order each round), so load from other processes on a shared machine hits them alike; the device is
synchronised around each step. ``time`` is the median over the timed steps after warm-up; for ``every_k``
it is the amortised ``(median SAQ step + (k-1) · median plain step) / k``.

Peak memory counts tensors only, the same way on both devices: bytes live when a step starts (parameters,
buffers, gradients, optimizer state of that mode's model) + the highest running total of what the step
allocates and frees. On CUDA the step's part is ``max_memory_allocated - memory_allocated`` around it; on
CPU, which has no allocator counter, it is read from ``torch.profiler(profile_memory=True)`` events. The
measured step is a perturbed one in every mode.

The device is whatever Accelerate picks (CUDA when present). Sizes per device are in ``CONFIGS``: on CPU
the ViT-B/16-width model keeps ViT-B's width (hidden 768, 12 heads, MLP 3072) with 2 layers, 64x64 images
(17 tokens) and batch 16; on CUDA it is the full ViT-B/16 (12 layers, 224x224, 197 tokens) at batch 64.
"""

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
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

RESULTS = Path(__file__).resolve().parent / "results"
NUM_LABELS = 10

VIT_TINY = dict(patch_size=4, hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=768)

# name -> (model family, config kwargs, image size, batch size) for each device type.
CONFIGS = {
    "cpu": {
        "vit-tiny": ("vit", VIT_TINY, 32, 16),
        "convnext-tiny": ("convnext", dict(hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 2, 1]), 32, 32),
        "vit-b16-width": ("vit", dict(patch_size=16, hidden_size=768, num_hidden_layers=2, num_attention_heads=12,
                                      intermediate_size=3072), 64, 16),
    },
    "cuda": {
        "vit-tiny": ("vit", VIT_TINY, 32, 128),
        "convnext-tiny": ("convnext", dict(hidden_sizes=[96, 192, 384, 768], depths=[3, 3, 9, 3]), 224, 64),
        "vit-b16": ("vit", dict(patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                intermediate_size=3072), 224, 64),
    },
}

# mode -> (quantized?, SAQTrainingArguments fields)
MODES = {
    "fp": (False, {"saq_mode": "qat"}),
    "qat": (True, {"saq_mode": "qat"}),
    "saq": (True, {"saq_mode": "saq"}),
    "every_k": (True, {"saq_mode": "saq", "saq_strategy": "every_k"}),
    "reuse_grad": (True, {"saq_mode": "saq", "saq_strategy": "reuse_grad"}),
}


def build_model(family: str, kwargs: dict, image_size: int, quantized: bool):
    torch.manual_seed(0)
    if family == "vit":
        model = ViTForImageClassification(ViTConfig(image_size=image_size, num_labels=NUM_LABELS, **kwargs))
    else:
        model = ConvNextForImageClassification(ConvNextConfig(image_size=image_size, num_labels=NUM_LABELS, **kwargs))
    return quantize_model(model, QuantConfig(w_bits=4, a_bits=4)) if quantized else model


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

    def __init__(self, config: tuple, mode: str, device: torch.device, interval: int, out: str, bf16: bool):
        family, kwargs, image_size, batch_size = config
        quantized, fields = MODES[mode]
        self.mode, self.device = mode, device
        self.model = build_model(family, kwargs, image_size, quantized).to(device)
        args = SAQTrainingArguments(output_dir=out, per_device_train_batch_size=batch_size, learning_rate=1e-4,
                                    saq_interval=interval, report_to=[], use_cpu=device.type == "cpu", seed=0,
                                    bf16=bf16, **fields)
        self.trainer = SAQTrainer(model=self.model, args=args)
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
        while self.mode == "every_k" and self.trainer.state.global_step % interval:
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
        if self.mode != "every_k":
            return statistics.median(s for _, s in timed)
        saq = statistics.median(s for step, s in timed if step % interval == 0)
        plain = statistics.median(s for step, s in timed if step % interval != 0)
        return (saq + (interval - 1) * plain) / interval


def run_config(config: tuple, device: torch.device, warmup: int, steps: int, interval: int, bf16: bool) -> dict:
    with tempfile.TemporaryDirectory() as out:
        runs = [ModeRun(config, mode, device, interval, out, bf16) for mode in MODES]
        for round_index in range(warmup + steps):
            shift = round_index % len(runs)
            for run in runs[shift:] + runs[:shift]:
                run.timed_step()
        result = {}
        for run in runs:
            result[run.mode] = {"step_ms": 1000 * run.seconds(warmup, interval),
                                "peak_mib": run.peak_memory_bytes(interval) / 2**20,
                                "parameters": sum(p.numel() for p in run.model.parameters())}
        return result


def ratios(modes: dict) -> dict:
    qat = modes["qat"]
    result = {"qat_over_fp_time": qat["step_ms"] / modes["fp"]["step_ms"]}
    for mode in ("saq", "every_k", "reuse_grad"):
        result[f"{mode}_over_qat_time"] = modes[mode]["step_ms"] / qat["step_ms"]
        result[f"{mode}_over_qat_memory"] = modes[mode]["peak_mib"] / qat["peak_mib"]
    return result


GOALS = {  # ratio -> upper bound (issue 3)
    "saq_over_qat_time": 2.05,
    "every_k_over_qat_time": 1.15,
    "reuse_grad_over_qat_time": 1.15,
    "qat_over_fp_time": 1.25,
    "saq_over_qat_memory": 1.10,
}


def print_table(results: dict, interval: int) -> None:
    header = (f"{'config':<15}{'params':>8}  {'fp ms':>8}{'qat ms':>8}{'saq ms':>8}{'k=' + str(interval) + ' ms':>8}"
              f"{'reuse ms':>9}  {'qat/fp':>7}{'saq/qat':>8}{'k/qat':>7}{'reuse/qat':>10}"
              f"  {'mem qat MiB':>12}{'saq/qat':>8}{'k/qat':>7}{'reuse/qat':>10}")
    print(header)
    print("-" * len(header))
    for name, entry in results.items():
        m, r = entry["modes"], entry["ratios"]
        print(f"{name:<15}{m['qat']['parameters'] / 1e6:>7.1f}M  "
              + "".join(f"{m[k]['step_ms']:>8.1f}" for k in ("fp", "qat", "saq", "every_k"))
              + f"{m['reuse_grad']['step_ms']:>9.1f}  "
              + f"{r['qat_over_fp_time']:>7.2f}{r['saq_over_qat_time']:>8.2f}{r['every_k_over_qat_time']:>7.2f}"
              + f"{r['reuse_grad_over_qat_time']:>10.2f}  {m['qat']['peak_mib']:>12.1f}"
              + f"{r['saq_over_qat_memory']:>8.2f}{r['every_k_over_qat_memory']:>7.2f}"
              + f"{r['reuse_grad_over_qat_memory']:>10.2f}")


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    series = [("qat/fp time", "qat_over_fp_time"), ("saq/qat time", "saq_over_qat_time"),
              ("every_k/qat time", "every_k_over_qat_time"), ("reuse_grad/qat time", "reuse_grad_over_qat_time"),
              ("saq/qat memory", "saq_over_qat_memory")]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(series)
    for i, (label, key) in enumerate(series):
        ax.bar([x + i * width for x in range(len(names))], [results[n]["ratios"][key] for n in names], width,
               label=label)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(names))], names)
    ax.set_ylabel("ratio")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, ncol=len(series), loc="upper center", bbox_to_anchor=(0.5, -0.08))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 warm-up + 8 timed steps, half batches")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (LSQ init, optimizer state)")
    parser.add_argument("--interval", type=int, default=8, help="k of saq_strategy=every_k (default 8)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: a shared 2-core box)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (the Trainer's bf16=True)")
    parser.add_argument("--configs", default=None, help="comma-separated subset of the config names")
    parser.add_argument("--out", type=Path, default=RESULTS / "speed.json")
    args = parser.parse_args(argv)

    device = Accelerator(cpu=not torch.cuda.is_available()).device
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    configs = CONFIGS["cuda" if device.type == "cuda" else "cpu"]
    if args.configs:
        configs = {name: configs[name] for name in args.configs.split(",")}
    steps = 8 if args.quick else args.steps
    results = {}
    for name, (family, kwargs, image_size, batch_size) in configs.items():
        if args.quick:
            batch_size = max(2, batch_size // 2)
        modes = run_config((family, kwargs, image_size, batch_size), device, args.warmup, steps, args.interval,
                           args.bf16)
        results[name] = {"family": family, "config": kwargs, "image_size": image_size, "batch_size": batch_size,
                         "modes": modes, "ratios": ratios(modes)}
        print(f"{name}: done", flush=True)

    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s)")
    command = "python benchmarks/speed.py" + ("" if argv is None else " " + " ".join(argv))
    if argv is None and len(sys.argv) > 1:
        command = "python benchmarks/speed.py " + " ".join(sys.argv[1:])
    print(f"\n{command}  |  {device.type}: {machine}  |  torch {torch.__version__}  |  W4A4, {'bf16 autocast' if args.bf16 else 'fp32'}, AdamW, "
          f"every_k k={args.interval}, {steps} timed steps (median)\n")
    print_table(results, args.interval)
    worst = {key: max(entry["ratios"][key] for entry in results.values()) for key in GOALS}
    goals = {key: {"goal": bound, "worst": round(worst[key], 3), "met": worst[key] <= bound}
             for key, bound in GOALS.items()}
    print("\ngoals (worst config): " + ", ".join(
        f"{k} {v['worst']:.2f} {'<=' if v['met'] else '>'} {v['goal']}" for k, v in goals.items()))

    report = {"command": command, "device": device.type, "machine": machine, "torch": torch.__version__,
              "quick": args.quick, "bf16": args.bf16, "timed_steps": steps, "warmup_steps": args.warmup,
              "every_k_interval": args.interval,
              "memory_method": "tensor bytes live at step start + the step's allocation peak ("
              + ("cuda.max_memory_allocated)" if device.type == "cuda" else "torch.profiler memory events)"),
              "results": results, "goals": goals}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(results, args.out.with_suffix(".png"), f"{command} — {device.type}: {machine}")
    return report


if __name__ == "__main__":
    main()
