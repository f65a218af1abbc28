"""Where one training step's time goes: wall time, the CPU side alone, and the top ops, per mode.

    python benchmarks/profile_step.py --bf16                      # CUDA: ViT-B/16, batch 64 (speed.py's config)
    python benchmarks/profile_step.py --config vit-tiny --steps 2 # CPU

Uses ``speed.py``'s models, batches and training step (``ModeRun``). "CPU side" is the wall time of one step
without waiting for the device at its end: on a GPU, a CPU side close to the step time means the step is
bound by Python dispatch rather than by the GPU. Then ``torch.profiler`` over two steps, sorted by device time
(CUDA) or CPU time. ``--out`` also writes the text to a file.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402


def profile_mode(config: tuple, mode: str, device: torch.device, bf16: bool, steps: int, rows: int) -> str:
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    with tempfile.TemporaryDirectory() as out:
        run = speed.ModeRun(config, mode, device, 5, out, bf16)
        for _ in range(3):  # LSQ initialisation, optimizer state, kernel compiles
            run.step()
        sync()
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            run.step()
            sync()
            times.append(time.perf_counter() - start)
        start = time.perf_counter()
        run.step()
        cpu_side = time.perf_counter() - start
        sync()
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            for _ in range(2):
                run.step()
            sync()
    table = prof.key_averages().table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                                      row_limit=rows, max_name_column_width=70)
    return (f"== {mode}: step {1000 * statistics.median(times):.1f} ms (median of {steps}), "
            f"CPU side {1000 * cpu_side:.1f} ms\n{table}")


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="a speed.py config (default: vit-b16 on CUDA, vit-tiny on CPU)")
    parser.add_argument("--modes", default="fp,qat", help="comma-separated speed.py modes (default fp,qat)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (the Trainer's bf16=True)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps before the profiled two (default 5)")
    parser.add_argument("--rows", type=int, default=18, help="ops listed per mode (default 18)")
    parser.add_argument("--out", type=Path, default=None, help="also write the report to this file")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.rows < 1:
        parser.error("--steps and --rows must be at least 1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    configs = speed.CONFIGS[device.type]
    name = args.config or ("vit-b16" if device.type == "cuda" else "vit-tiny")
    if name not in configs:
        parser.error(f"unknown config {name!r} on {device.type}; choose from {list(configs)}")
    unknown = [m for m in args.modes.split(",") if m not in speed.MODES]
    if unknown:
        parser.error(f"unknown mode(s) {unknown}; choose from {list(speed.MODES)}")
    if device.type == "cpu":
        torch.set_num_threads(1)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU, 1 torch thread"
    header = (f"# {machine}, torch {torch.__version__}: {name}, {'bf16 autocast' if args.bf16 else 'fp32'} "
              f"(python benchmarks/profile_step.py {' '.join(sys.argv[1:] if argv is None else argv)})")
    report = "\n".join([header] + [profile_mode(configs[name], mode, device, args.bf16, args.steps, args.rows)
                                   for mode in args.modes.split(",")])
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report + "\n")
    return report


if __name__ == "__main__":
    main()
