"""Host cost of one quantizer call, forward + backward, on tensors small enough that the call overhead is all there is.

    python benchmarks/quantizer_calls.py                 # CPU, 1 torch thread; writes results/quantizer_calls.json
    python benchmarks/quantizer_calls.py --layers 48 --repeats 200

Weights: ``--layers`` per-channel W4 weights (``--width`` x ``--width``) fake-quantized one quantizer call each
(``LSQQuantizer.forward``: the single-tensor LSQ op) against all of them in one multi-tensor autograd node
(``lsq_fake_quantize_many``, what a quantized model's forward uses for its weights), then one backward through all
outputs. Activations: per-tensor A4 activations (``--tokens`` x ``--width``), one quantizer call each. The two
paths of a row alternate within each repeat (same process, same tensors); the figure is the median over repeats of
(wall time of the repeat / number of tensors), in microseconds; outputs and gradients of the two paths are checked
equal bit for bit first.
"""

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from saq_hf.quant import LSQQuantizer  # noqa: E402
from saq_hf.quant.lsq import lsq_fake_quantize_many  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def weight_quantizers(layers: int, width: int, bits: int = 4):
    generator = torch.Generator().manual_seed(0)
    weights = [(torch.randn(width, width, generator=generator) * 0.05).requires_grad_() for _ in range(layers)]
    quantizers = [LSQQuantizer(bits, signed=True, channel_shape=(width, 1)) for _ in range(layers)]
    for quantizer, weight in zip(quantizers, weights):
        quantizer.initialize_from(weight)
    return quantizers, weights


def one_call_each(quantizers, tensors):
    return [quantizer(tensor) for quantizer, tensor in zip(quantizers, tensors)]


def all_at_once(quantizers, tensors):
    return lsq_fake_quantize_many(tensors, [q.step_size_parameter for q in quantizers],
                                  [q.multi_tensor_spec(t) for q, t in zip(quantizers, tensors)])


def forward_backward(path, quantizers, tensors, grads):
    outputs = path(quantizers, tensors)
    torch.autograd.backward(outputs, grads)
    return outputs


def zero_grads(quantizers, tensors):
    for tensor in tensors:
        tensor.grad = None
    for quantizer in quantizers:
        quantizer.step_size_parameter.grad = None


def check_same_bits(paths: dict, quantizers, tensors, grads) -> None:
    results = []
    for path in paths.values():
        zero_grads(quantizers, tensors)
        outputs = forward_backward(path, quantizers, tensors, grads)
        results.append([o.detach() for o in outputs] + [t.grad for t in tensors]
                       + [q.step_size_parameter.grad for q in quantizers])
    assert all(torch.equal(a, b) for a, b in zip(*results)), "the paths disagree"


def time_paths(paths: dict, quantizers, tensors, grads, repeats: int) -> dict:
    """Median microseconds per tensor of each path, the paths alternating within each repeat."""
    if len(paths) > 1:
        check_same_bits(paths, quantizers, tensors, grads)
    samples = {name: [] for name in paths}
    for repeat in range(repeats + 5):
        order = list(paths.items()) if repeat % 2 == 0 else list(reversed(paths.items()))
        for name, path in order:
            zero_grads(quantizers, tensors)
            start = time.perf_counter()
            forward_backward(path, quantizers, tensors, grads)
            if repeat >= 5:  # warm-up
                samples[name].append(1e6 * (time.perf_counter() - start) / len(tensors))
    return {name: round(statistics.median(values), 1) for name, values in samples.items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=24, help="tensors per row (default 24)")
    parser.add_argument("--width", type=int, default=64, help="weight size width x width, activation width (64)")
    parser.add_argument("--tokens", type=int, default=64, help="activation rows (default 64)")
    parser.add_argument("--repeats", type=int, default=100, help="timed repeats (default 100)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--out", type=Path, default=RESULTS / "quantizer_calls.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    quantizers, weights = weight_quantizers(args.layers, args.width)
    grads = [torch.randn_like(w) for w in weights]
    rows = {"weights": time_paths({"one call each": one_call_each, "all at once": all_at_once}, quantizers, weights,
                                  grads, args.repeats)}
    generator = torch.Generator().manual_seed(1)
    activations = [torch.randn(args.tokens, args.width, generator=generator).requires_grad_()
                   for _ in range(args.layers)]
    act_quantizers = [LSQQuantizer(4, signed=None, is_activation=True) for _ in range(args.layers)]
    for quantizer, x in zip(act_quantizers, activations):
        quantizer.initialize_from(x)
    rows["activations"] = time_paths({"one call each": one_call_each}, act_quantizers, activations,
                                     [torch.randn_like(x) for x in activations], args.repeats)
    command = "python benchmarks/quantizer_calls.py" + (" " + " ".join(sys.argv[1:] if argv is None else argv)).rstrip()
    report = {"command": command, "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s)",
              "torch": torch.__version__, "layers": args.layers, "weight_shape": [args.width, args.width],
              "activation_shape": [args.tokens, args.width], "repeats": args.repeats,
              "microseconds_per_tensor_forward_backward": rows}
    print(f"{command} | torch {torch.__version__} | {report['machine']}")
    for row, paths in rows.items():
        print(f"{row:<12}" + "  ".join(f"{name}: {value:.1f} us" for name, value in paths.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
