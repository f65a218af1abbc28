"""Integer export: packed codes round-trip exactly, reload to the fake-quant logits, stay small, fail clearly."""

import hashlib
import json
import math
import shutil
from collections import Counter

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import ConvNextConfig, ConvNextForImageClassification, ViTConfig, ViTForImageClassification

from conftest import vit_block_names
from saq_hf import QuantConfig, calibrate, export_quantized, load_exported, quantize_model
from saq_hf.export import EXPORT_FILES, MANIFEST_FILE, ONNX_FILE, WEIGHTS_FILE, export_command, export_onnx, size_table
from saq_hf.packing import pack_codes, packed_size, unpack_codes
from saq_hf.quant import quantized_layers


def tiny_vit(hidden_size=32):
    return ViTForImageClassification(ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=hidden_size, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=2 * hidden_size, num_labels=5))


def tiny_convnext():
    return ConvNextForImageClassification(ConvNextConfig(
        num_channels=3, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=5, image_size=16))


MODELS = {"vit": tiny_vit, "convnext": tiny_convnext}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny tensors gain nothing from intra-op threads, and on a busy machine OpenMP's spin-waits make each
    # op ~1000x slower (torch 2.13 CPU): one thread keeps this module at seconds.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def images(seed=1):
    return torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def trained_like(model_name="vit", w_bits=4, a_bits=4, per_channel=True, **model_kwargs):
    """A quantized, calibrated model whose latent weights and step sizes moved away from their init values."""
    torch.manual_seed(0)
    model = quantize_model(MODELS[model_name](**model_kwargs),
                           QuantConfig(w_bits=w_bits, a_bits=a_bits, per_channel=per_channel))
    calibrate(model, [images(seed=2)])
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("log_step_size"):
                parameter.add_(torch.log1p(0.2 * torch.rand_like(parameter)))
            else:
                parameter.add_(0.02 * torch.randn_like(parameter))
    return model.eval()


def logits(model):
    with torch.no_grad():
        return model(pixel_values=images()).logits


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A W4A4 tiny ViT export; tests that damage it work on a copy (see ``export_copy``)."""
    folder = tmp_path_factory.mktemp("export") / "vit-w4a4"
    model = trained_like("vit")
    export_quantized(model, folder)
    return folder, model


@pytest.fixture
def export_copy(exported, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(exported[0], folder)
    return folder


# --- packing ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("count", [0, 1, 3, 7, 8, 9, 1001])
def test_unpack_of_pack_returns_every_code_for_every_bit_width_and_odd_length(bits, count):
    qmin = -(2 ** (bits - 1))
    codes = torch.randint(qmin, -qmin, (count,), dtype=torch.int32, generator=torch.Generator().manual_seed(bits))
    if count >= 2:
        codes[:2] = torch.tensor([qmin, -qmin - 1])  # both ends of the range
    packed = pack_codes(codes, bits, qmin)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(count * bits / 8) == packed_size(count, bits)
    assert torch.equal(unpack_codes(packed, bits, count, qmin), codes)


def test_codes_are_packed_densely_lsb_first():
    # 8-bit: one per byte; 4-bit: two per byte, first code in the low nibble; 2-bit: four per byte;
    # 3-bit: eight codes in three bytes. Codes are stored as code - qmin.
    assert pack_codes(torch.tensor([-128, 0, 127]), 8, -128).tolist() == [0, 128, 255]
    assert pack_codes(torch.tensor([-8, 7, 0]), 4, -8).tolist() == [0xF0, 0x08]
    assert pack_codes(torch.tensor([-2, -1, 0, 1, 1]), 2, -2).tolist() == [0b11100100, 0b11]
    assert pack_codes(torch.arange(-4, 4), 3, -4).tolist() == [0b10001000, 0b11000110, 0b11111010]


def test_pack_rejects_codes_outside_the_bit_width():
    with pytest.raises(ValueError, match="-8..7 for 4-bit"):
        pack_codes(torch.tensor([0, 8]), 4, -8)


def test_unpack_rejects_a_buffer_of_the_wrong_length():
    with pytest.raises(ValueError, match="3 bytes for 8 3-bit codes"):
        unpack_codes(torch.zeros(2, dtype=torch.uint8), 3, 8, -4)


# --- round trip ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_name", ["vit", "convnext"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_reloaded_export_gives_the_fake_quant_logits(tmp_path, model_name, bits):
    model = trained_like(model_name, w_bits=bits, a_bits=bits)
    export_quantized(model, tmp_path)
    loaded = load_exported(tmp_path)

    assert type(loaded) is type(model) and not loaded.training
    # The export stores each step size as s itself (the linear layout), the trained model as log(s).
    assert loaded.config.quantization_config.step_size_format == "linear"
    assert {k: v.dtype for k, v in loaded.state_dict().items()} == {
        k.replace("log_step_size", "step_size"): v.dtype for k, v in model.state_dict().items()}
    expected, actual = logits(model), logits(loaded)
    assert (actual - expected).abs().max() <= 1e-5 * expected.abs().max()
    # The reason it holds: every reloaded layer multiplies by bit-identical Q(w).
    fake = dict(quantized_layers(model))
    for name, layer in quantized_layers(loaded):
        assert type(layer) is type(fake[name]) and layer.w_bits == fake[name].w_bits
        assert torch.equal(layer.quantized_weight(), fake[name].quantized_weight())


def test_weight_only_export_reloads_without_activation_quantizers(tmp_path):
    model = trained_like("convnext", w_bits=4, a_bits=None)
    export_quantized(model, tmp_path)
    loaded = load_exported(tmp_path)

    a_bits = [layer.a_bits for _, layer in quantized_layers(loaded)]
    assert None in a_bits and a_bits == [layer.a_bits for _, layer in quantized_layers(model)]
    expected = logits(model)
    assert (logits(loaded) - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_export_stores_packed_codes_instead_of_latent_weights(exported):
    folder, model = exported
    stored = load_file(folder / WEIGHTS_FILE)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())

    for name, layer in quantized_layers(model):
        entry = manifest["layers"][name]["weight"]
        assert f"{name}.weight" not in stored
        codes = stored[f"{name}.weight_codes"]
        assert codes.dtype == torch.uint8 and codes.numel() == packed_size(layer.weight.numel(), layer.w_bits)
        unpacked = unpack_codes(codes, entry["bits"], layer.weight.numel(), entry["qmin"])
        assert torch.equal(unpacked.reshape(layer.weight.shape), layer.weight_quantizer.codes(layer.weight))
        assert torch.equal(stored[f"{name}.weight_quantizer.step_size"], layer.weight_quantizer.step_size)
        assert torch.equal(stored[f"{name}.input_quantizer.step_size"], layer.input_quantizer.step_size)
        assert manifest["layers"][name]["input"] == {
            "bits": layer.a_bits, "signed": bool(layer.input_quantizer.signed),
            "qmin": layer.input_quantizer.qrange()[0], "qmax": layer.input_quantizer.qrange()[1],
            "step_size": f"{name}.input_quantizer.step_size"}
    quantized_weights = {f"{name}.weight" for name, _ in quantized_layers(model)}
    for key, tensor in model.state_dict().items():
        if key.endswith("log_step_size"):  # stored as s (compared above)
            assert key not in stored and key.replace("log_step_size", "step_size") in stored, key
        elif key not in quantized_weights:
            assert stored[key].dtype == tensor.dtype and torch.equal(stored[key], tensor), key


def test_export_folder_holds_only_json_and_safetensors_nothing_pickled(exported):
    folder, _ = exported
    assert sorted(path.name for path in folder.iterdir()) == sorted(EXPORT_FILES)
    for path in folder.iterdir():
        head = path.read_bytes()[:2]
        assert head[:1] != b"\x80" and head != b"PK", f"{path.name} looks like a pickle / torch.save archive"
    json.loads((folder / "config.json").read_text())
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    assert manifest["format"] == "saq-hf-export" and manifest["format_version"] == 1
    with safe_open(folder / WEIGHTS_FILE, "pt") as handle:
        assert handle.metadata()["format"] == "pt"


# --- size ----------------------------------------------------------------------------------------------

def w4_ratio(folder):
    """(packed codes + step sizes + quantizer flags of the W4 layers) / (4 bytes x their weights), from the file."""
    stored = load_file(folder / WEIGHTS_FILE)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    exported_bytes = fp32_bytes = 0
    for name, entry in manifest["layers"].items():
        if entry["weight"]["bits"] == 4:
            exported_bytes += sum(tensor.nbytes for key, tensor in stored.items()
                                  if key.startswith(name + ".") and key != f"{name}.bias")
            fp32_bytes += 4 * math.prod(entry["weight"]["shape"])
    return exported_bytes, fp32_bytes


@pytest.mark.parametrize("model_name, per_channel, model_kwargs", [
    ("vit", False, {}),
    ("convnext", False, {}),
    # Per-channel fp32 step sizes cost 32/(row length) bits per weight: rows of 32 would add 1/32 (0.156 total).
    ("vit", True, {"hidden_size": 64}),
])
def test_w4_layers_take_at_most_015_of_their_fp32_bytes(tmp_path, model_name, per_channel, model_kwargs):
    export_quantized(trained_like(model_name, w_bits=4, a_bits=4, per_channel=per_channel, **model_kwargs), tmp_path)
    exported_bytes, fp32_bytes = w4_ratio(tmp_path)

    assert exported_bytes <= 0.15 * fp32_bytes
    w4_row = next(line for line in size_table(tmp_path).splitlines() if line.startswith("W4 "))
    assert w4_row.split()[3:5] == [f"{fp32_bytes:,}", f"{exported_bytes:,}"]


# --- errors --------------------------------------------------------------------------------------------

def test_exporting_a_model_that_is_not_quantized_says_to_quantize_it(tmp_path):
    with pytest.raises(ValueError, match="not quantized with saq-hf: run saq_hf.quantize_model first"):
        export_quantized(tiny_vit(), tmp_path)
    assert not any(tmp_path.iterdir())


def test_exporting_a_quantized_plain_module_asks_for_a_transformers_model(tmp_path):
    model = quantize_model(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), QuantConfig(a_bits=None))
    with pytest.raises(ValueError, match="saq quantization_config"):
        export_quantized(model, tmp_path)


def test_exporting_before_calibration_says_to_calibrate(tmp_path):
    model = quantize_model(tiny_vit(), QuantConfig(w_bits=4, a_bits=4))
    with pytest.raises(ValueError, match=r"run saq_hf.calibrate\(model, batches\)"):
        export_quantized(model, tmp_path)


@pytest.mark.parametrize("missing", EXPORT_FILES)
def test_loading_an_export_folder_missing_a_file_names_the_file(export_copy, missing):
    (export_copy / missing).unlink()
    with pytest.raises(FileNotFoundError, match=f"is incomplete: missing {missing}; re-run saq-hf export"):
        load_exported(export_copy)


def test_loading_a_folder_that_does_not_exist_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_exported(tmp_path / "nowhere")


def edit_manifest(folder, edit):
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    edit(manifest)
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_truncated_weights_file_is_reported_corrupt(export_copy):
    path = export_copy / WEIGHTS_FILE
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="is corrupt: weights.safetensors does not match the checksum"):
        load_exported(export_copy)


def test_unreadable_safetensors_with_a_matching_checksum_is_reported_corrupt(export_copy):
    (export_copy / WEIGHTS_FILE).write_bytes(b"\xff" * 64)
    edit_manifest(export_copy, lambda m: m.update(weights_sha256=sha256(export_copy / WEIGHTS_FILE)))
    with pytest.raises(ValueError, match="is corrupt: weights.safetensors is not a readable safetensors file"):
        load_exported(export_copy)


def test_manifest_that_is_not_json_is_reported_corrupt(export_copy):
    (export_copy / MANIFEST_FILE).write_text('{"format": "saq-hf-export", ')
    with pytest.raises(ValueError, match="is corrupt: export_manifest.json is not valid JSON"):
        load_exported(export_copy)


def test_manifest_bits_that_disagree_with_the_config_are_reported_corrupt(export_copy):
    fc1 = vit_block_names(tiny_vit(), 0)["fc1"]
    edit_manifest(export_copy, lambda m: m["layers"][fc1]["input"].update(bits=8))
    with pytest.raises(ValueError, match=rf"is corrupt: layer '{fc1}' has \(w_bits, a_bits\) \(4, 8\)"):
        load_exported(export_copy)


def test_codes_that_do_not_fit_the_manifest_shape_are_reported_corrupt(export_copy):
    fc1 = vit_block_names(tiny_vit(), 0)["fc1"]
    edit_manifest(export_copy, lambda m: m["layers"][fc1]["weight"].update(bits=3))
    with pytest.raises(ValueError, match=f"is corrupt: layer '{fc1}' has a malformed entry or tensors"):
        load_exported(export_copy)


def test_weights_file_missing_a_tensor_is_reported_corrupt(export_copy):
    stored = load_file(export_copy / WEIGHTS_FILE)
    del stored["vit.layernorm.weight"]
    save_file(stored, export_copy / WEIGHTS_FILE)
    edit_manifest(export_copy, lambda m: m.update(weights_sha256=sha256(export_copy / WEIGHTS_FILE)))
    with pytest.raises(ValueError, match="corrupt: weights.safetensors does not fit config.json.*vit.layernorm.weight"):
        load_exported(export_copy)


def test_manifest_entry_missing_a_field_is_reported_corrupt(export_copy):
    query = vit_block_names(tiny_vit(), 1)["query"]
    edit_manifest(export_copy, lambda m: m["layers"][query]["weight"].pop("codes"))
    with pytest.raises(ValueError, match=f"is corrupt: layer '{query}' has a malformed entry"):
        load_exported(export_copy)


def test_manifest_from_a_newer_format_asks_to_upgrade(export_copy):
    edit_manifest(export_copy, lambda m: m.update(format_version=99))
    with pytest.raises(ValueError, match="format version 99.*upgrade saq-hf"):
        load_exported(export_copy)


# --- ONNX ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_name", ["vit", "convnext"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_onnxruntime_runs_the_onnx_graph_to_the_pytorch_logits(tmp_path, model_name, bits):
    ort = pytest.importorskip("onnxruntime")
    model = trained_like(model_name, w_bits=bits, a_bits=bits)
    path = export_onnx(model, tmp_path / "model.onnx")  # traced with batch 1; run with batch 4

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (actual,) = session.run(["logits"], {"pixel_values": images().numpy()})
    expected = logits(model)
    assert abs(actual - expected.numpy()).max() <= 1e-5 * float(expected.abs().max())


def test_onnx_graph_holds_int8_weight_codes_and_qdq_nodes_per_quantized_layer(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    model = trained_like("convnext", w_bits=3, a_bits=4)
    graph = onnx.load(export_onnx(model, tmp_path / "model.onnx"))
    onnx.checker.check_model(graph, full_check=True)

    layers = dict(quantized_layers(model))
    ops = Counter(node.op_type for node in graph.graph.node)
    assert ops["QuantizeLinear"] == len(layers) and ops["DequantizeLinear"] == 2 * len(layers)
    int8 = [numpy_helper.to_array(t) for t in graph.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    expected = [layer.weight_quantizer.codes(layer.weight).numpy() for layer in layers.values()]
    assert sorted(a.tobytes() for a in int8) == sorted(a.astype("int8").tobytes() for a in expected)
    float_shapes = {tuple(t.dims) for t in graph.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    assert not float_shapes & {tuple(layer.weight.shape) for layer in layers.values()}


def test_onnx_export_of_a_model_that_is_not_quantized_says_to_quantize_it(tmp_path):
    with pytest.raises(ValueError, match="not quantized with saq-hf"):
        export_onnx(tiny_vit(), tmp_path / "model.onnx")


# --- CLI entry point -----------------------------------------------------------------------------------

def test_export_command_exports_a_saved_run_and_prints_sizes_per_bit_width(tmp_path):
    model = trained_like("vit", w_bits=4, a_bits=4)
    model.save_pretrained(tmp_path / "run")

    table = export_command(str(tmp_path / "run"), str(tmp_path / "out"), onnx=True)

    assert [line.split()[0] for line in table.splitlines()[1:4]] == ["W4", "W8", "all"]
    onnx_path = tmp_path / "out" / ONNX_FILE
    assert onnx_path.is_file() and table.splitlines()[-1].startswith(f"{onnx_path}: ")
    expected = logits(model)
    assert (logits(load_exported(tmp_path / "out")) - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_export_command_on_a_full_precision_run_says_to_quantize(tmp_path):
    tiny_vit().save_pretrained(tmp_path / "run")
    with pytest.raises(ValueError, match="not quantized with saq-hf"):
        export_command(str(tmp_path / "run"), str(tmp_path / "out"))


def test_export_command_on_a_folder_without_a_model_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json in .*pass the output folder of a saq-hf training run"):
        export_command(str(tmp_path), str(tmp_path / "out"))


def test_export_onnx_without_the_onnx_package_is_one_line_exit_2_naming_the_extra_and_writes_nothing(
        tmp_path, monkeypatch, capfd):
    from saq_hf import onnx_export
    from saq_hf.cli import main

    trained_like("vit").save_pretrained(tmp_path / "run")
    find_spec = onnx_export.importlib.util.find_spec
    monkeypatch.setattr(onnx_export.importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else find_spec(name, *a))
    capfd.readouterr()
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out"), "--onnx"]) == 2
    captured = capfd.readouterr()
    assert captured.err == 'saq-hf: error: ONNX export needs the onnx package: pip install "saq-hf[onnx]"\n'
    assert captured.out == "" and not (tmp_path / "out").exists()


def test_the_onnx_extra_installs_the_onnx_package():
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    assert [req.split(">")[0] for req in project["optional-dependencies"]["onnx"]] == ["onnx"]


def test_exported_weights_follow_the_umask_like_the_other_export_files(tmp_path):
    import os
    import stat

    previous = os.umask(0o022)
    try:
        export_quantized(trained_like("vit"), tmp_path / "out")
    finally:
        os.umask(previous)
    modes = {name: stat.S_IMODE((tmp_path / "out" / name).stat().st_mode) for name in EXPORT_FILES}
    assert modes == {name: 0o644 for name in EXPORT_FILES}
