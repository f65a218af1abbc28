"""Mixed precision search: budgets met as export counts bytes, sensitive layers get bits, plans reload exactly and
bad plans fail in one line before any work."""

import json

import pytest
import torch
import yaml
from torch import nn
from transformers import AutoModelForImageClassification, ViTConfig, ViTForImageClassification

from saq_hf import QuantConfig, calibrate, export_quantized, load_exported, quantize_model, search_bits
from saq_hf.export import MANIFEST_FILE
from saq_hf.packing import packed_size
from saq_hf.quant import quantized_layer_bits
from saq_hf.search import PlanError, allocate_bits, check_plan, read_plan, reallocate


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_vit():
    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=32,
                                               num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                               num_labels=4)).eval()


def self_labelled(model, n=2, size=16):
    """Batches labelled by the model's own predictions: a model 'trained' to zero error, as search expects."""
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(n):
        x = torch.randn(size, 1, 8, 8, generator=generator)
        with torch.no_grad():
            batches.append((x, model(x).logits.argmax(-1)))
    return batches


class Residual(nn.Module):
    """``h += gain_i · block_i(relu(h))`` between an input and an output layer (both kept at 8 bits by the default
    rule): a block's quantization error reaches the logits scaled by its gain, so the gains set its sensitivity."""

    def __init__(self, gains=(0.05, 2.0, 0.05), width=16):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(width, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in gains)
        self.out = nn.Linear(width, 8)  # registered last: the default rule keeps the last layer at 8 bits
        self.gains = gains

    def forward(self, x):
        h = self.inp(x)
        for block, gain in zip(self.blocks, self.gains):
            h = h + gain * block(torch.relu(h))
        return self.out(h)


def residual_batches(model, n=2):
    generator = torch.Generator().manual_seed(2)
    out = []
    for _ in range(n):
        x = torch.randn(32, 16, generator=generator)
        with torch.no_grad():
            out.append((x, model(x).argmax(-1)))
    return out


def test_allocate_bits_solves_the_knapsack_exactly_on_a_small_case():
    # Two layers of 100 weights at an average of 3 bits: (3, 3) costs 0.3 + 0.4, (2, 4) 1 + 0, (4, 2) 0 + 5.
    sensitivity = {"a": {2: 1.0, 3: 0.3, 4: 0.0}, "b": {2: 5.0, 3: 0.4, 4: 0.0}}
    weights = {"a": 100, "b": 100}
    assert allocate_bits(sensitivity, weights, [2, 3, 4], target_bits=3) == {"a": 3, "b": 3}
    # 100 weights pack to 25, 38 and 50 bytes at 2, 3 and 4 bits: 76 bytes fit (3, 3), 75 only (2, 4) or (4, 2).
    assert [packed_size(100, b) for b in (2, 3, 4)] == [25, 38, 50]
    assert allocate_bits(sensitivity, weights, [2, 3, 4], target_bytes=76) == {"a": 3, "b": 3}
    assert allocate_bits(sensitivity, weights, [2, 3, 4], target_bytes=75) == {"a": 2, "b": 4}
    sensitivity["b"][3] = 2.0
    assert allocate_bits(sensitivity, weights, [2, 3, 4], target_bits=3) == {"a": 2, "b": 4}


@pytest.mark.parametrize("measure", ["sharpness", "hessian"])
def test_byte_budget_is_met_exactly_as_export_counts_bytes(measure, tmp_path):
    model = tiny_vit()
    batches = self_labelled(model, n=1)
    plan = search_bits(model, batches, target_bytes=5000, measure=measure)
    quantized = quantize_model(tiny_vit(), QuantConfig(w_bits=4, a_bits=4, bits_overrides=plan.bits_overrides))
    calibrate(quantized, [batches[0][0]])
    manifest = export_quantized(quantized, tmp_path / "export")
    exported = sum(entry["weight"]["packed_bytes"] for entry in manifest["layers"].values())
    assert exported == plan.weight_bytes <= 5000
    assert {name: entry["weight"]["bits"] for name, entry in manifest["layers"].items()} == {
        row["name"]: row["w_bits"] for row in plan.layers}
    # The budget binds: a 2-bit-everywhere model packs far smaller, and some layer got more than 2 bits.
    assert plan.weight_bytes > 5000 - 64 * 6 and max(row["w_bits"] for row in plan.layers if not row["pinned"]) > 2


def test_average_bit_budget_counts_searched_layers_weighted_by_size():
    model = tiny_vit()
    plan = search_bits(model, self_labelled(model, n=1), target_bits=2.5, measure="hessian")
    searched = [row for row in plan.layers if not row["pinned"]]
    average = sum(r["weights"] * r["w_bits"] for r in searched) / sum(r["weights"] for r in searched)
    assert plan.average_bits == pytest.approx(average) and average <= 2.5
    assert average > 2.25  # the solver uses the budget: the smallest layers are 1,024 of 12,288 weights
    pinned = {row["name"]: (row["w_bits"], row["a_bits"]) for row in plan.layers if row["pinned"]}
    assert pinned == {"vit.embeddings.patch_embeddings.projection": (8, 8), "classifier": (8, 8)}
    for row in searched:  # a_bits follows w_bits, as in a uniform WbAb model
        assert row["a_bits"] == row["w_bits"] and plan.bits_overrides[row["name"]] == {"w_bits": row["w_bits"],
                                                                                      "a_bits": row["w_bits"]}


@pytest.mark.parametrize("activations", [False, True])
@pytest.mark.parametrize("measure", ["sharpness", "hessian"])
def test_a_layer_made_sensitive_gets_more_bits(measure, activations):
    model = Residual(gains=(0.05, 2.0, 0.05))  # blocks.1's output reaches the logits 40x louder than the others'
    plan = search_bits(model, residual_batches(model), target_bits=3, measure=measure, activations=activations)
    bits = {row["name"]: row["w_bits"] for row in plan.layers if not row["pinned"]}
    assert set(bits) == {"blocks.0", "blocks.1", "blocks.2"}
    assert bits["blocks.1"] > max(bits["blocks.0"], bits["blocks.2"]), bits
    sensitivity = {row["name"]: row["sensitivity"] for row in plan.layers if not row["pinned"]}
    assert sensitivity["blocks.1"][2] > 3 * max(sensitivity["blocks.0"][2], sensitivity["blocks.2"][2])
    # Swapping the gains moves the bits with them.
    swapped = Residual(gains=(2.0, 0.05, 0.05))
    plan = search_bits(swapped, residual_batches(swapped), target_bits=3, measure=measure, activations=activations)
    bits = {row["name"]: row["w_bits"] for row in plan.layers if not row["pinned"]}
    assert bits["blocks.0"] > max(bits["blocks.1"], bits["blocks.2"]), bits


def test_plan_survives_save_from_pretrained_export_and_load_exported_bit_for_bit(tmp_path):
    model = tiny_vit()
    batches = self_labelled(model, n=1)
    plan = search_bits(model, batches, target_bits=3, measure="hessian")
    assert len({row["w_bits"] for row in plan.layers}) > 1  # a mixed plan
    quantized = quantize_model(tiny_vit(), QuantConfig(w_bits=4, a_bits=4, bits_overrides=plan.bits_overrides))
    calibrate(quantized, [batches[0][0]])
    expected = {row["name"]: (row["w_bits"], row["a_bits"]) for row in plan.layers}
    assert quantized_layer_bits(quantized) == expected
    quantized.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "saved").eval()
    assert quantized_layer_bits(reloaded) == expected
    export_quantized(reloaded, tmp_path / "export")
    manifest = json.loads((tmp_path / "export" / MANIFEST_FILE).read_text())
    assert {n: (e["weight"]["bits"], e["input"]["bits"]) for n, e in manifest["layers"].items()} == expected
    exported = load_exported(tmp_path / "export")
    assert quantized_layer_bits(exported) == expected
    x = batches[0][0]
    with torch.no_grad():
        reference = quantized.eval()(x).logits
        assert torch.equal(reloaded(x).logits, reference)
        assert torch.equal(exported(x).logits, reference)


def test_plan_file_round_trips_through_yaml_and_checks_against_the_model(tmp_path):
    model = tiny_vit()
    plan = search_bits(model, self_labelled(model, n=1), target_bits=3, measure="hessian")
    path = tmp_path / "plan.yaml"
    path.write_text(plan.to_yaml())
    data = read_plan(path)
    assert data["bits_overrides"] == plan.bits_overrides and data["target_bits"] == 3.0
    assert data["layers"] == plan.layers  # the per-layer table, sensitivities included, as plain YAML data
    checked = check_plan(data, tiny_vit(), path)
    assert checked["average_bits"] == pytest.approx(plan.average_bits) and checked["weight_bytes"] == plan.weight_bytes
    assert checked["budget_met"] is True


class Untouchable:
    """Batches that fail the test if anything reads them: a check must fail before any measurement."""

    def __iter__(self):
        raise AssertionError("batches were read before the bad input was refused")


@pytest.mark.parametrize("kwargs, message", [
    ({"target_bits": 1.5}, "target_bits 1.5 is infeasible: the smallest candidate bit-width is 2"),
    ({"target_bytes": 100}, "target_bytes 100 is infeasible"),
    ({"target_bits": 3, "target_bytes": 3000}, "give exactly one budget"),
    ({"target_bits": 3, "candidates": (2, 9)}, "candidate bit-widths must be integers in 2..8, got 9"),
    ({"target_bits": 3, "measure": "fisher"}, "measure must be one of"),
])
def test_bad_search_input_is_one_line_before_any_work(kwargs, message):
    with pytest.raises(ValueError) as error:
        search_bits(tiny_vit(), Untouchable(), **kwargs)
    assert message in str(error.value) and "\n" not in str(error.value)


def write(tmp_path, data):
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_bad_plans_are_one_line_that_says_what_to_change(tmp_path):
    model = tiny_vit()
    plan = search_bits(model, self_labelled(model, n=1), target_bits=3, measure="hessian").to_dict()
    cases = {
        "bits outside 2..8": ({**plan, "bits_overrides": {**plan["bits_overrides"], "classifier": {"w_bits": 9}}},
                              "layer 'classifier' has w_bits 9; bits must be integers in 2..8"),
        "no budget": ({k: v for k, v in plan.items() if k != "target_bits"}, "must name its budget"),
        "not a plan": (["a", "list"], "has no bits_overrides mapping"),
    }
    for name, (data, message) in cases.items():
        with pytest.raises(PlanError) as error:
            read_plan(write(tmp_path, data))
        assert message in str(error.value) and "\n" not in str(error.value), name
    unknown = {**plan, "bits_overrides": {**plan["bits_overrides"], "vit.no_such_layer": {"w_bits": 4}}}
    with pytest.raises(PlanError, match="names layer 'vit.no_such_layer', which the model does not have"):
        check_plan(read_plan(write(tmp_path, unknown)), tiny_vit())
    over = {**plan, "target_bits": 2.5}
    with pytest.raises(PlanError, match="averages 3.000 weight bits, over its target_bits 2.5"):
        check_plan(read_plan(write(tmp_path, over)), tiny_vit())
    missing = {**plan, "bits_overrides": {k: v for k, v in plan["bits_overrides"].items() if k != "classifier"}}
    with pytest.raises(PlanError, match="does not name layer 'classifier'"):
        check_plan(read_plan(write(tmp_path, missing)), tiny_vit())


def test_reallocate_reuses_the_measured_sensitivities_at_another_budget():
    model = tiny_vit()
    plan = search_bits(model, self_labelled(model, n=1), target_bits=3, measure="hessian")
    smaller = search_bits(model, self_labelled(model, n=1), target_bits=2.5, measure="hessian")
    again = reallocate(plan, target_bits=2.5)
    assert again.bits_overrides == smaller.bits_overrides and again.average_bits == smaller.average_bits
    assert [row["sensitivity"] for row in again.layers if not row["pinned"]] == [
        row["sensitivity"] for row in plan.layers if not row["pinned"]]
    # Other scores (here: favour the last searched layer) give another allocation of the same budget.
    names = [row["name"] for row in plan.layers if not row["pinned"]]
    scores = {name: {b: (100.0 if name == names[-1] else 1.0) / b for b in plan.candidates} for name in names}
    favoured = reallocate(plan, target_bits=2.5, sensitivity=scores)
    # 8 bits on its 2,048 weights would leave the other 10,240 under 2 bits on average: 4 is the most it can get.
    assert favoured.bits_overrides[names[-1]]["w_bits"] == 4 and favoured.average_bits <= 2.5
    assert all(favoured.bits_overrides[name]["w_bits"] <= 4 for name in names)


def test_a_quantized_model_is_searched_around_its_latent_weights_and_left_unchanged():
    model = tiny_vit()
    batches = self_labelled(model, n=1)
    from_fp = search_bits(model, batches, target_bits=3, measure="hessian")
    quantized = quantize_model(tiny_vit(), QuantConfig(w_bits=2, a_bits=2))
    calibrate(quantized, [batches[0][0]])
    before = {k: v.clone() for k, v in quantized.state_dict().items()}
    from_quantized = search_bits(quantized, batches, target_bits=3, measure="hessian")
    assert from_quantized.bits_overrides == from_fp.bits_overrides
    for mine, reference in zip(from_quantized.layers, from_fp.layers):
        if not mine["pinned"]:
            assert mine["sensitivity"] == pytest.approx(reference["sensitivity"], rel=1e-4)
    after = quantized.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and set(before) == set(after)
    assert set(quantized_layer_bits(quantized).values()) == {(2, 2), (8, 8)}


def test_equal_sensitivities_use_the_budget_whatever_their_scale():
    weights = {f"layer{i}": 1024 * (1 + i % 2) for i in range(12)}
    for scale in (0.0, 1e-12, 1e3):
        flat = {name: {b: scale for b in (2, 3, 4, 8)} for name in weights}
        chosen = allocate_bits(flat, weights, (2, 3, 4, 8), target_bits=3)
        assert sum(weights[n] * b for n, b in chosen.items()) == 3 * sum(weights.values()), scale
        tiny = {name: {2: scale, 3: scale / 2, 4: scale / 3, 8: 0.0} for name in weights}
        chosen = allocate_bits(tiny, weights, (2, 3, 4, 8), target_bits=3)
        assert sum(weights[n] * b for n, b in chosen.items()) == 3 * sum(weights.values()), scale


def test_grid_step_sizes_for_every_bit_width_at_once_match_the_quantizers_own_initialisation():
    from saq_hf.quant import LSQQuantizer
    from saq_hf.quant.lsq import mse_step_sizes
    torch.manual_seed(0)
    weight, inputs = torch.randn(24, 40) * 0.05, torch.randn(16, 9, 40).relu()
    for x, per_channel, signed in ((weight, True, True), (inputs, False, False)):
        quantizers = [LSQQuantizer(b, signed=signed, channel_shape=(24, 1) if per_channel else None)
                      for b in (2, 3, 4, 8)]
        # max_elements small enough that the grid is split: the chunks must add up to the same choice.
        steps = mse_step_sizes(x, [q.qrange() for q in quantizers], per_channel, max_elements=3000)
        for quantizer, step in zip(quantizers, steps):
            torch.testing.assert_close(step, quantizer._estimate_step_size(x).reshape(step.shape), rtol=0, atol=0)


class InPlaceAfterLayer(nn.Module):
    """A model that changes a layer's output in place and, with ``share``, calls its first layer twice."""

    def __init__(self, share=False):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.mid, self.mid2, self.out = (nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16),
                                                   nn.Linear(16, 8))
        self.share = share

    def forward(self, x):
        h = self.inp(x)
        h.mul_(1.5)  # in place on the layer's output: a reused output must be a copy
        h = torch.relu(self.mid(h))
        h = self.mid2(h) + (self.inp(h) if self.share else 0)  # inp: kept at 8 bits, so never perturbed
        return self.out(h)


def tiny_convnext():
    from transformers import ConvNextConfig, ConvNextForImageClassification
    torch.manual_seed(0)
    config = ConvNextConfig(num_channels=1, patch_size=2, num_stages=2, hidden_sizes=[16, 32], depths=[1, 1],
                            num_labels=4)
    return ConvNextForImageClassification(config).eval()


@pytest.mark.parametrize("case", ["in_place", "shared", "vit", "convnext"])
def test_measuring_forwards_that_reuse_earlier_outputs_give_the_same_sensitivities(monkeypatch, case):
    import contextlib

    from saq_hf import sensitivity
    if case in ("in_place", "shared"):
        model = InPlaceAfterLayer(share=case == "shared")
        batches = residual_batches(model)
    else:
        model = tiny_vit() if case == "vit" else tiny_convnext()
        batches = self_labelled(model)
    candidates = (2, 3, 8)
    reused = search_bits(model, batches, target_bits=3, candidates=candidates)
    skipped = []
    monkeypatch.setattr(sensitivity._EarlierOutputs, "reused_before",
                        lambda self, layer: skipped.append(len(self.reuse.get(layer, []))) or contextlib.nullcontext())
    fresh = search_bits(model, batches, target_bits=3, candidates=candidates)
    if case == "in_place":
        assert sorted(set(skipped)) == [1, 2]  # mid skips inp; mid2 skips inp and mid
    elif case == "shared":
        assert sorted(set(skipped)) == [0, 1]  # inp runs twice: never skipped
    else:
        assert max(skipped) >= 2
    for a, b in zip(reused.layers, fresh.layers):
        if not a["pinned"]:
            for bits in candidates:
                assert a["sensitivity"][bits] == pytest.approx(b["sensitivity"][bits], rel=1e-5, abs=1e-9)
    assert reused.bits_overrides == fresh.bits_overrides


def test_a_quantizer_initialised_to_another_sign_than_its_fixed_one_is_one_clear_error():
    from saq_hf.quant import LSQQuantizer
    quantizer = LSQQuantizer(4, signed=True)
    with pytest.raises(ValueError, match="this quantizer is signed; cannot initialise it as unsigned"):
        quantizer.initialize_to(torch.tensor(0.1), signed=False)
    assert not bool(quantizer.initialized)
    auto = LSQQuantizer(4, signed=None, is_activation=True)
    auto.initialize_to(torch.tensor(0.1), signed=False)
    assert auto.qrange() == (0, 15) and float(auto.step_size) == pytest.approx(0.1)
