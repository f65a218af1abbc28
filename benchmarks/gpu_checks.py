"""GPU numerics of the training step: SAQ in bf16 and fp16, and compiled against eager, on tiny models.

    python benchmarks/gpu_checks.py --out benchmarks/results/gpu/gpu_checks.json

For each precision (bf16 autocast, fp16 autocast with the Trainer's grad scaler), model (2-layer ViT,
2-stage ConvNeXt) and mode (qat, saq, case1, case2; saq also every_k, looksam and reuse_grad): 4 SAQTrainer steps
must give finite losses and, for the sharpness-aware modes, ε at the radius and no skipped perturbation beyond the
steps where fp16's grad scaler overflowed (a step whose ascent gradients overflow is skipped by design).
Compiled against eager: the LSQ op alone (its gradients, with and without the step size's, to 1e-4), and
``torch_compile=True`` (qat and saq, bf16 and fp32, the ViT): the first step's loss
must agree to 1e-3 relative (bf16: 1e-2), the others to 5e-2 (a quantization rounding can flip).
CUDA graphs (``torch_compile_mode="reduce-overhead"``, bf16, the ViT, every mode and strategy above, drop_last): the
losses as eager's (first to 1e-2, the others to 5e-2), no graph break, no skipped CUDA graph (``--checks cudagraphs``
alone: about a minute; ``--dry-run``: the same on a CPU, qat only, where Inductor skips CUDA graphs by design).
Writes every number to the JSON and exits 1 if a check fails. The fused LSQ op's bit-identity on the GPU
is checked by ``pytest tests/test_fused_quant.py`` (``gpu_check.sh`` runs both).
"""

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch
from transformers import ConvNextConfig, ConvNextForImageClassification, ViTConfig, ViTForImageClassification

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from saq_hf import QuantConfig, SAQTrainer, SAQTrainingArguments, quantize_model  # noqa: E402
from compile_check import check_op  # noqa: E402  (benchmarks/, on sys.path as this script's folder)

NUM_LABELS, STEPS = 5, 4
MODELS = {
    "vit": lambda: ViTForImageClassification(ViTConfig(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=2,
                                                       num_attention_heads=2, intermediate_size=128,
                                                       num_labels=NUM_LABELS)),
    "convnext": lambda: ConvNextForImageClassification(ConvNextConfig(num_stages=2, hidden_sizes=[16, 32], depths=[1, 1],
                                                                      num_labels=NUM_LABELS, image_size=32)),
}
MODES = [("qat", "full"), ("saq", "full"), ("case1", "full"), ("case2", "full"), ("saq", "every_k"),
         ("saq", "looksam"), ("saq", "reuse_grad")]


class Images(torch.utils.data.Dataset):
    def __init__(self, n=64):
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 32, 32, generator=generator)
        self.y = (self.x.mean(dim=(1, 2, 3)) * 40).long() % NUM_LABELS

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def train(arch: str, precision: str, mode: str, strategy: str, compiled: bool = False, compile_mode: str | None = None,
          device: str = "cuda") -> dict:
    torch.manual_seed(0)
    model = quantize_model(MODELS[arch](), QuantConfig(w_bits=4, a_bits=4))
    with tempfile.TemporaryDirectory() as out:
        args = SAQTrainingArguments(output_dir=out, saq_mode=mode, saq_strategy=strategy, saq_interval=2, rho=0.05,
                                    saq_radius="absolute", saq_start_ratio=0.0, max_steps=STEPS, learning_rate=1e-3,
                                    per_device_train_batch_size=16, logging_steps=1, report_to=[], seed=0,
                                    save_strategy="no", disable_tqdm=True, bf16=precision == "bf16",
                                    fp16=precision == "fp16", torch_compile=compiled, torch_compile_mode=compile_mode,
                                    dataloader_drop_last=True, use_cpu=device == "cpu")
        trainer = SAQTrainer(model=model, args=args, train_dataset=Images())
        trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    scaler = getattr(trainer.accelerator, "scaler", None)
    # fp16: each overflow the grad scaler met halved its scale (no growth within 4 steps); a step whose ascent
    # gradients overflowed skips its perturbation by design, as the scaler skips that optimizer step.
    overflows = round(math.log2(scaler._init_scale / scaler.get_scale())) if scaler is not None else 0
    return {"losses": [entry["loss"] for entry in logs], "eps_norm": [entry.get("saq_eps_norm") for entry in logs],
            "skipped": trainer.sharpness.skipped if trainer.sharpness is not None else 0,
            "scaler_overflows": overflows}


def cuda_graph_runs(device: str, precision: str, modes: list[tuple[str, str]]) -> dict:
    """``torch_compile_mode="reduce-overhead"`` (Inductor's CUDA graphs) against eager, per mode: the losses, and how
    many times Inductor skipped CUDA graphs (with the reasons it logged; on a CPU it always does)."""
    from torch._dynamo.utils import counters

    runs = {}
    for mode, strategy in modes:
        eager = train("vit", precision, mode, strategy, device=device)
        torch._dynamo.reset()
        counters.clear()
        graphs = train("vit", precision, mode, strategy, compiled=True, compile_mode="reduce-overhead", device=device)
        skips = dict(counters["inductor"]) if "inductor" in counters else {}
        runs[f"{mode}/{strategy}"] = {"eager": eager["losses"], "cudagraphs": graphs["losses"],
                                      "cudagraph_skips": skips.get("cudagraph_skips", 0),
                                      "graph_breaks": sum(counters["graph_break"].values())}
    return runs


CHECKS = ("op", "numerics", "compiled", "cudagraphs")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "gpu_checks.json")
    parser.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated subset of {','.join(CHECKS)}")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, fp32, the cudagraphs check on qat only: tries this script where there is no GPU")
    args = parser.parse_args(argv)
    wanted = args.checks.split(",")
    if unknown := [c for c in wanted if c not in CHECKS]:
        parser.error(f"unknown check(s) {unknown}; choose from {list(CHECKS)}")
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_checks.py needs a CUDA device (or --dry-run)")
        return 2
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (dry run)"
    checks = {"device": name, "torch": torch.__version__, "runs": {}, "failures": []}

    def check(name: str, ok: bool, detail) -> None:
        checks["runs"][name] = {"ok": ok, **detail}
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {json.dumps(detail)}", flush=True)
        if not ok:
            checks["failures"].append(name)

    # The op alone, compiled against eager: a compiled model trains only if these agree (torch 2.11's dynamo
    # once zeroed them, through a backward that read ctx.needs_input_grad).
    if args.dry_run:
        wanted = ["cudagraphs"]
    if "cudagraphs" in wanted:
        # Every mode and strategy under CUDA graphs: the first loss as eager's to 1e-2 (bf16), the others to 5e-2, no
        # graph break, and on a GPU no skipped CUDA graph.
        modes = [("qat", "full")] if args.dry_run else MODES
        precision = "fp32" if args.dry_run else "bf16"
        for key, run in cuda_graph_runs(device, precision, modes).items():
            ok = (math.isclose(run["eager"][0], run["cudagraphs"][0], rel_tol=1e-2)
                  and all(math.isclose(a, b, rel_tol=5e-2) for a, b in zip(run["eager"], run["cudagraphs"]))
                  and run["graph_breaks"] == 0 and (device == "cpu" or run["cudagraph_skips"] == 0))
            check(f"cudagraphs_vs_eager/{precision}/vit/{key}", ok, run)
    for step_grad in (True, False):
        if "op" not in wanted:
            break
        ok, errors = check_op("cuda", "inductor", step_grad)
        check(f"compiled_vs_eager/op/step_grad={step_grad}", ok, {"errors": errors})
    for precision in ("bf16", "fp16") if "numerics" in wanted else ():
        for arch in MODELS:
            for mode, strategy in MODES:
                run = train(arch, precision, mode, strategy)
                ok = all(math.isfinite(loss) for loss in run["losses"]) and len(run["losses"]) == STEPS
                if mode != "qat":
                    ok = ok and run["skipped"] <= run["scaler_overflows"] and all(
                        e is None or abs(e - 0.05) < 1e-3 for e in run["eps_norm"])
                check(f"{precision}/{arch}/{mode}/{strategy}", ok, run)
    for precision in ("fp32", "bf16") if "compiled" in wanted else ():
        for mode in ("qat", "saq"):
            eager, compiled = train("vit", precision, mode, "full"), train("vit", precision, mode, "full", compiled=True)
            first = 1e-2 if precision == "bf16" else 1e-3
            ok = (math.isclose(eager["losses"][0], compiled["losses"][0], rel_tol=first)
                  and all(math.isclose(a, b, rel_tol=5e-2) for a, b in zip(eager["losses"], compiled["losses"])))
            check(f"compiled_vs_eager/{precision}/vit/{mode}", ok,
                  {"eager": eager["losses"], "compiled": compiled["losses"]})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(checks, indent=1) + "\n")
    print(f"{len(checks['runs']) - len(checks['failures'])}/{len(checks['runs'])} checks passed; {args.out}")
    return 1 if checks["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
