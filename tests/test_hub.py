"""Hub-ready run folders: model card content (parsed back with huggingface_hub) and push via a mocked HfApi."""

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, metadata_load
from transformers import ViTConfig, ViTForImageClassification

from conftest import ViTImageProcessorPil

import saq_hf.hub as hub
from saq_hf import QuantConfig, quantize_model
from saq_hf.cli import main
from saq_hf.hub import PushError, model_card, push_run_folder, write_model_card


def run_info(**changes):
    info = {
        "saq_hf_version": "0.1.0",
        "run_name": "vit_b16_pets_w4a4",
        "base_model": "google/vit-base-patch16-224",
        "fp_stage": True,
        "fp_model": "/cache/fp",
        "hub_model_id": None,
        "data": {"dataset_name": "timm/oxford-iiit-pet", "dataset_config_name": None},
        "quantization": {"quant_method": "saq", "w_bits": 4, "a_bits": 4, "per_channel": True,
                         "modules_to_not_convert": [], "bits_overrides": {"classifier": {"w_bits": 8, "a_bits": 8}},
                         "tag": "W4A4", "calibration_batches": 8},
        "saq": {"saq_mode": "saq", "rho": 0.05, "saq_adaptive": False, "saq_perturb": "bias_norm",
                "saq_strategy": "full", "saq_interval": 2},
        "training": {"optim": "adamw_torch", "learning_rate": 0.0002, "seed": 42, "global_steps": 520},
        "results": {"split": "test", "num_examples": 3669, "fp": {"accuracy": 0.9312, "top5_accuracy": 0.9951},
                    "quantized_calibrated": {"accuracy": 0.7021, "top5_accuracy": 0.9333},
                    "quantized": {"accuracy": 0.9204, "top5_accuracy": 0.9937}},
    }
    info.update(changes)
    return info


def write_run_folder(root: Path, info=None) -> Path:
    """A real (tiny) saved quantized model plus run info and card, as `saq-hf train` leaves it."""
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1,
                                                num_attention_heads=2, intermediate_size=64, num_labels=3))
    quantize_model(model, QuantConfig(w_bits=4, a_bits=4))
    model.save_pretrained(root)
    ViTImageProcessorPil(size={"height": 16, "width": 16}).save_pretrained(root)
    (root / "checkpoint-5").mkdir()
    (root / "checkpoint-5" / "optimizer.pt").write_bytes(b"state")
    (root / "saq_run.json").write_text(json.dumps(info or run_info()))
    write_model_card(root)
    return root


def test_card_front_matter_declares_a_quantized_derivative_with_both_accuracies(tmp_path):
    path = tmp_path / "README.md"
    model_card(run_info(), repo_id="me/vit-pets-w4a4").save(path)
    meta = metadata_load(path)
    assert meta["base_model"] == "google/vit-base-patch16-224"
    assert meta["base_model_relation"] == "quantized"
    assert {"saq", "quantized", "qat", "w4a4"} <= set(meta["tags"])
    assert meta["datasets"] == ["timm/oxford-iiit-pet"]
    assert meta["pipeline_tag"] == "image-classification" and meta["library_name"] == "transformers"
    results = ModelCard.load(path).data.eval_results
    values = {r.metric_name: r.metric_value for r in results}
    assert values["top-1 accuracy (full precision)"] == 0.9312
    assert values["top-1 accuracy (W4A4 + SAQ)"] == 0.9204
    assert values["top-5 accuracy (W4A4 + SAQ)"] == 0.9937
    assert {(r.dataset_type, r.dataset_split, r.task_type) for r in results} == {
        ("timm/oxford-iiit-pet", "test", "image-classification")}


def test_card_body_has_usage_starting_with_import_saq_hf_and_the_saq_settings(tmp_path):
    text = model_card(run_info(), repo_id="me/vit-pets-w4a4").text
    usage = text.split("```python\n", 1)[1]
    assert usage.startswith("import saq_hf")
    assert 'from_pretrained("me/vit-pets-w4a4")' in usage
    assert "| full precision | 93.12 | 99.51 |" in text
    assert "| W4A4 + SAQ | 92.04 | 99.37 |" in text
    assert "| rho | `0.05` |" in text and "| saq_mode | `saq` |" in text
    assert "| w_bits | `4` |" in text


def test_card_of_a_local_from_scratch_run_names_no_hub_base_model_or_dataset(tmp_path):
    info = run_info(base_model=None, data={"dataset_name": "demo_digits", "dataset_config_name": None})
    path = tmp_path / "README.md"
    model_card(info).save(path)
    meta = metadata_load(path)
    assert "base_model" not in meta and "base_model_relation" not in meta and "datasets" not in meta
    assert 'from_pretrained("path/to/vit_b16_pets_w4a4")' in path.read_text()


class RecordingApi:
    calls: list = []
    fail_upload = False

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private=None, exist_ok=False):
        RecordingApi.calls.append(("create_repo", repo_id, private, exist_ok))
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, repo_id, folder_path, revision=None, commit_message=None, ignore_patterns=None):
        from huggingface_hub.utils import filter_repo_objects

        files = sorted(filter_repo_objects(
            [str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file()],
            ignore_patterns=ignore_patterns))
        RecordingApi.calls.append(("upload_folder", repo_id, files))
        if RecordingApi.fail_upload:
            raise ConnectionError("Max retries exceeded with url: https://huggingface.co/api")
        return type("Commit", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()


@pytest.fixture
def recording_api(monkeypatch):
    RecordingApi.calls, RecordingApi.fail_upload = [], False
    monkeypatch.setattr(hub, "HfApi", RecordingApi)
    return RecordingApi


def test_push_uploads_model_processor_card_and_run_info_but_not_checkpoints(tmp_path, recording_api):
    run_dir = write_run_folder(tmp_path / "run")
    url = push_run_folder(run_dir, "me/vit-pets-w4a4", private=True)
    assert url == "https://huggingface.co/me/vit-pets-w4a4/commit/abc"
    assert recording_api.calls[0] == ("create_repo", "me/vit-pets-w4a4", True, True)
    assert recording_api.calls[1] == ("upload_folder", "me/vit-pets-w4a4", [
        "README.md", "config.json", "model.safetensors", "preprocessor_config.json", "saq_run.json"])
    assert json.loads((run_dir / "config.json").read_text())["quantization_config"]["w_bits"] == 4
    assert 'from_pretrained("me/vit-pets-w4a4")' in (run_dir / "README.md").read_text()


def test_failed_push_keeps_the_folder_and_prints_the_retry_command(tmp_path, recording_api, capfd):
    run_dir = write_run_folder(tmp_path / "run")
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != "README.md"}
    recording_api.fail_upload = True
    with pytest.raises(PushError, match=f"retry with: saq-hf push {run_dir} --hub_model_id me/x"):
        push_run_folder(run_dir, "me/x")
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != "README.md"} == before

    capfd.readouterr()
    assert main(["push", str(run_dir), "--hub_model_id", "me/x"]) == 1
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Max retries exceeded" in err[0] and f"saq-hf push {run_dir} --hub_model_id me/x" in err[0]


def test_push_of_a_folder_that_is_not_a_finished_run_exits_2_before_any_upload(tmp_path, recording_api, capfd):
    run_dir = write_run_folder(tmp_path / "run")
    (run_dir / "model.safetensors").unlink()
    capfd.readouterr()
    assert main(["push", str(run_dir), "--hub_model_id", "me/x"]) == 2
    assert capfd.readouterr().err.strip() == f"saq-hf: error: {run_dir} has no .safetensors weights: rerun the training"
    assert main(["push", str(tmp_path / "nothing"), "--hub_model_id", "me/x"]) == 2
    assert recording_api.calls == []
