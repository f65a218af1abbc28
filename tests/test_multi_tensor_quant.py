"""A model's weights fake-quantized all at once (one autograd node, multi-tensor kernels) give bit for bit the outputs
and gradients of one LSQ op call per weight, and a quantized model's forward uses that path for its weights."""

import copy
import weakref

import pytest
import torch
from transformers import ConvNextConfig, ConvNextForImageClassification, ViTConfig, ViTForImageClassification

from saq_hf import QuantConfig, quantize_model
from saq_hf.quant import lsq, native, perturb_quantized_weights, quantized_layers
from saq_hf.quant.lsq import lsq_fake_quantize, lsq_fake_quantize_many, quant_range
from test_fused_quant import CASES, LAYOUTS, inputs, same_bits


def single_calls(xs, params, specs):
    """The reference: one ``lsq_fake_quantize`` call per tensor, the step size as LSQQuantizer.forward builds it."""
    return [lsq_fake_quantize(x, p.exp() if log else p, qn, qp, scale, step_grad)
            for x, p, (qn, qp, scale, step_grad, log) in zip(xs, params, specs)]


def outputs_and_grads(function, xs, params, specs, grads, used):
    xs = [x.clone().requires_grad_() for x in xs]
    params = [p.clone().requires_grad_() for p in params]
    outputs = function(xs, params, specs)
    torch.autograd.backward([outputs[i] for i in used], [grads[i] for i in used])
    return [o.detach() for o in outputs], [x.grad for x in xs], [p.grad for p in params]


def tensor_set(dtype, device, bits, signed, seed):
    """Every layout of tests/test_fused_quant.py, each with log and linear step sizes, with and without the step
    size's gradient."""
    qn, qp = quant_range(bits, signed)
    xs, params, specs, grads = [], [], [], []
    for index, (shape, step_shape) in enumerate(LAYOUTS):
        x, step, grad = inputs(shape, step_shape, dtype, seed + index, device)
        for log in (True, False):
            for step_grad in (True, False):
                xs.append(x)
                params.append(step.log() if log else step)
                specs.append((qn, qp, 1.0 / (x.numel() * qp) ** 0.5, step_grad, log))
                grads.append(grad)
    return xs, params, specs, grads


def assert_same(a, b, what):
    for name, left, right in zip(("output", "grad x", "grad step"), a, b):
        for i, (u, v) in enumerate(zip(left, right)):
            if u is None or v is None:
                assert u is None and v is None, (what, name, i)
            else:
                assert same_bits(u, v), (what, name, i, (u != v).sum().item())


@pytest.mark.parametrize("device,dtype", CASES, ids=[f"{d}-{str(t)[6:]}" for d, t in CASES])
@pytest.mark.parametrize("sizes", ["native", "as_configured", "one_at_a_time", "all_together"])
def test_many_tensors_at_once_are_bit_identical_to_one_op_call_each(device, dtype, sizes, monkeypatch):
    # native: float32 on a CPU takes the C++ kernels (one call per direction for all tensors, each with the same
    # kernels as a single op call); with them off: as_configured: these small tensors take the multi-tensor ops
    # (forward and backward); one_at_a_time: every tensor takes the single-tensor path inside the multi-tensor node
    # (what large tensors do on a CPU); all_together: the multi-tensor ops whatever the size.
    if sizes != "native":
        monkeypatch.setattr(native, "kernels", lambda: None)
    if sizes not in ("native", "as_configured"):
        monkeypatch.setattr(lsq, "_one_at_a_time", lambda fn_name, x: sizes == "one_at_a_time")
    checked = 0
    for bits in range(2, 9):
        for signed in (True, False):
            xs, params, specs, grads = tensor_set(dtype, device, bits, signed, 100 * bits + signed)
            used = range(len(xs))
            expected = outputs_and_grads(single_calls, xs, params, specs, grads, used)
            together = outputs_and_grads(lsq_fake_quantize_many, xs, params, specs, grads, used)
            assert_same(together, expected, (bits, signed))
            checked += len(xs)
    assert checked == 7 * 2 * len(LAYOUTS) * 4


def test_the_multi_tensor_path_really_runs_the_multi_tensor_ops(monkeypatch):
    monkeypatch.setattr(native, "kernels", lambda: None)  # the path where the C++ kernels cannot be built
    xs, params, specs, grads = tensor_set(torch.float32, "cpu", 4, True, 0)
    calls = []
    for name in ("_foreach_fake_quantize", "_foreach_fake_quantize_grads", "_lsq_grads", "_run"):
        original = getattr(lsq, name)
        monkeypatch.setattr(lsq, name, lambda *a, _o=original, _n=name, **k: calls.append(_n) or _o(*a, **k))
    outputs_and_grads(lsq_fake_quantize_many, xs, params, specs, grads, range(len(xs)))
    # One forward, one backward per step_grad group; no per-tensor op.
    assert sorted(calls) == ["_foreach_fake_quantize", "_foreach_fake_quantize_grads", "_foreach_fake_quantize_grads"]


def test_outputs_nobody_used_give_their_inputs_no_gradient():
    xs, params, specs, grads = tensor_set(torch.float32, "cpu", 4, True, 1)
    used = [0, 3, 5]
    outputs, grad_x, grad_step = outputs_and_grads(lsq_fake_quantize_many, xs, params, specs, grads, used)
    expected = outputs_and_grads(single_calls, xs, params, specs, grads, used)
    assert [i for i, g in enumerate(grad_x) if g is not None] == used
    assert [i for i, g in enumerate(grad_step) if g is not None] == used
    assert_same((outputs, grad_x, grad_step), expected, "partly used")


def test_double_backward_through_many_tensors_matches_one_op_call_each():
    x, step, _ = inputs((4, 32), (4, 1), torch.float32, 0)
    spec = [(-8, 7, 0.1, True, True), (0, 15, 0.2, True, False)]
    results = []
    for function in (single_calls, lsq_fake_quantize_many):
        xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
        outputs = function([xs[0] * xs[0], xs[1] * xs[1]], [step.log(), step], spec)
        grads = torch.autograd.grad(sum(o.sum() for o in outputs), xs, create_graph=True)
        second = torch.autograd.grad(sum(g.sum() for g in grads), xs)
        results.append([g.detach() for g in grads] + list(second))
    assert all(torch.equal(a, b) for a, b in zip(*results))


def tiny_vit():
    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=2,
                                               num_attention_heads=2, intermediate_size=32, num_labels=3))


def tiny_convnext():
    torch.manual_seed(0)
    return ConvNextForImageClassification(ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1],
                                                         num_labels=3, image_size=16))


def without_weights_together(model):
    """A copy of ``model`` whose layers quantize their own weights (the hooks ``convert_layers`` set up removed)."""
    twin = copy.deepcopy(model)
    twin._forward_pre_hooks.clear()
    twin._forward_hooks.clear()
    return twin


def nodes(output):
    """Names of every autograd node behind ``output``."""
    seen, stack, names = set(), [output.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize("make", [tiny_vit, tiny_convnext], ids=["vit", "convnext"])
@pytest.mark.parametrize("step_size_grad", [True, False])
def test_a_quantized_model_quantizes_its_weights_in_one_node_to_the_same_bits(make, step_size_grad):
    model = quantize_model(make(), QuantConfig(w_bits=4, a_bits=4))
    pixels = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(pixel_values=pixels)  # LSQ initialisation of the activation step sizes
    for _, layer in quantized_layers(model):
        layer.weight_quantizer.step_size_grad = step_size_grad  # as SAQ's descent pass sets it
    reference = without_weights_together(model)
    results = []
    for m in (model, reference):
        logits = m(pixel_values=pixels).logits
        names = nodes(logits)
        logits.square().sum().backward()
        results.append((logits.detach(), {n: p.grad for n, p in m.named_parameters()}, names))
    (logits, grads, names), (ref_logits, ref_grads, ref_names) = results
    assert same_bits(logits, ref_logits)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert (grads[name] is None) == (ref_grads[name] is None), name
        assert grads[name] is None or same_bits(grads[name], ref_grads[name]), name
    layers = len(list(quantized_layers(model)))
    assert names.count("_LSQFakeQuantizeManyBackward") == 1
    assert names.count("_LSQFakeQuantizeBackward") == ref_names.count("_LSQFakeQuantizeBackward") - layers
    # The pass is over: the layers quantize their weights themselves again (a recompute during backward, a norm).
    assert all(layer._pass_quantized_weight is None for _, layer in quantized_layers(model))


def test_layers_the_multi_tensor_path_cannot_compute_keep_their_own_quantizer_call():
    model = quantize_model(tiny_vit(), QuantConfig(w_bits=4, a_bits=4))
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        model(pixel_values=pixels)
    layers = [layer for _, layer in quantized_layers(model)]
    seen = []
    layers[0].weight_quantizer.register_forward_hook(lambda *args: seen.append(1))
    model(pixel_values=pixels)
    assert seen == [1]  # a module hook on a weight quantizer still runs
    assert layers[0].weight_quantizer.multi_tensor_spec(layers[0].weight) is None
    assert layers[1].weight_quantizer.multi_tensor_spec(layers[1].weight) is not None


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("marked", [True, False], ids=["marked", "unmarked"])
def test_layers_under_activation_checkpointing_quantize_their_own_weights(reentrant, marked):
    # A recompute during backward reruns a checkpointed layer after the pass is over; non-reentrant checkpointing also
    # requires the recompute to save the tensors the first forward saved. Marked regions are left out of the
    # multi-tensor call; an unmarked torch.utils.checkpoint region is detected by its saved-tensor hooks.
    from torch.utils.checkpoint import checkpoint

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.block, self.head = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh()), torch.nn.Linear(8, 3)
            if marked:
                self.block.gradient_checkpointing = True

        def forward(self, x):
            return self.head(checkpoint(self.block, x, use_reentrant=reentrant))

    model = quantize_model(Net(), QuantConfig(w_bits=4, a_bits=4, bits_overrides={}))
    x = torch.randn(5, 8, requires_grad=True)
    with torch.no_grad():
        model(x)
    reference = without_weights_together(model)
    results = []
    for m in (model, reference):
        out = m(x)
        out.square().sum().backward()
        results.append([out.detach()] + [p.grad for p in m.parameters()])
    assert all(same_bits(a, b) for a, b in zip(*results))


def test_a_perturbed_pass_frees_each_quantized_weight_once_its_layer_ran():
    # Q(w) + ε is what the layer saves for backward; Q(w) itself must not stay alive to the end of the pass (that was a
    # second copy of every weight at SAQ's peak). Checked from inside the pass, in the last layer's forward.
    model = quantize_model(tiny_vit(), QuantConfig(w_bits=4, a_bits=4))
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(pixel_values=pixels)
    layers = [layer for _, layer in quantized_layers(model)]
    refs = {}
    model.register_forward_pre_hook(
        lambda module, args: refs.update({layer: weakref.ref(layer._pass_quantized_weight) for layer in layers}))
    alive_in_last_layer = []
    layers[-1].register_forward_hook(
        lambda *args: alive_in_last_layer.extend(layer for layer in layers[:-1] if refs[layer]() is not None))
    epsilons = {layer: torch.full_like(layer.weight, 1e-3) for layer in layers}
    with perturb_quantized_weights(epsilons):
        model(pixel_values=pixels).logits.sum().backward()
    assert len(refs) == len(layers) and not alive_in_last_layer


def test_a_layer_run_twice_in_one_pass_gets_the_same_bits_as_without_the_multi_tensor_path():
    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.shared, self.head = torch.nn.Linear(6, 6), torch.nn.Linear(6, 3)

        def forward(self, x):
            return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))

    model = quantize_model(Twice(), QuantConfig(w_bits=3, a_bits=4, bits_overrides={}))
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(x)
    results = []
    for m in (model, without_weights_together(model)):
        out = m(x)
        out.square().sum().backward()
        results.append([out.detach()] + [p.grad for p in m.parameters()])
    assert all(same_bits(a, b) for a, b in zip(*results))
