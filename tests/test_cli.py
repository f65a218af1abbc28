"""`saq-hf` end to end on local fixtures, and every bad-input path: one stderr line, exit 2, nothing written."""

import math
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import metadata_load
from transformers import AutoModelForImageClassification, ViTConfig, ViTForImageClassification

from conftest import ViTImageProcessorPil, write_imagefolder

import saq_hf
import saq_hf.hub as hub
from saq_hf.cli import main
from saq_hf.quant import quantized_layer_bits

DEMO_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "demo_mnist_vit_w4a4.yaml"
CLASSES = ("cat", "dog", "fox")


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    """An imagefolder (3 classes x 8 PNGs, class i mostly channel i) and a tiny random ViT + processor."""
    root = tmp_path_factory.mktemp("fixtures")
    write_imagefolder(root, CLASSES)
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=2, intermediate_size=64, num_labels=3))
    model.save_pretrained(root / "tiny_vit")
    ViTImageProcessorPil(size={"height": 16, "width": 16}).save_pretrained(root / "tiny_vit")
    return root


def write_recipe(path: Path, fixtures: Path, **changes) -> Path:
    recipe = {
        "model_name_or_path": str(fixtures / "tiny_vit"),
        "dataset_name": "imagefolder",
        "data_dir": str(fixtures / "images"),
        "train_val_split": 0.25,
        "random_flip": False,
        "calibration_batches": 2,
        "rho": 0.05,
        "max_steps": 3,
        "per_device_train_batch_size": 6,
        "per_device_eval_batch_size": 6,
        "learning_rate": 1e-3,
        "save_strategy": "no",
        "report_to": "none",
        "remove_unused_columns": False,
        "disable_tqdm": True,
        "output_dir": str(path.parent / "run"),
        "fp_cache_dir": str(path.parent / "fp_cache"),
    }
    recipe.update(changes)
    recipe = {key: value for key, value in recipe.items() if value is not None}
    path.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in recipe.items()))
    return path


def test_train_then_eval_on_an_imagefolder_and_a_local_tiny_vit(tmp_path, fixtures, capsys):
    recipe = write_recipe(tmp_path / "recipe.yaml", fixtures)
    assert main(["train", str(recipe), "--max_steps", "2"]) == 0
    out = capsys.readouterr().out
    run_dir = tmp_path / "run"
    info = json.loads((run_dir / "saq_run.json").read_text())
    assert info["training"]["global_steps"] == 2  # the flag overrode the recipe's 3
    assert info["results"]["split"] == "validation" and info["results"]["num_examples"] == 6
    assert info["fp_model"] == str(fixtures / "tiny_vit")  # same 3 classes: the checkpoint is the FP base
    assert f"saq-hf run {run_dir}: W4A4, saq_mode=saq, rho=0.05, 2 steps" in out
    assert "full precision" in out and "W4A4 after training" in out

    config = json.loads((run_dir / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "saq" and config["quantization_config"]["w_bits"] == 4
    assert config["id2label"] == {"0": "cat", "1": "dog", "2": "fox"}
    assert (run_dir / "model.safetensors").is_file() and (run_dir / "preprocessor_config.json").is_file()
    assert {"saq", "quantized", "w4a4"} <= set(metadata_load(run_dir / "README.md")["tags"])
    reloaded = AutoModelForImageClassification.from_pretrained(run_dir)
    assert set(quantized_layer_bits(reloaded).values()) == {(4, 4), (8, 8)}

    assert main(["eval", str(run_dir)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == f"{run_dir}: imagefolder, split validation (6 images)"
    rows = {line.rsplit(None, 2)[0].strip(): float(line.split()[-2]) for line in table[2:]}
    # The saved model and the trained one give the same accuracy on the same split.
    assert rows["W4A4 after training"] == pytest.approx(100 * info["results"]["quantized"]["accuracy"], abs=0.01)
    assert rows["full precision"] == pytest.approx(100 * info["results"]["fp"]["accuracy"], abs=0.01)


@pytest.fixture
def torch_threads():
    """The demo recipe sets torch's thread count; give the rest of the session its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_demo_recipe_runs_offline_and_reuses_its_cached_fp_model(tmp_path, capsys, torch_threads):
    common = ["--fp_max_steps", "4", "--max_steps", "2", "--per_device_train_batch_size", "16",
              "--max_eval_samples", "50", "--eval_strategy", "no", "--calibration_batches", "1",
              "--fp_cache_dir", str(tmp_path / "fp"), "--disable_tqdm", "true"]
    assert main(["train", str(DEMO_RECIPE), *common, "--output_dir", str(tmp_path / "a")]) == 0
    assert torch.get_num_threads() == 1  # torch_num_threads: 1 in the recipe
    first = capsys.readouterr().out
    assert "full-precision stage ->" in first and "demo_digits, split test (50 images)" in first
    assert main(["train", str(DEMO_RECIPE), *common, "--output_dir", str(tmp_path / "b")]) == 0
    assert "reusing the full-precision model cached at" in capsys.readouterr().out
    a, b = (json.loads((tmp_path / name / "saq_run.json").read_text()) for name in "ab")
    assert a["fp_model"] == b["fp_model"]
    assert a["results"] == b["results"]  # the cached FP model gives the very same run
    assert a["base_model"] is None and a["quantization"]["tag"] == "W4A4"
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert (config["image_size"], config["patch_size"], len(config["id2label"])) == (28, 7, 10)
    # The cached FP model's folder holds its training arguments as JSON, no pickle.
    fp_folder = Path(a["fp_model"])
    assert json.loads((fp_folder / "training_args.json").read_text())["max_steps"] == 4
    assert not [p.name for p in fp_folder.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl")]


class HubRecorder:
    """Stands in for huggingface_hub.HfApi: records repo creation and the files an upload would send."""

    def __init__(self, fail_upload=False):
        self.calls, self.fail_upload = [], fail_upload

    def __call__(self, token=None):
        return self

    def create_repo(self, repo_id, private=None, exist_ok=False):
        self.calls.append(("create_repo", repo_id))
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, repo_id, folder_path, revision=None, commit_message=None, ignore_patterns=None):
        from huggingface_hub.utils import filter_repo_objects

        names = [str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file()]
        uploaded = sorted(filter_repo_objects(names, ignore_patterns=ignore_patterns))
        self.calls.append(("upload_folder", repo_id, uploaded))
        self.readme = (Path(folder_path) / "README.md").read_text()
        if self.fail_upload:
            raise ConnectionError("Connection reset by peer")
        return type("Commit", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/1"})()


@pytest.mark.parametrize("fail_upload", [False, True])
def test_push_to_hub_in_the_recipe_uploads_the_run_folder_with_the_saq_card(tmp_path, fixtures, capfd, monkeypatch,
                                                                             fail_upload):
    api = HubRecorder(fail_upload=fail_upload)
    monkeypatch.setattr(hub, "HfApi", api)
    recipe = write_recipe(tmp_path / "recipe.yaml", fixtures, max_steps=1, push_to_hub=True, hub_model_id="me/tiny",
                          hub_strategy="end")
    capfd.readouterr()
    assert main(["train", str(recipe)]) == (1 if fail_upload else 0)
    assert api.calls[0] == ("create_repo", "me/tiny")  # before training: a bad token fails fast
    assert api.calls[-1] == ("upload_folder", "me/tiny", ["README.md", "config.json", "model.safetensors",
                                                           "preprocessor_config.json", "saq_run.json",
                                                           "train_log.json", "training_args.json"])
    assert "base_model_relation" not in api.readme and "- saq" in api.readme  # our card, not the Trainer's
    assert 'from_pretrained("me/tiny")' in api.readme
    captured = capfd.readouterr()
    if fail_upload:
        run_dir = tmp_path / "run"
        assert captured.err.strip().splitlines()[-1] == (
            f"saq-hf: push to me/tiny failed (Connection reset by peer); the run is saved in {run_dir}; "
            f"retry with: saq-hf push {run_dir} --hub_model_id me/tiny")
        assert (run_dir / "model.safetensors").is_file() and (run_dir / "saq_run.json").is_file()
    else:
        assert "pushed: https://huggingface.co/me/tiny/commit/1" in captured.out


def bad_checkpoint(fixtures: Path, tmp_path: Path, problem: str) -> str:
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        (folder / name).write_bytes((fixtures / "tiny_vit" / name).read_bytes())
    if problem == "corrupt":
        (folder / "model.safetensors").write_bytes(b"\x00\x01 not a safetensors file")
    else:
        (folder / "model.safetensors").unlink()
    return str(folder)


BAD_INPUTS = {
    "unknown recipe key": ({"rhoo": 0.1}, [], "unknown recipe key rhoo (did you mean rho?)"),
    "unknown option": ({}, ["--w_bit", "3"], "unknown option --w_bit (did you mean --w_bits?)"),
    "wrong type": ({"num_train_epochs": "many"}, [], "num_train_epochs must be float, got 'many'"),
    "weight bits above 8": ({"w_bits": 9}, [], "w_bits must be an integer in 2..8, got 9 (recipe key: w_bits)"),
    "activation bits below 2": ({}, ["--a_bits", "1"], "a_bits must be an integer in 2..8"),
    "negative rho": ({}, ["--rho", "-0.5"], "rho must be 'auto' or a finite number >= 0, got -0.5 (option --rho)"),
    "unknown saq_mode": ({"saq_mode": "sam"}, [], "saq_mode must be one of"),
    "missing image column": ({"image_column_name": "img"}, [], "column 'img' not in split 'train'"),
    "missing label column": ({"label_column_name": "breed"}, [], "set label_column_name"),
    "offline dataset id": ({"dataset_name": "nobody/no-such-dataset", "data_dir": None}, [],
                           "could not load dataset 'nobody/no-such-dataset'"),
    "offline model id": ({"model_name_or_path": "nobody/no-such-model"}, [],
                         "could not load model 'nobody/no-such-model'"),
    "corrupt checkpoint": ({"model_name_or_path": "corrupt"}, [], "could not load model"),
    "missing checkpoint weights": ({"model_name_or_path": "missing"}, [], "could not load model"),
    "remove_unused_columns true": ({}, ["--remove_unused_columns", "true"], "remove_unused_columns must be false"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_stderr_line_exit_2_and_no_output_dir(case, tmp_path, fixtures, capfd):
    changes, flags, message = BAD_INPUTS[case]
    if changes.get("model_name_or_path") in ("corrupt", "missing"):
        changes = {"model_name_or_path": bad_checkpoint(fixtures, tmp_path, changes["model_name_or_path"])}
    recipe = write_recipe(tmp_path / "recipe.yaml", fixtures, fp_num_train_epochs=1, **changes)
    capfd.readouterr()
    assert main(["train", str(recipe), *flags]) == 2
    captured = capfd.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("saq-hf: error: ") and message in lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert not (tmp_path / "run").exists() and not (tmp_path / "fp_cache").exists()


def test_bad_eval_and_push_targets_exit_2(tmp_path, capfd, monkeypatch):
    monkeypatch.setattr(hub, "HfApi", None)  # any Hub call would fail loudly
    assert main(["eval", str(tmp_path / "nowhere")]) == 2
    assert main(["eval", str(tmp_path)]) == 2  # a folder with no model
    assert main(["eval", str(tmp_path), "--dataset", "demo_digits", "--split", "test"]) == 2  # the same, said once
    assert main(["push", str(tmp_path), "--hub_model_id", "me/x"]) == 2
    no_model = (f"saq-hf: error: '{tmp_path}' holds no model (no config.json with *.safetensors weights): pass the "
                "output_dir of a finished saq-hf run")
    assert capfd.readouterr().err.strip().splitlines() == [
        f"saq-hf: error: run folder '{tmp_path / 'nowhere'}' not found",
        no_model,
        no_model,
        f"saq-hf: error: '{tmp_path}' has no saq_run.json: pass the output_dir of a finished saq-hf run",
    ]


def test_eval_of_a_run_with_corrupt_weights_exits_2(tmp_path, fixtures, capfd):
    recipe = write_recipe(tmp_path / "recipe.yaml", fixtures, max_steps=1)
    assert main(["train", str(recipe)]) == 0
    (tmp_path / "run" / "model.safetensors").write_bytes(b"truncated")
    capfd.readouterr()
    assert main(["eval", str(tmp_path / "run")]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"saq-hf: error: could not load the model in '{tmp_path / 'run'}'")


def test_python_dash_m_exits_2_without_traceback(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("rhoo: 0.1\n")
    done = subprocess.run([sys.executable, "-m", "saq_hf", "train", str(recipe)], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr == "saq-hf: error: unknown recipe key rhoo (did you mean rho?)\n"


def test_eval_sharpness_goes_into_the_card_and_export_writes_integer_weights(tmp_path, fixtures, capsys):
    recipe = write_recipe(tmp_path / "recipe.yaml", fixtures, max_steps=1)
    assert main(["train", str(recipe)]) == 0
    run_dir = tmp_path / "run"
    capsys.readouterr()

    assert main(["eval", str(run_dir), "--sharpness", "--sharpness_rho", "0.1", "--sharpness_batches", "1"]) == 0
    out = capsys.readouterr().out
    report = json.loads((run_dir / "saq_run.json").read_text())["sharpness"]
    assert report["rho"] == 0.1 and report["n_samples"] == 6 and math.isfinite(report["top_eigenvalue"]) and report["top_eigenvalue"] != 0  # largest in magnitude: may be negative
    assert report["adversarial_loss_increase"] >= report["random_loss_increase"]
    assert any(line.startswith("top Hessian eigenvalue") and line.split()[-1] == f"{report['top_eigenvalue']:.4f}"
               for line in out.splitlines())
    # The measuring radius is not the training one (relative rho=0.05 in this recipe): the table says which is which.
    assert out.splitlines()[-1] == (
        "rho=0.1 here is the measuring radius: one ε of L2 norm 0.1 over all quantized weights Q(w) (||Q(w)|| = "
        f"{report['quantized_weight_norm']:.4g}), the same for every run so that runs compare; training used "
        "rho=0.05, relative: each perturbed tensor moved by 5 % of its own norm")
    card = (run_dir / "README.md").read_text()
    assert "## Sharpness" in card and f"| top Hessian eigenvalue | {report['top_eigenvalue']:.4f} |" in card
    assert "ρ here is the measuring radius" in card and "not the training radius `rho`" in card

    export_dir = tmp_path / "export"
    assert main(["export", str(run_dir), str(export_dir)]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:3] == ["bits", "layers", "weights"] and "W4" in table
    exported = saq_hf.load_exported(export_dir)
    trained = AutoModelForImageClassification.from_pretrained(run_dir).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(exported(pixel_values=x).logits, trained(pixel_values=x).logits,
                                   rtol=1e-5, atol=1e-6)


def test_export_into_a_folder_with_other_files_is_refused_and_keeps_them(tmp_path, fixtures, capfd):
    recipe = write_recipe(tmp_path / "recipe.yaml", fixtures, max_steps=1)
    assert main(["train", str(recipe)]) == 0
    run_dir = tmp_path / "run"
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    capfd.readouterr()
    assert main(["export", str(run_dir), str(run_dir)]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err == [f"saq-hf: error: {run_dir} already holds files that are not a saq-hf export: "
                   "choose a new or empty OUT_DIR"]
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before
    assert main(["export", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "no config.json" in capfd.readouterr().err and not (tmp_path / "out").exists()


def test_train_help_speaks_of_the_installed_package_not_the_source_tree(capsys):
    assert main(["train", "demo_mnist_vit_w4a4", "--help"]) == 0
    text = capsys.readouterr().out
    for internal in ("FIT_WINDOW", "FIT_SHARE", "README", "benchmarks/"):
        assert internal not in text, internal
    assert "plain QAT until its mean training loss over 10 optimizer steps falls below 0.25 x ln(num_classes)" in (
        " ".join(text.split()))


def test_search_writes_a_plan_that_train_reads_into_the_run_card_and_export(tmp_path, fixtures, capsys):
    import yaml

    from saq_hf.export import MANIFEST_FILE

    plan_path = tmp_path / "plan.yaml"
    assert main(["search", str(fixtures / "tiny_vit"), "--dataset", "imagefolder", "--data_dir",
                 str(fixtures / "images"), "--target_bits", "3", "--measure", "hessian", "--batches", "1",
                 "--batch_size", "6", "--out", str(plan_path)]) == 0
    assert f"wrote {plan_path}" in capsys.readouterr().out
    plan = yaml.safe_load(plan_path.read_text())
    assert plan["target_bits"] == 3.0 and plan["average_bits"] <= 3.0 and plan["budget_met"] is True
    recipe = write_recipe(tmp_path / "recipe.yaml", fixtures, max_steps=1, bits_plan=str(plan_path))
    assert main(["train", str(recipe)]) == 0
    run_dir = tmp_path / "run"
    info = json.loads((run_dir / "saq_run.json").read_text())
    recorded = info["quantization"]["bits_plan"]
    assert recorded["average_bits"] == pytest.approx(plan["average_bits"])
    assert recorded["weight_bytes"] == plan["weight_bytes"] and recorded["budget_met"] is True
    assert info["quantization"]["tag"] == f"W{plan['average_bits']:.2f}-mixed"
    card = (run_dir / "README.md").read_text()
    assert "## Mixed precision" in card and f"{plan['weight_bytes']:,} bytes of packed weight codes" in card
    expected = {name: (bits["w_bits"], bits["a_bits"]) for name, bits in plan["bits_overrides"].items()}
    assert quantized_layer_bits(AutoModelForImageClassification.from_pretrained(run_dir)) == expected
    assert main(["export", str(run_dir), str(tmp_path / "export")]) == 0
    manifest = json.loads((tmp_path / "export" / MANIFEST_FILE).read_text())
    assert sum(entry["weight"]["packed_bytes"] for entry in manifest["layers"].values()) == plan["weight_bytes"]


@pytest.mark.parametrize("change, message", [
    ("unknown layer", "names layer 'vit.no_such_layer', which the model does not have"),
    ("bits 9", "has w_bits 9; bits must be integers in 2..8"),
    ("over budget", "over its target_bits 2"),
])
def test_a_bad_bits_plan_is_one_line_before_any_training(change, message, tmp_path, fixtures, capfd):
    import yaml

    names = [name for name, module in ViTForImageClassification.from_pretrained(fixtures / "tiny_vit").named_modules()
             if isinstance(module, torch.nn.Linear | torch.nn.Conv2d)]
    overrides = {name: {"w_bits": 4, "a_bits": 4} for name in names}
    if change == "unknown layer":
        overrides["vit.no_such_layer"] = {"w_bits": 4}
    if change == "bits 9":
        overrides[names[1]] = {"w_bits": 9}
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"target_bits": 2 if change == "over budget" else 4,
                                    "bits_overrides": overrides}))
    recipe = write_recipe(tmp_path / "recipe.yaml", fixtures, fp_num_train_epochs=1, bits_plan=str(plan))
    capfd.readouterr()
    assert main(["train", str(recipe)]) == 2
    captured = capfd.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("saq-hf: error: bits_plan ") and message in lines[0], captured.err
    assert not (tmp_path / "run").exists() and not (tmp_path / "fp_cache").exists()


def test_search_refuses_an_infeasible_budget_in_one_line_before_loading_data(tmp_path, fixtures, capfd):
    assert main(["search", str(fixtures / "tiny_vit"), "--dataset", "nobody/not-loaded", "--target_bits", "1",
                 "--out", str(tmp_path / "plan.yaml")]) == 2
    lines = capfd.readouterr().err.strip().splitlines()
    assert lines == ["saq-hf: error: target_bits 1 is infeasible: the smallest candidate bit-width is 2; raise "
                     "target_bits or add smaller candidates"]
    assert not (tmp_path / "plan.yaml").exists()
