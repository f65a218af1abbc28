"""Does ``torch.compile`` train a fake-quantized model correctly with the torch installed here?

    python benchmarks/compile_check.py                        # CUDA if present, else CPU; inductor and aot_eager
    python benchmarks/compile_check.py --devices cpu --backends aot_eager

Compiled against eager, same initialisation and batch: (1) the LSQ op alone, its output and gradients (with the
step size's gradient and without, as SAQ's descent pass runs it); (2) one ``QuantLinear``; (3) a tiny W4A4 ViT
trained 3 AdamW steps. Prints one line per check and exits 1 if one fails. This is how torch 2.11 was found
to zero every gradient through the op in compiled models (``benchmarks/results/gpu/compiled_diagnosis.txt``).
"""

import argparse
import copy
import sys
from pathlib import Path

import torch
from transformers import ViTConfig, ViTForImageClassification

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from saq_hf import QuantConfig, quantize_model  # noqa: E402
from saq_hf.quant import QuantLinear  # noqa: E402
from saq_hf.quant.lsq import lsq_fake_quantize  # noqa: E402


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).float().norm() / a.float().norm().clamp_min(1e-30))


def check_op(device: str, backend: str, step_grad: bool) -> tuple[bool, str]:
    generator = torch.Generator().manual_seed(0)
    x0, grad = (torch.randn(64, 256, generator=generator).to(device) for _ in range(2))

    def op(x, s):
        return lsq_fake_quantize(x, s, -8, 7, 0.1, step_grad)

    results = []
    for function in (op, torch.compile(op, backend=backend, fullgraph=True)):
        x, s = x0.clone().requires_grad_(), torch.tensor(0.05, device=device, requires_grad=True)
        out = function(x, s)
        out.backward(grad)
        results.append((out.detach(), x.grad, s.grad))
    (out_e, x_e, s_e), (out_c, x_c, s_c) = results
    errors = {"out": relative(out_e, out_c), "x.grad": relative(x_e, x_c),
              "step.grad": relative(s_e, s_c) if step_grad else float(s_c.abs())}
    return all(e < 1e-4 for e in errors.values()), " ".join(f"{k} {v:.2g}" for k, v in errors.items())


def check_layer(device: str, backend: str) -> tuple[bool, str]:
    torch.manual_seed(0)
    layer = QuantLinear(256, 128, w_bits=4, a_bits=4).to(device)
    x = torch.randn(64, 256, device=device)
    with torch.no_grad():
        layer(x)  # LSQ initialisation, eager
    twin = copy.deepcopy(layer)
    layer(x).square().sum().backward()
    torch.compile(twin, backend=backend)(x).square().sum().backward()
    errors = {name: relative(p.grad, q.grad) for (name, p), q in zip(layer.named_parameters(), twin.parameters())}
    return all(e < 1e-3 for e in errors.values()), " ".join(f"{k} {v:.2g}" for k, v in errors.items())


def check_training(device: str, backend: str, steps: int = 3) -> tuple[bool, str]:
    torch.manual_seed(0)
    model = quantize_model(ViTForImageClassification(ViTConfig(
        image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
        num_labels=5)), QuantConfig(w_bits=4, a_bits=4)).to(device)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 32, 32, generator=generator).to(device)
    y = (x.mean(dim=(1, 2, 3)) * 40).long().abs() % 5
    with torch.no_grad():
        model(pixel_values=x)
    twin = copy.deepcopy(model)
    losses = {}
    for name, module, forward in (("eager", model, model), ("compiled", twin, torch.compile(twin, backend=backend))):
        optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
        losses[name] = []
        for _ in range(steps):
            loss = forward(pixel_values=x, labels=y).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[name].append(round(loss.item(), 4))
    ok = all(abs(a - b) <= 5e-2 * abs(a) for a, b in zip(losses["eager"], losses["compiled"]))
    return ok, f"losses eager {losses['eager']} compiled {losses['compiled']}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backends", default="inductor,aot_eager")
    args = parser.parse_args(argv)
    devices, backends = args.devices.split(","), args.backends.split(",")
    if [d for d in devices if d not in ("cpu", "cuda")] or ("cuda" in devices and not torch.cuda.is_available()):
        parser.error(f"--devices {args.devices!r}: use cpu" + (", cuda" if torch.cuda.is_available() else
                                                               " (no CUDA device here)"))
    unknown = [b for b in backends if b not in torch._dynamo.list_backends(exclude_tags=())]
    if unknown:
        parser.error(f"unknown backend(s) {unknown}: use inductor, aot_eager or eager")
    failed = 0
    print(f"torch {torch.__version__}", flush=True)
    for device in devices:
        for backend in backends:
            checks = [(f"op step_grad={g}", lambda g=g: check_op(device, backend, g)) for g in (True, False)]
            checks += [("QuantLinear", lambda: check_layer(device, backend)),
                       ("tiny ViT, 3 steps", lambda: check_training(device, backend))]
            for name, check in checks:
                torch._dynamo.reset()
                ok, detail = check()
                failed += not ok
                print(f"{'ok  ' if ok else 'FAIL'} [{device} {backend}] {name}: {detail}", flush=True)
    print(f"{failed} check(s) failed" if failed else "compiled matches eager", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
