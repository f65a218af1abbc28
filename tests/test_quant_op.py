"""The LSQ op's eager fast path for small tensors gives the bits of the reference op: the STE mask written straight
into the input's dtype, the log step size exponentiated inside the op (one autograd node less), and the retuned sizes
below which the backward runs as plain ops instead of a compiled kernel.

CPU always; with CUDA the same checks run on the GPU, with fp16 too.
"""

import pytest
import torch

from saq_hf.quant import LSQQuantizer, lsq, native
from saq_hf.quant.lsq import lsq_fake_quantize, quant_range
from test_fused_quant import CASES, LAYOUTS, UnfusedLSQ, inputs, no_native, outputs_and_grads, same_bits  # noqa: F401

IDS = [f"{d}-{str(t)[6:]}" for d, t in CASES]
# Between the sizes where the backward used to take the compiled kernel (2^14) and where it does now.
MID_SIZED = [((128, 200), ()), ((128, 200), (128, 1))]


def assert_same(results, expected, context):
    for name, a, b in zip(("output", "grad x", "grad step"), results, expected):
        assert same_bits(a, b), (name, context, (a != b).sum().item())


@pytest.mark.parametrize("device,dtype", CASES, ids=IDS)
def test_plain_ops_are_bit_identical_to_the_reference_at_every_bit_width(device, dtype, no_native):
    # The sizes here stay below every fused threshold: the eager plain ops, mask and all, against the reference.
    for shape, _ in LAYOUTS + MID_SIZED:
        assert torch.Size(shape).numel() < min(lsq._FUSED_MIN_NUMEL.values())
    for bits in range(2, 9):
        for signed in (True, False):
            qn, qp = quant_range(bits, signed)
            for seed, (shape, step_shape) in enumerate(LAYOUTS + MID_SIZED):
                x, step, grad = inputs(shape, step_shape, dtype, seed + 100 * bits, device)
                grad_scale = 1.0 / (x.numel() * qp) ** 0.5
                expected = outputs_and_grads(UnfusedLSQ.apply, x, step, grad, qn, qp, grad_scale)
                results = outputs_and_grads(lsq_fake_quantize, x, step, grad, qn, qp, grad_scale)
                assert expected[1].any() and expected[2].any()
                assert_same(results, expected, (bits, signed, shape, step_shape))


@pytest.mark.parametrize("device,dtype", CASES, ids=IDS)
def test_the_mask_written_into_the_dtype_is_the_comparison_converted(device, dtype):
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 7.0, -8.0, 7.5, -8.5, float("inf"), float("-inf"),
                            float("nan"), 1e-30, -1e-30])
    scaled = torch.cat([special, torch.randn(500, generator=torch.Generator().manual_seed(0)) * 6]).to(dtype)
    scaled = scaled.to(device)
    for qn, qp in ((-8, 7), (0, 15), (-2, 1)):
        clipped = torch.clamp(scaled, qn, qp)
        mask = lsq._inside(clipped, scaled)
        assert same_bits(mask, (clipped == scaled).to(dtype))
        assert 0 < mask.sum() < mask.numel()


@pytest.mark.parametrize("device,dtype", CASES, ids=IDS)
@pytest.mark.parametrize("path", ["plain", "fused", "native"])
def test_a_log_step_size_inside_the_op_gives_the_bits_of_exp_before_it(device, dtype, path, monkeypatch):
    if path != "native":
        monkeypatch.setattr(native, "kernels", lambda: None)
    if path == "fused":
        monkeypatch.setattr(lsq, "_FUSED_MIN_NUMEL", dict.fromkeys(lsq._FUSED_MIN_NUMEL, 0))
    for bits in (2, 4, 8):
        for signed in (True, False):
            qn, qp = quant_range(bits, signed)
            for seed, (shape, step_shape) in enumerate(LAYOUTS):
                x, step, grad = inputs(shape, step_shape, dtype, seed + 100 * bits, device)
                log = step.log()
                for step_grad in (True, False):
                    runs = []
                    for fold in (False, True):
                        xs, ls = x.clone().requires_grad_(), log.clone().requires_grad_()
                        out = (lsq_fake_quantize(xs, ls, qn, qp, 0.1, step_grad, log_step=True) if fold
                               else lsq_fake_quantize(xs, ls.exp(), qn, qp, 0.1, step_grad))
                        # The folded op's node takes the log step size itself: no exp node between them.
                        assert (type(out.grad_fn.next_functions[1][0]).__name__ == "AccumulateGrad") == fold
                        out.backward(grad)
                        runs.append((out.detach(), xs.grad, ls.grad))
                    assert_same(runs[1], runs[0], (bits, signed, shape, step_shape, step_grad))
                    assert runs[0][1].any() and bool(runs[0][2].any()) == step_grad
    if path == "fused":
        assert not lsq._compiler_failed


@pytest.mark.parametrize("step_shape", [(), (8, 1)], ids=["per-tensor", "per-channel"])
def test_double_backward_through_a_log_step_size_inside_the_op_matches_exp_before_it(step_shape):
    # What a Hessian-vector product w.r.t. a layer's input (saq_hf.search, saq_hf.landscape) differentiates: x's
    # gradient, w.r.t. x and (through the forward) the step size. (The step size's own gradient is not
    # differentiable on either path: its terms are computed in place.)
    x, step, _ = inputs((8, 24), step_shape, torch.float64, 3)
    results = []
    for fold in (False, True):
        xs, log = x.clone().requires_grad_(), step.log().requires_grad_()
        out = (lsq_fake_quantize(xs * xs, log, -8, 7, 0.1, log_step=True) if fold
               else lsq_fake_quantize(xs * xs, log.exp(), -8, 7, 0.1))
        (g_x,) = torch.autograd.grad((out * out).sum(), xs, create_graph=True)
        gg_x, gg_log = torch.autograd.grad(g_x.square().sum(), (xs, log))
        results.append((g_x.detach(), gg_x, gg_log))
    assert results[0][2].abs().sum() > 0 and results[0][1].abs().sum() > 0
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["activation", "weight"])
def test_a_quantizer_in_log_form_folds_exp_into_its_op_with_the_same_bits(kind, dtype):
    generator = torch.Generator().manual_seed(7)
    x = (torch.randn(6, 16, 12, generator=generator) * 0.5).to(dtype)
    if kind == "activation":
        quantizer = LSQQuantizer(4, signed=None, is_activation=True, dtype=dtype)
    else:
        quantizer = LSQQuantizer(3, signed=True, channel_shape=(6, 1, 1), dtype=dtype)
    quantizer.initialize_from(x)
    qn, qp = quantizer.qrange()
    grad = torch.randn(x.shape, generator=generator).to(dtype)
    runs = []
    for fold in (True, False):
        xs = x.clone().requires_grad_()
        quantizer.zero_grad()
        out = (quantizer(xs) if fold else
               lsq_fake_quantize(xs, quantizer.step_size.to(dtype), qn, qp, quantizer._grad_scale(xs, qp)))
        assert (type(out.grad_fn.next_functions[1][0]).__name__ == "AccumulateGrad") == fold
        out.backward(grad)
        runs.append((out.detach(), xs.grad, quantizer.log_step_size.grad.clone()))
    assert_same(runs[0], runs[1], (kind, dtype))
    assert runs[0][2].any()


def test_a_quantizer_whose_step_size_has_another_dtype_keeps_exp_and_the_cast_before_the_op():
    quantizer = LSQQuantizer(4, signed=None, is_activation=True)  # fp32 step size, bf16 input (autocast)
    x = torch.randn(4, 32).to(torch.bfloat16).requires_grad_()
    quantizer.initialize_from(x)
    out = quantizer(x)
    out.float().sum().backward()
    assert type(out.grad_fn.next_functions[1][0]).__name__ == "ToCopyBackward0"
    assert quantizer.log_step_size.grad.dtype == torch.float32 and quantizer.log_step_size.grad != 0

