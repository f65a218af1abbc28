"""Why the paper's fixed radius can stop a small model from learning: the measurements behind docs/METHOD.md.

    python benchmarks/collapse.py          # ~3 min on 2 cores; writes benchmarks/results/collapse.json

A 2-layer, 64-wide W4A4 ViT trained from scratch on scikit-learn's digits (upscaled to 32x32, patch 8; 1,437
training images, batch 16, AdamW 1e-3, cosine, 5 epochs) with ``SAQTrainer`` in three settings:
``qat``; ``paper`` (absolute ``rho=0.05``, step sizes trained at the perturbed point: the library's default
before the radius change); ``defaults`` (relative ``rho=0.002``, clean step sizes; both SAQ settings from the first step, ``saq_start_ratio=0``). For each it records,
every 25 steps, where ε's squared norm goes (share per tensor), the largest ``‖ε_t‖ / ‖x_t‖`` over tensors,
the classifier's input step size; at the end the share of inputs each activation quantizer clips and the
accuracy on the 360 test images.
"""

import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DEFAULT_RESULTS, ImageTensors, _common_args, accuracy, collate, load_splits, quiet  # noqa: E402

SETTINGS = {
    "qat": {"saq_mode": "qat", "rho": 0.0},
    "paper": {"saq_mode": "saq", "rho": 0.05, "saq_radius": "absolute", "saq_clean_step_sizes": False,
              "saq_start_ratio": 0.0},
    # The radius and step-size defaults with SAQ from the first step: saq_start_ratio="auto" would keep this
    # untrained model on plain QAT until it fits, which is not what this study is about.
    "defaults": {"saq_mode": "saq", "saq_start_ratio": 0.0},
}


def run(name: str, out_dir: Path) -> dict:
    from saq_hf import QuantConfig, SAQTrainer, SAQTrainingArguments, quantize_model
    from saq_hf.quant import LSQQuantizer, quantized_layers
    from transformers import PrinterCallback, ViTConfig, ViTForImageClassification

    splits = load_splits("digits")
    up = lambda x: F.interpolate(x, scale_factor=4, mode="nearest")  # noqa: E731
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, num_channels=1, hidden_size=64,
                                                num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                                                num_labels=10))
    quantize_model(model, QuantConfig(w_bits=4, a_bits=4))
    names = {id(p): n for n, p in model.named_parameters()}
    trace = []

    class Recording(SAQTrainer):
        def _epsilon(self, sharpness, grads):
            eps = super()._epsilon(sharpness, grads)
            step = self.state.global_step
            if eps is not None and step % 25 == 0:
                n = len(sharpness.layers)
                tensors = [layer.quantized_weight().detach() for layer in sharpness.layers] + \
                    [p.detach() for p in sharpness.params]
                labels = [names[id(layer.weight)] for layer in sharpness.layers] + \
                    [names[id(p)] for p in sharpness.params]
                squares = [float(e.pow(2).sum()) if e is not None else 0.0 for e in eps]
                total = sum(squares) or 1.0
                top = sorted(zip(squares, labels), reverse=True)[:3]
                relative = max(float(e.norm() / x.norm()) for e, x in zip(eps, tensors)
                               if e is not None and float(x.norm()) > 0)
                zero_norm_share = sum(s for s, x in zip(squares, tensors) if float(x.norm()) == 0) / total
                trace.append({"step": step, "top_eps_share": [(label, round(s / total, 3)) for s, label in top],
                              "eps_share_on_zero_tensors": round(zero_norm_share, 3),
                              "max_relative_eps": relative, "weights_share": round(sum(squares[:n]) / total, 3),
                              "classifier_input_step": float(model.classifier.input_quantizer.step_size)})
            return eps

    args = SAQTrainingArguments(num_train_epochs=5, learning_rate=1e-3, weight_decay=0.05,
                                per_device_train_batch_size=16, logging_steps=25,
                                **{**_common_args(out_dir / name, 0, 1), "logging_strategy": "steps"},
                                **SETTINGS[name])
    trainer = Recording(model=model, args=args, train_dataset=ImageTensors(up(splits.train_x), splits.train_y),
                        data_collator=collate)
    trainer.remove_callback(PrinterCallback)
    if name == "qat":  # the classifier's input step size, for comparison
        trainer.add_callback(StepTrace(model, trace))
    trainer.train()
    clipped = {}

    def hook(layer_name):
        def record(module, inputs, _):
            x, step = inputs[0].detach(), module.step_size.detach()
            qn, qp = module.qrange()
            codes = x / step
            clipped[layer_name] = round(float(((codes < qn - 0.5) | (codes > qp + 0.5)).float().mean()), 3)
        return record

    handles = [layer.input_quantizer.register_forward_hook(hook(n)) for n, layer in quantized_layers(model)]
    test_accuracy = accuracy(model, up(splits.test_x), splits.test_y)
    for handle in handles:
        handle.remove()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"setting": name, **SETTINGS[name], "test_accuracy": test_accuracy, "final_loss": losses[-1],
            "loss_curve": losses, "chance_loss": math.log(10), "trace": trace, "input_clipped_share": clipped,
            "min_step_size": min(float(q.step_size.min()) for q in model.modules() if isinstance(q, LSQQuantizer))}


class StepTrace(TrainerCallback):
    """The classifier's input step size every 25 steps (for the run that records no ε)."""

    def __init__(self, model, trace):
        self.model, self.trace = model, trace

    def on_step_end(self, args, state, control, **kwargs):
        if (state.global_step - 1) % 25 == 0:
            self.trace.append({"step": state.global_step - 1,
                               "classifier_input_step": float(self.model.classifier.input_quantizer.step_size)})


def main() -> dict:
    quiet()
    torch.set_num_threads(1)
    scratch = Path(__file__).resolve().parent / "cache" / "collapse"
    start = time.perf_counter()
    results = [run(name, scratch) for name in SETTINGS]
    for r in results:
        print(f"\n{r['setting']:9s} test {r['test_accuracy']:5.1f} %  final loss {r['final_loss']:.3f} "
              f"(chance {r['chance_loss']:.3f})  min step size {r['min_step_size']:+.4f}")
        print("   classifier input step:", [round(t["classifier_input_step"], 5) for t in r["trace"]][:12])
        if r["setting"] != "qat":
            for t in r["trace"][:6]:
                print(f"   step {t['step']:3d}: ε² share {t['top_eps_share']}, on zero-valued tensors "
                      f"{t['eps_share_on_zero_tensors']}, on weights {t['weights_share']}, "
                      f"max ‖ε_t‖/‖x_t‖ {t['max_relative_eps']:.3g}")
        worst = sorted(r["input_clipped_share"].items(), key=lambda kv: -kv[1])[:3]
        print("   most-clipped activation quantizers:", worst)
    out = {"command": "python benchmarks/collapse.py", "seconds": time.perf_counter() - start, "runs": results}
    DEFAULT_RESULTS.mkdir(parents=True, exist_ok=True)
    (DEFAULT_RESULTS / "collapse.json").write_text(json.dumps(out, indent=1))
    print(f"\n{out['seconds']:.0f} s; wrote {DEFAULT_RESULTS / 'collapse.json'}")
    return out


if __name__ == "__main__":
    main()
