"""The LSQ op's C++ CPU kernels (saq_hf/quant/native.py, csrc/lsq_cpu.cpp) give the reference op's bits: every
bit-width, sign and layout of tests/test_fused_quant.py, float32 and float64, ties, clip points and special values,
tasks split across threads and rows; layouts and dtypes they do not take go to the other paths; a failed build warns
once and leaves the op working."""

import os
import warnings

import pytest
import torch

from saq_hf.quant import native
from saq_hf.quant.lsq import lsq_fake_quantize, lsq_fake_quantize_many, quant_range
from test_fused_quant import (LAYOUTS, UnfusedLSQ, assert_double_backward_matches_the_reference, inputs,
                              outputs_and_grads, same_bits)

# Per-tensor activations in channels-last (a convolution's input after a permute), and sizes the kernels split into
# several tasks (32768 elements each) whose edges fall inside rows and vectors.
EXTRA_LAYOUTS = [((4, 8, 5, 5), "channels_last"), ((3, 40001), ()), ((7, 10001), (7, 1))]


def laid_out(shape, step_shape, dtype, seed):
    if step_shape == "channels_last":
        x, step, grad = inputs(shape, (), dtype, seed)
        return x.to(memory_format=torch.channels_last), step, grad.to(memory_format=torch.channels_last)
    return inputs(shape, step_shape, dtype, seed)


@pytest.fixture
def calls(monkeypatch):
    """The names of the C++ functions called."""
    module = native.kernels()
    assert module is not None, "the C++ LSQ kernels did not build on this machine"
    names = []

    class Spy:
        def __getattr__(self, name):
            function = getattr(module, name)
            return lambda *args: names.append(name) or function(*args)

    monkeypatch.setattr(native, "kernels", lambda: Spy())
    return names


def bits(t):
    return t.view(torch.int32 if t.element_size() == 4 else torch.int64)


def assert_same(results, expected, context):
    for name, a, b in zip(("output", "grad x", "grad step"), results, expected):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b)), (name, context)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_cpp_kernels_give_the_reference_bits_at_every_bit_width_and_layout(dtype, calls):
    checked = 0
    for n_bits in range(2, 9):
        for signed in (True, False):
            qn, qp = quant_range(n_bits, signed)
            for seed, (shape, step_shape) in enumerate(LAYOUTS + EXTRA_LAYOUTS):
                x, step, grad = laid_out(shape, step_shape, dtype, seed + 100 * n_bits)
                grad_scale = 1.0 / (x.numel() * qp) ** 0.5
                expected = outputs_and_grads(UnfusedLSQ.apply, x, step, grad, qn, qp, grad_scale)
                calls.clear()
                results = outputs_and_grads(lsq_fake_quantize, x, step, grad, qn, qp, grad_scale)
                assert calls == ["op_forward", "op_backward"], (shape, step_shape)
                assert expected[1].any() and expected[2].any()
                assert_same(results, expected, (n_bits, signed, shape, step_shape))
                if step_shape == "channels_last":
                    assert results[0].is_contiguous(memory_format=torch.channels_last)
                checked += 1
    assert checked == 7 * 2 * len(LAYOUTS + EXTRA_LAYOUTS)


def test_threads_split_the_work_without_changing_a_bit(calls):
    x, step, grad = inputs((7, 10001), (7, 1), torch.float32, 5)
    threads = torch.get_num_threads()
    runs = []
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            runs.append(outputs_and_grads(lsq_fake_quantize, x, step, grad, -8, 7, 0.01))
    finally:
        torch.set_num_threads(threads)
    assert_same(runs[1], runs[0], "1 vs 3 threads")


def test_special_values_get_the_reference_bits(calls):
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, 0.05, -0.05, 0.7, -0.8, 0.75, -0.85, float("inf"), float("-inf"),
                            float("nan"), 1e-40, -1e-40, 3e38, -3e38])
    x = torch.cat([special, torch.randn(100, generator=torch.Generator().manual_seed(0))])
    grad = torch.cat([torch.tensor([float("nan"), float("inf"), -0.0]), torch.randn(x.numel() - 3)])
    for qn, qp in ((-8, 7), (0, 15), (-2, 1)):
        expected = outputs_and_grads(UnfusedLSQ.apply, x, torch.tensor(0.1), grad, qn, qp, 0.5)
        results = outputs_and_grads(lsq_fake_quantize, x, torch.tensor(0.1), grad, qn, qp, 0.5)
        for a, b in zip(results, expected):  # NaN payloads aside, the same values and signs
            assert torch.equal(a.isnan(), b.isnan()) and torch.equal(bits(a)[~a.isnan()], bits(b)[~b.isnan()])


@pytest.mark.parametrize("log_step", [False, True])
@pytest.mark.parametrize("step_grad", [True, False])
def test_without_the_step_grad_or_with_a_log_step_size_the_same_bits(step_grad, log_step, calls):
    for seed, (shape, step_shape) in enumerate(LAYOUTS + EXTRA_LAYOUTS):
        x, step, grad = laid_out(shape, step_shape, torch.float32, seed)
        param = step.log() if log_step else step
        runs = []
        for path in ("reference", "native"):
            xs, ps = x.clone().requires_grad_(), param.clone().requires_grad_()
            if path == "reference":
                out = UnfusedLSQ.apply(xs, ps.exp() if log_step else ps, -4, 3, 0.1)
            else:
                out = lsq_fake_quantize(xs, ps, -4, 3, 0.1, step_grad, log_step)
            out.backward(grad)
            runs.append((out.detach(), xs.grad, ps.grad))
        expected = runs[0] if step_grad else (*runs[0][:2], torch.zeros_like(param))
        assert_same(runs[1], expected, (shape, step_shape))
    assert calls.count("op_backward") == len(LAYOUTS + EXTRA_LAYOUTS)


def test_many_tensors_take_one_cpp_call_per_direction_with_the_reference_bits(calls):
    xs, steps, specs, grads = [], [], [], []
    for seed, (shape, step_shape) in enumerate(LAYOUTS + EXTRA_LAYOUTS):
        x, step, grad = laid_out(shape, step_shape, torch.float32, seed)
        xs.append(x), steps.append(step.log()), grads.append(grad)
        specs.append((-4, 3, 0.1, True, True))
    leaves = [x.clone().requires_grad_() for x in xs] + [s.clone().requires_grad_() for s in steps]
    outputs = lsq_fake_quantize_many(leaves[:len(xs)], leaves[len(xs):], specs)
    torch.autograd.backward(outputs, grads)
    assert calls == ["op_forward_many", "op_backward_many"]
    for i, (x, step, grad) in enumerate(zip(xs, steps, grads)):
        expected = outputs_and_grads(lambda x, s, *a: UnfusedLSQ.apply(x, s.exp(), *a), x, step, grad, -4, 3, 0.1)
        assert_same((outputs[i].detach(), leaves[i].grad, leaves[len(xs) + i].grad), expected, i)


def test_what_the_kernels_do_not_take_runs_the_other_paths_with_the_reference_bits(calls):
    x, step, grad = inputs((6, 40), (), torch.float32, 1)
    channels_last = lambda t: t.contiguous(memory_format=torch.channels_last)  # noqa: E731
    x4, step4, grad4 = inputs((4, 8, 5, 5), (), torch.float32, 4)
    sliced = lambda t: torch.cat([t, t], dim=1)[:, ::2]  # noqa: E731 - built in the graph (a clone is contiguous)
    cases = {  # a sum over another layout adds in another order: torch ops decide the bits there
        "transposed x": (x.t(), step, grad.t().contiguous(), None),
        "sliced x (ViT's class token)": (x, step, grad, sliced),
        "an activation's gradient in another layout": (x4, step4, channels_last(grad4), None),
        "channels-last x, contiguous gradient": (channels_last(x4), step4, grad4, None),
        "bfloat16": (x.bfloat16(), step.bfloat16(), grad.bfloat16(), None),
        "step size broadcast along the last dim": (x[:, :6], torch.rand(1, 6) * 0.1 + 0.01, grad[:, :6], None),
    }
    for name, (x_, step_, grad_, prepare) in cases.items():
        calls.clear()
        functions = [UnfusedLSQ.apply, lsq_fake_quantize]
        if prepare is not None:
            functions = [lambda x, *a, _f=f: _f(prepare(x), *a) for f in functions]
        expected = outputs_and_grads(functions[0], x_, step_, grad_, -8, 7, 0.1)
        results = outputs_and_grads(functions[1], x_, step_, grad_, -8, 7, 0.1)
        assert all(same_bits(a, b) for a, b in zip(results, expected)), name
        assert "op_backward" not in calls, name


def test_a_weight_gradient_in_another_layout_is_copied_into_the_weight_s(calls):
    # A Linear weight's gradient arrives as a transposed view: in the weights' node it reaches only the leaf (whose
    # .grad autograd lays out like the weight), so the kernels take it, copied.
    x, step, grad = inputs((24, 40), (24, 1), torch.float32, 3)
    grad = grad.t().contiguous().t()
    leaves = [x.clone().requires_grad_(), step.log().requires_grad_()]
    out = lsq_fake_quantize_many(leaves[:1], leaves[1:], [(-8, 7, 0.1, True, True)])
    torch.autograd.backward(out, [grad])
    assert calls == ["op_forward_many", "op_backward_many"]
    expected = outputs_and_grads(lambda x, s, *a: UnfusedLSQ.apply(x, s.exp(), *a), x, step.log(), grad, -8, 7, 0.1)
    assert_same((out[0].detach(), leaves[0].grad, leaves[1].grad), expected, "transposed weight gradient")


def test_double_backward_takes_the_differentiable_ops(calls):
    assert_double_backward_matches_the_reference()
    assert calls == ["op_forward"]  # the backward ran as torch ops, so it could be differentiated again


def test_a_failed_build_warns_once_and_the_op_still_gives_the_reference_bits(monkeypatch):
    monkeypatch.setattr(native, "_state", {})

    def fail():
        raise OSError("no C++ compiler")

    monkeypatch.setattr(native, "_build", fail)
    x, step, grad = inputs((6, 40), (), torch.float32, 2)
    expected = outputs_and_grads(UnfusedLSQ.apply, x, step, grad, -8, 7, 0.1)
    with pytest.warns(UserWarning, match="could not be built.*no C\\+\\+ compiler"):
        results = outputs_and_grads(lsq_fake_quantize, x, step, grad, -8, 7, 0.1)
    assert all(same_bits(a, b) for a, b in zip(results, expected))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        outputs_and_grads(lsq_fake_quantize, x, step, grad, -8, 7, 0.1)


def test_the_environment_variable_turns_them_off(monkeypatch):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native, "_build", lambda: pytest.fail("built although turned off"))
    monkeypatch.setenv("SAQ_HF_NATIVE_KERNELS", "0")
    assert native.kernels() is None
    x, step, grad = inputs((6, 40), (), torch.float32, 2)
    expected = outputs_and_grads(UnfusedLSQ.apply, x, step, grad, -8, 7, 0.1)
    assert all(same_bits(a, b) for a, b in zip(outputs_and_grads(lsq_fake_quantize, x, step, grad, -8, 7, 0.1),
                                               expected))


def test_the_kernels_build_from_the_shipped_source_into_an_empty_cache_once(tmp_path, monkeypatch):
    # A real build (about 20 s): the C++ source in the package compiles and gives the reference bits.
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_state", {})
    # A name of its own: torch renames a second build of a name this process built already (name_v1).
    name = f"saq_hf_lsq_cpu_build_test_{os.getpid()}"
    monkeypatch.setattr(native, "module_name", lambda: name)
    # What a build killed halfway leaves (its own temporary folder, ninja's lock in it) blocks nothing.
    stale = tmp_path / "saq_hf" / f".{name}-killed"
    stale.mkdir(parents=True)
    (stale / "lock").touch()
    module = native.kernels()
    assert module is not None
    cached = tmp_path / "saq_hf" / f"{name}.so"
    assert cached.is_file()
    assert sorted(p.name for p in cached.parent.iterdir()) == sorted([cached.name, stale.name])  # nothing else left
    x, step, grad = inputs((6, 40), (6, 1), torch.float32, 9)
    expected = outputs_and_grads(UnfusedLSQ.apply, x, step, grad, -8, 7, 0.1)
    monkeypatch.setattr(native, "kernels", lambda: module)
    assert_same(outputs_and_grads(lsq_fake_quantize, x, step, grad, -8, 7, 0.1), expected, "fresh build")
    # Another process loads the cached library without compiling.
    monkeypatch.setattr(native, "_compile", lambda *a: pytest.fail("compiled again although cached"))
    imported = []
    load = native._import
    monkeypatch.setattr(native, "_import", lambda name, path: imported.append(path) or load(name, path))
    again = native._build()
    assert imported == [cached]
    assert torch.equal(again.forward(x, step, -8, 7), module.forward(x, step, -8, 7))


def test_a_renamed_second_build_is_used_but_not_cached_under_the_name(tmp_path, monkeypatch):
    # torch names a second build of one name in one process name_v1: its library would not import as `name`.
    import types

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    renamed = types.SimpleNamespace(__name__=f"{native.module_name()}_v1", __file__=str(tmp_path / "elsewhere.so"))
    monkeypatch.setattr(native, "_compile", lambda name, build_dir: renamed)
    assert native._build() is renamed
    assert [p.name for p in (tmp_path / "saq_hf").iterdir()] == []  # nothing cached, no temporary left
