"""GPU numerics of the training step: SAQ in bf16 and fp16, and compiled against eager, on tiny models.

    python benchmarks/gpu_checks.py --out benchmarks/results/gpu/gpu_checks.json

For each precision (bf16 autocast, fp16 autocast with the Trainer's grad scaler), model (2-layer ViT,
2-stage ConvNeXt) and mode (qat, saq, case1, case2; saq also every_k, looksam and reuse_grad): 4 SAQTrainer steps
must give finite losses and, for the sharpness-aware modes, ε at the radius and no skipped perturbation beyond the
steps where fp16's grad scaler overflowed (a step whose ascent gradients overflow is skipped by design).
Compiled against eager: the LSQ op alone (its gradients, with and without the step size's, to 1e-4), and
``torch_compile=True`` (qat and saq, bf16 and fp32, the ViT): the first step's loss
must agree to 1e-3 relative (bf16: 1e-2), the others to 5e-2 (a quantization rounding can flip).
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


def train(arch: str, precision: str, mode: str, strategy: str, compiled: bool = False) -> dict:
    torch.manual_seed(0)
    model = quantize_model(MODELS[arch](), QuantConfig(w_bits=4, a_bits=4))
    with tempfile.TemporaryDirectory() as out:
        args = SAQTrainingArguments(output_dir=out, saq_mode=mode, saq_strategy=strategy, saq_interval=2, rho=0.05,
                                    saq_radius="absolute", saq_start_ratio=0.0, max_steps=STEPS, learning_rate=1e-3,
                                    per_device_train_batch_size=16, logging_steps=1, report_to=[], seed=0,
                                    save_strategy="no", disable_tqdm=True, bf16=precision == "bf16",
                                    fp16=precision == "fp16", torch_compile=compiled)
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "gpu_checks.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_checks.py needs a CUDA device")
        return 2
    checks = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": {}, "failures": []}

    def check(name: str, ok: bool, detail) -> None:
        checks["runs"][name] = {"ok": ok, **detail}
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {json.dumps(detail)}", flush=True)
        if not ok:
            checks["failures"].append(name)

    # The op alone, compiled against eager: a compiled model trains only if these agree (torch 2.11's dynamo
    # once zeroed them, through a backward that read ctx.needs_input_grad).
    for step_grad in (True, False):
        ok, errors = check_op("cuda", "inductor", step_grad)
        check(f"compiled_vs_eager/op/step_grad={step_grad}", ok, {"errors": errors})
    for precision in ("bf16", "fp16"):
        for arch in MODELS:
            for mode, strategy in MODES:
                run = train(arch, precision, mode, strategy)
                ok = all(math.isfinite(loss) for loss in run["losses"]) and len(run["losses"]) == STEPS
                if mode != "qat":
                    ok = ok and run["skipped"] <= run["scaler_overflows"] and all(
                        e is None or abs(e - 0.05) < 1e-3 for e in run["eps_norm"])
                check(f"{precision}/{arch}/{mode}/{strategy}", ok, run)
    for precision in ("fp32", "bf16"):
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
