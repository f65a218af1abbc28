"""``SAQTrainingArguments(torch_compile=True)``: same losses as eager, no graph breaks, no recompiles after warm-up.

Inductor compiles take tens of seconds on a CPU, so one run uses it (QAT on a 1-layer ViT); the others,
the SAQ steps among them (the ascent graph with ``Q(w)`` probes, the descent graph with ε), use the
``aot_eager`` backend, which runs dynamo and AOTAutograd exactly as Inductor would see them (graph breaks
and recompiles are decided there) but executes the captured graph with eager kernels.
"""

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import (
    ConvNextConfig,
    ConvNextForImageClassification,
    TrainerCallback,
    ViTConfig,
    ViTForImageClassification,
)

from conftest import NUM_LABELS, ToyImages
from saq_hf import QuantConfig, SAQTrainer, SAQTrainingArguments, quantize_model

STEPS, WARMUP_STEPS = 6, 3


def one_layer_vit():
    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=1,
                                               num_attention_heads=2, intermediate_size=32, num_labels=NUM_LABELS))


def one_stage_convnext():
    torch.manual_seed(0)
    return ConvNextForImageClassification(ConvNextConfig(num_stages=1, hidden_sizes=[8], depths=[1],
                                                         num_labels=NUM_LABELS, image_size=16))


MODELS = {"vit": one_layer_vit, "convnext": one_stage_convnext}


class CompileCounters(TrainerCallback):
    """Dynamo's graph-break and graph counters, read at the end of warm-up and of training."""

    def __init__(self):
        self.after_warmup = None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == WARMUP_STEPS:
            self.after_warmup = counters["stats"]["unique_graphs"]


def train(tmp_path, arch, compiled, backend="inductor", **fields):
    model = quantize_model(MODELS[arch](), QuantConfig(w_bits=4, a_bits=4))
    args = SAQTrainingArguments(output_dir=str(tmp_path / f"{arch}-{compiled}"), max_steps=STEPS, learning_rate=1e-3,
                                per_device_train_batch_size=8, logging_steps=1, report_to=[], use_cpu=True, seed=0,
                                save_strategy="no", disable_tqdm=True, torch_compile=compiled,
                                torch_compile_backend=backend if compiled else None,
                                **{"saq_start_ratio": 0.0, **fields})  # SAQ from step 0 on these untrained models
    callback = CompileCounters()
    trainer = SAQTrainer(model=model, args=args, train_dataset=ToyImages(8 * STEPS), callbacks=[callback])
    torch._dynamo.reset()  # a model of the same structure would reuse an earlier test's graphs
    counters.clear()
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, callback.after_warmup, counters["stats"]["unique_graphs"], dict(counters["graph_break"])


def assert_compiled_run_matches_eager(tmp_path, arch, backend, **fields):
    eager, *_ = train(tmp_path, arch, False, **fields)
    compiled, graphs_after_warmup, graphs, graph_breaks = train(tmp_path, arch, True, backend=backend, **fields)
    assert graph_breaks == {}
    assert graphs_after_warmup >= 1 and graphs == graphs_after_warmup, "recompiled after warm-up"
    # The first step is the same computation; later steps drift by the rare rounding flip a last-bit
    # difference in a step size causes (Inductor's reductions sum in another order).
    assert compiled[0] == pytest.approx(eager[0], rel=1e-5)
    assert compiled == pytest.approx(eager, rel=1e-2)


def test_compiled_qat_step_matches_eager_with_inductor(tmp_path):
    assert_compiled_run_matches_eager(tmp_path, "vit", "inductor", saq_mode="qat")


@pytest.mark.parametrize("arch,fields", [
    ("vit", {"saq_mode": "saq"}),
    ("convnext", {"saq_mode": "qat"}),
    ("convnext", {"saq_mode": "saq"}),
    ("vit", {"saq_mode": "case1"}),
    ("vit", {"saq_mode": "case2"}),
    ("vit", {"saq_mode": "saq", "saq_strategy": "every_k", "saq_interval": 2}),
    ("vit", {"saq_mode": "saq", "saq_strategy": "reuse_grad"}),
], ids=["vit-saq", "convnext-qat", "convnext-saq", "vit-case1", "vit-case2", "vit-every_k", "vit-reuse_grad"])
def test_every_mode_and_strategy_compiles_without_graph_breaks_or_recompiles(tmp_path, arch, fields):
    assert_compiled_run_matches_eager(tmp_path, arch, "aot_eager", **fields)


@pytest.mark.parametrize("step_grad", [True, False])
def test_compiled_lsq_op_gives_the_eager_gradients(step_grad):
    # The op's backward must not read what dynamo traces wrongly in some torch releases (torch 2.11 traced
    # ctx.needs_input_grad as all-False: every gradient through the op came out zero in compiled models).
    from saq_hf.quant.lsq import lsq_fake_quantize

    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(0)
    x0, grad = torch.randn(8, 24, generator=generator), torch.randn(8, 24, generator=generator)

    def op(x, s):
        return lsq_fake_quantize(x, s, -8, 7, 0.1, step_grad)

    results = []
    for function in (op, torch.compile(op, backend="aot_eager", fullgraph=True)):
        x, s = x0.clone().requires_grad_(), torch.full((8, 1), 0.2, requires_grad=True)
        function(x, s).backward(grad)
        results.append((x.grad, s.grad))
    (x_eager, s_eager), (x_compiled, s_compiled) = results
    assert x_eager.abs().sum() > 0 and torch.equal(x_compiled, x_eager)
    assert torch.equal(s_compiled, s_eager) and bool(s_eager.any()) == step_grad


def test_a_compiled_backward_that_drops_the_weight_gradients_fails_the_first_step(tmp_path, monkeypatch):
    # What torch 2.11 did to the op (zero gradients through it, found on an H200): the trainer must stop at the
    # first step instead of training biases alone.
    from saq_hf.quant import lsq

    backward = lsq._LSQFakeQuantize.backward

    def dropped(ctx, grad_output):
        grads = backward(ctx, grad_output)
        return (torch.zeros_like(grads[0]), torch.zeros_like(grads[1])) + tuple(grads[2:])

    monkeypatch.setattr(lsq._LSQFakeQuantize, "backward", staticmethod(dropped))
    with pytest.raises(RuntimeError, match="zero gradient.*torch_compile=False"):
        train(tmp_path, "vit", True, backend="aot_eager", saq_mode="qat")
