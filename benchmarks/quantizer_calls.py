"""Host cost of one quantizer call, forward + backward, on tensors small enough that the call overhead is all there is.

    python benchmarks/quantizer_calls.py                 # CPU, 1 torch thread; writes results/quantizer_calls.json
    python benchmarks/quantizer_calls.py --layers 48 --repeats 200
    python benchmarks/quantizer_calls.py --repeats 5 --out /tmp/quantizer_calls.json   # a smoke run

Weights: ``--layers`` per-channel W4 weights (``--width`` x ``--width``) fake-quantized one quantizer call each
(``LSQQuantizer.forward``: the single-tensor LSQ op) against all of them in one multi-tensor autograd node
(``lsq_fake_quantize_many``, what a quantized model's forward uses for its weights), then one backward through all
outputs. Activations: per-tensor A4 activations (``--tokens`` x ``--width``), one quantizer call each, against the
previous eager op (``exp`` of the log step size as its own autograd node before the op, and the STE mask as a
comparison then a conversion); one backward through all outputs. Activation chain: the same quantizers applied one
after another to one tensor (as in a model's graph, where each call's backward waits for the next one's), one
backward at the end, against the previous op and against ``h * s`` (one differentiable elementwise op with a learned
scalar) in the same chain; the ratios to ``h * s`` say how far the quantizer is from the cheapest differentiable
call. The paths of a row alternate within each repeat (same process, same tensors); the figure is the median over
repeats of (wall time of the repeat / number of calls), in microseconds; outputs and gradients of the quantizer paths
are checked equal bit for bit first.
"""

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from saq_hf.quant import LSQQuantizer, lsq  # noqa: E402
from saq_hf.quant.lsq import lsq_fake_quantize, lsq_fake_quantize_many  # noqa: E402

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


@contextlib.contextmanager
def previous_mask():
    """The STE mask as the eager op computed it before: a comparison, then a conversion to the input's dtype."""
    inside = lsq._inside
    lsq._inside = lambda clipped, scaled: (clipped == scaled).to(scaled.dtype)
    try:
        yield
    finally:
        lsq._inside = inside


def previous_op(quantizer, x):
    """``quantizer(x)`` as the eager op computed it before: ``exp`` of the log step size its own autograd node."""
    qn, qp = quantizer.qrange()
    return lsq_fake_quantize(x, quantizer.step_size.to(x.dtype), qn, qp, quantizer._grad_scale(x, qp),
                             quantizer.step_size_grad)


def previous_each(quantizers, tensors):
    with previous_mask():
        return [previous_op(quantizer, tensor) for quantizer, tensor in zip(quantizers, tensors)]


def chained(call):
    def path(quantizers, tensors):
        h = tensors[0]
        for quantizer in quantizers:
            h = call(quantizer, h)
        return [h]
    return path


def previous_chain(quantizers, tensors):
    with previous_mask():
        return chained(previous_op)(quantizers, tensors)


def scaled_chain(scales):
    """``h * s`` for each learned scalar ``s`` of ``scales`` in turn: the cheapest differentiable call to set beside."""
    def path(quantizers, tensors):
        h = tensors[0]
        for scale in scales:
            h = h * scale
        return [h]
    return path


def forward_backward(path, quantizers, tensors, grads):
    outputs = path(quantizers, tensors)
    with previous_mask() if path in (previous_each, previous_chain) else contextlib.nullcontext():
        torch.autograd.backward(outputs, grads)
    return outputs


def zero_grads(quantizers, tensors, extra=()):
    for tensor in [*tensors, *extra]:
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


def time_paths(paths: dict, quantizers, tensors, grads, repeats: int, calls: int | None = None,
               others: dict | None = None) -> dict:
    """Median microseconds per call (``calls``, default one per tensor) of each path, the paths alternating within
    each repeat; ``paths`` are checked to give the same bits first, ``others`` (name -> (path, their leaves)) not."""
    if len(paths) > 1:
        check_same_bits(paths, quantizers, tensors, grads)
    everything = {name: (path, ()) for name, path in paths.items()} | (others or {})
    samples = {name: [] for name in everything}
    for repeat in range(repeats + 5):
        order = list(everything.items()) if repeat % 2 == 0 else list(reversed(everything.items()))
        for name, (path, leaves) in order:
            zero_grads(quantizers, tensors, leaves)
            start = time.perf_counter()
            forward_backward(path, quantizers, tensors, grads)
            if repeat >= 5:  # warm-up
                samples[name].append(1e6 * (time.perf_counter() - start) / (calls or len(tensors)))
    return {name: round(statistics.median(values), 1) for name, values in samples.items()}


def activation_chain(layers: int, tokens: int, width: int, repeats: int) -> dict:
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(tokens, width, generator=generator).requires_grad_()
    quantizers, h = [], x.detach()
    with torch.no_grad():
        for _ in range(layers):
            quantizers.append(LSQQuantizer(4, signed=None, is_activation=True))
            quantizers[-1].initialize_from(h)
            h = quantizers[-1](h) + torch.randn(h.shape, generator=generator) * 0.1  # keep every step size busy
    scales = [torch.ones((), requires_grad=True) for _ in range(layers)]
    row = time_paths({"quantizer": chained(lambda q, h: q(h)), "previous op": previous_chain}, quantizers, [x],
                     [torch.randn(x.shape, generator=generator)], repeats, calls=layers,
                     others={"x * s": (scaled_chain(scales), scales)})
    row["quantizer / x * s"] = round(row["quantizer"] / row["x * s"], 2)
    row["previous op / x * s"] = round(row["previous op"] / row["x * s"], 2)
    return row


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
    rows["activations"] = time_paths({"one call each": one_call_each, "previous op": previous_each}, act_quantizers,
                                     activations, [torch.randn_like(x) for x in activations], args.repeats)
    rows["activation chain"] = activation_chain(args.layers, args.tokens, args.width, args.repeats)
    command = "python benchmarks/quantizer_calls.py" + (" " + " ".join(sys.argv[1:] if argv is None else argv)).rstrip()
    report = {"command": command, "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s)",
              "torch": torch.__version__, "layers": args.layers, "weight_shape": [args.width, args.width],
              "activation_shape": [args.tokens, args.width], "repeats": args.repeats,
              "microseconds_per_call_forward_backward": rows}
    print(f"{command} | torch {torch.__version__} | {report['machine']}")
    for row, paths in rows.items():
        print(f"{row:<17}" + "  ".join(f"{name}: {value:.1f}" + ("x" if "/" in name else " us")
                                        for name, value in paths.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
