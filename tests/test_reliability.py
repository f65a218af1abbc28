"""A finished run is never lost or silently wrong: one test (or more) per case of the reliability pass.

Each test names its case (``test_caseN_...``). Runs are tiny (a 2-layer ViT, 20 images, 1-3 steps) and offline.
"""

import io
import json
import math
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageClassification

from conftest import ViTImageProcessorPil

import saq_hf
from conftest import ToyImages, tiny_vit
from saq_hf import QuantConfig, SAQTrainer, SAQTrainingArguments, calibrate, quantize_model
from saq_hf.args import DataArguments, ModelArguments, QuantArguments, UserInputError, parse_recipe
from saq_hf.cli import main
from saq_hf.export import MANIFEST_FILE, WEIGHTS_FILE, export_quantized, load_exported
from saq_hf.quant import quantized_layer_bits

CLASSES = ("ant", "bee", "cat", "dog", "eel")  # NUM_LABELS classes: the tiny ViT's head fits them
RECIPE_TYPES = (ModelArguments, DataArguments, QuantArguments, SAQTrainingArguments)


def write_images(root: Path, per_class: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for index, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for k in range(per_class):
            pixels = rng.integers(0, 60, size=(16, 16, 3), dtype=np.uint8)
            pixels[..., index % 3] = 40 * index + 30
            Image.fromarray(pixels).save(root / name / f"{k}.png")
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random FP ViT with its image processor, as a local model folder."""
    folder = tmp_path_factory.mktemp("tiny_vit")
    tiny_vit().save_pretrained(folder)
    ViTImageProcessorPil(size={"height": 16, "width": 16}).save_pretrained(folder)
    return folder


def recipe(tmp_path: Path, model_dir: Path, **changes) -> Path:
    images = tmp_path / "images"
    if not images.exists():
        write_images(images)
    values = {
        "model_name_or_path": str(model_dir), "data_dir": str(images), "train_val_split": 0.25,
        "random_flip": False, "calibration_batches": 1, "max_steps": 1, "per_device_train_batch_size": 5,
        "per_device_eval_batch_size": 5, "learning_rate": 1e-3, "save_strategy": "no", "eval_strategy": "no",
        "report_to": "none", "remove_unused_columns": False, "disable_tqdm": True,
        "output_dir": str(tmp_path / "run"), "fp_cache_dir": str(tmp_path / "fp_cache"),
    }
    values.update(changes)
    path = tmp_path / "recipe.yaml"
    path.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in values.items() if value is not None))
    return path


def error_line(stderr: str, stdout: str = "") -> str:
    """The one error line of a refused command: the last line of stderr, the only error there, no traceback."""
    lines = stderr.strip().splitlines()
    assert lines and lines[-1].startswith("saq-hf: error: "), stderr[-2000:]
    assert sum(line.startswith("saq-hf: error") for line in lines) == 1 and "Traceback" not in stderr + stdout
    return lines[-1]


def one_error_line(capfd) -> str:
    captured = capfd.readouterr()
    return error_line(captured.err, captured.out)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, model_dir):
    """A finished run (1 SAQ step, checkpoints at steps 1 and 2) to copy from; never modified."""
    tmp_path = tmp_path_factory.mktemp("finished")
    path = recipe(tmp_path, model_dir, max_steps=2, save_strategy="steps", save_steps=1)
    assert main(["train", str(path)]) == 0
    return tmp_path / "run"


def copy_run(finished_run: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(finished_run, target)
    return target


# --- 1. data loss: overwrite protection, atomic run folders, concurrent runs --------------------------------------

def test_case1_a_finished_run_is_not_replaced_without_overwrite_output_dir(tmp_path, model_dir, capfd):
    path = recipe(tmp_path, model_dir)
    assert main(["train", str(path)]) == 0
    before = folder_bytes(tmp_path / "run")
    capfd.readouterr()
    assert main(["train", str(path), "--rho", "0.1"]) == 2
    line = one_error_line(capfd)
    assert "already holds a finished saq-hf run" in line and "--overwrite_output_dir" in line
    assert folder_bytes(tmp_path / "run") == before
    assert main(["train", str(path), "--rho", "0.1", "--overwrite_output_dir", "true"]) == 0
    saq = json.loads((tmp_path / "run" / "saq_run.json").read_text())["saq"]
    # The tiny random model starts untrained and never fits in these few steps: SAQ never started.
    assert saq["rho"] == 0.1 and saq["rho_used"] == 0.1 and saq["start_step"] is None
    assert not (tmp_path / "run.partial").exists()


def test_case1_a_crash_during_training_leaves_the_previous_run_whole(tmp_path, model_dir, monkeypatch):
    path = recipe(tmp_path, model_dir)
    assert main(["train", str(path)]) == 0
    before = folder_bytes(tmp_path / "run")
    seen = {}

    def crash(self, model, inputs, num_items_in_batch=None):
        seen["output_dir"] = self.args.output_dir
        raise RuntimeError("killed")

    monkeypatch.setattr(SAQTrainer, "training_step", crash)
    with pytest.raises(RuntimeError, match="killed"):
        main(["train", str(path), "--overwrite_output_dir", "true"])
    assert seen["output_dir"] == str(tmp_path / "run.partial")  # built beside output_dir, renamed at the end
    assert folder_bytes(tmp_path / "run") == before


def test_case1_a_second_run_into_the_same_output_dir_is_refused_while_the_first_runs(tmp_path, model_dir, capfd):
    staging = tmp_path / "run.partial"
    staging.mkdir()
    (staging / "_saq_hf_writer.json").write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename}))
    capfd.readouterr()
    assert main(["train", str(recipe(tmp_path, model_dir))]) == 2
    assert f"another saq-hf run (pid {os.getpid()}) is writing output_dir" in one_error_line(capfd)
    assert not (tmp_path / "run").exists() and not (tmp_path / "fp_cache").exists()


# --- 2. an unwritable output_dir is found before any work ---------------------------------------------------------

def unwritable_dir(tmp_path: Path) -> Path:
    if os.geteuid() == 0:  # root writes through any mode bits; sysfs refuses new files even to root
        return Path("/sys/saq_hf_test_unwritable/run")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    return locked / "run"


@pytest.mark.parametrize("kind", ["file", "unwritable"])
def test_case2_an_output_dir_that_cannot_be_written_fails_in_prepare(tmp_path, model_dir, capfd, kind):
    if kind == "file":
        output_dir = tmp_path / "run"
        output_dir.write_text("not a folder")
    else:
        output_dir = unwritable_dir(tmp_path)
    path = recipe(tmp_path, model_dir, output_dir=str(output_dir), fp_max_steps=1)
    capfd.readouterr()
    assert main(["train", str(path)]) == 2
    line = one_error_line(capfd)
    assert "output_dir" in line and ("is a file" in line if kind == "file" else "cannot write to output_dir" in line)
    assert not (tmp_path / "fp_cache").exists()  # the FP stage never started


# --- 3. checkpoints are checked before any work; "true" means the newest complete one ----------------------------

def test_case3_resume_true_skips_an_incomplete_checkpoint_and_says_so(tmp_path, finished_run, model_dir, capfd):
    run = copy_run(finished_run, tmp_path / "run")
    (run / "checkpoint-2" / "trainer_state.json").unlink()  # kill -9 while saving checkpoint-2
    path = recipe(tmp_path, model_dir, max_steps=3, save_strategy="steps", save_steps=1)
    capfd.readouterr()
    assert main(["train", str(path), "--resume_from_checkpoint", "true", "--overwrite_output_dir", "true"]) == 0
    out = capfd.readouterr().out
    assert "skipping incomplete checkpoints (checkpoint-2: no trainer_state.json)" in out
    assert f"resuming from {run}/checkpoint-1" in out
    assert json.loads((run / "saq_run.json").read_text())["training"]["global_steps"] == 3
    assert (run / "checkpoint-1" / "trainer_state.json").is_file()


def test_case3_a_truncated_optimizer_state_is_refused_naming_the_file(tmp_path, finished_run, model_dir, capfd):
    run = copy_run(finished_run, tmp_path / "run")
    optimizer = run / "checkpoint-2" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])
    path = recipe(tmp_path, model_dir, max_steps=3, fp_max_steps=1)
    capfd.readouterr()
    assert main(["train", str(path), "--resume_from_checkpoint", str(run / "checkpoint-2"),
                 "--overwrite_output_dir", "true"]) == 2
    assert "checkpoint" in (line := one_error_line(capfd)) and "optimizer.pt is truncated" in line
    assert not (tmp_path / "fp_cache").exists()


def test_case3_an_interrupted_run_is_kept_until_resumed_or_discarded(tmp_path, finished_run, model_dir, capfd):
    partial = copy_run(finished_run, tmp_path / "run.partial")  # what a kill -9 after step 2 leaves behind
    (partial / "saq_run.json").unlink()
    state_path = partial / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_path.read_text())
    state_path.write_text(json.dumps({**state, "best_metric": 0.125}))  # a mark only a resumed run carries on
    path = recipe(tmp_path, model_dir, max_steps=3, save_strategy="steps", save_steps=1)
    capfd.readouterr()
    assert main(["train", str(path)]) == 2
    assert one_error_line(capfd) == (f"saq-hf: error: '{partial}' holds an interrupted run (last complete checkpoint: "
                                     "checkpoint-2): pass --resume_from_checkpoint true to continue it, or "
                                     "--overwrite_output_dir true to discard it")
    assert main(["train", str(path), "--resume_from_checkpoint", "true"]) == 0
    run = tmp_path / "run"
    assert json.loads((run / "checkpoint-3" / "trainer_state.json").read_text())["best_metric"] == 0.125
    assert json.loads((run / "saq_run.json").read_text())["training"]["global_steps"] == 3 and not partial.exists()
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2",
                                                                              "checkpoint-3"]


# --- 4. load_best_model_at_end gives exactly the best checkpoint's weights ---------------------------------------

def test_case4_load_best_model_at_end_restores_the_best_checkpoint_exactly(tmp_path):
    model = quantize_model(tiny_vit(), QuantConfig(w_bits=4, a_bits=4))
    calibrate(model, [{"pixel_values": ToyImages(8).pixel_values}])
    evaluations = []

    def first_is_best(eval_pred):  # every later evaluation scores lower, so checkpoint-1 is the best
        evaluations.append(1)
        return {"score": -len(evaluations)}

    args = SAQTrainingArguments(output_dir=str(tmp_path / "out"), max_steps=3, learning_rate=5e-2,
                                per_device_train_batch_size=8, eval_strategy="steps", eval_steps=1, save_steps=1,
                                load_best_model_at_end=True, metric_for_best_model="score", greater_is_better=True,
                                report_to=[], disable_tqdm=True)
    trainer = SAQTrainer(model=model, args=args, train_dataset=ToyImages(16), eval_dataset=ToyImages(8, seed=1),
                         compute_metrics=first_is_best)
    trainer.train()
    assert trainer.state.best_model_checkpoint == str(tmp_path / "out" / "checkpoint-1")
    best = AutoModelForImageClassification.from_pretrained(tmp_path / "out" / "checkpoint-1").state_dict()
    last = AutoModelForImageClassification.from_pretrained(tmp_path / "out" / "checkpoint-3").state_dict()
    final = trainer.model.state_dict()
    assert any(not torch.equal(best[k], last[k]) for k in best)  # the choice matters
    differing = [key for key in best if not torch.equal(final[key].cpu(), best[key])]
    assert differing == []


# --- 5. step sizes that cannot quantize, or missing quantizer state, fail at load naming the tensor --------------

@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved")
    model = quantize_model(tiny_vit(), QuantConfig(w_bits=4, a_bits=4))
    calibrate(model, [{"pixel_values": ToyImages(8).pixel_values}])
    model.save_pretrained(folder)
    return folder


def edited_copy(saved_model: Path, target: Path, edit_tensors=None, edit_config=None) -> Path:
    import shutil

    shutil.copytree(saved_model, target)
    if edit_tensors:
        tensors = load_file(target / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    if edit_config:
        config = json.loads((target / "config.json").read_text())
        edit_config(config["quantization_config"])
        (target / "config.json").write_text(json.dumps(config))
    return target


def step_key(tensors: dict, part: str = "input_quantizer") -> str:
    """The first (non-classifier) step-size tensor of ``part``: ``log_step_size`` in a checkpoint, ``step_size`` in an
    export."""
    return next(key for key in sorted(tensors) if key.endswith((f"{part}.step_size", f"{part}.log_step_size"))
                and "classifier" not in key)


@pytest.mark.parametrize("value", [math.nan, math.inf, "zero", "missing"])
def test_case5_a_nan_infinite_zero_or_missing_step_size_fails_at_load_naming_it(tmp_path, saved_model, value):
    names = {}

    def edit(tensors):
        names["key"] = step_key(tensors)
        if value == "missing":
            del tensors[names["key"]]
        else:  # the checkpoint holds log(s): s = 0 is log(s) = -inf
            tensors[names["key"]] = torch.full_like(tensors[names["key"]], -math.inf if value == "zero" else value)

    folder = edited_copy(saved_model, tmp_path / "edited", edit_tensors=edit)
    with pytest.raises(ValueError, match="missing quantizer tensor" if value == "missing" else "invalid value"):
        AutoModelForImageClassification.from_pretrained(folder)


def test_case5_eval_and_export_of_a_nan_step_size_exit_2_and_load_exported_refuses_it(tmp_path, saved_model, capfd):
    def nan_weight_step(tensors):
        key = step_key(tensors, "weight_quantizer")
        tensors[key] = torch.full_like(tensors[key], math.nan)

    folder = edited_copy(saved_model, tmp_path / "nan", edit_tensors=nan_weight_step)
    capfd.readouterr()
    assert main(["export", str(folder), str(tmp_path / "export")]) == 2
    assert "invalid value" in one_error_line(capfd) and not (tmp_path / "export" / MANIFEST_FILE).exists()

    model = AutoModelForImageClassification.from_pretrained(saved_model)
    with torch.no_grad():
        model.classifier.input_quantizer.set_step_size(math.inf)
        with pytest.raises(ValueError, match="step size classifier.input_quantizer.step_size holds 1 invalid value"):
            export_quantized(model, tmp_path / "inf_export")
        model.classifier.input_quantizer.set_step_size(0.05)
    export_quantized(model, tmp_path / "good_export")
    tensors = load_file(tmp_path / "good_export" / WEIGHTS_FILE)
    key = step_key(tensors)
    tensors[key] = torch.zeros_like(tensors[key])
    save_file(tensors, tmp_path / "good_export" / WEIGHTS_FILE, metadata={"format": "pt", "saq-hf-export": "1"})
    manifest = json.loads((tmp_path / "good_export" / MANIFEST_FILE).read_text())
    from saq_hf.export import _sha256
    manifest["weights_sha256"] = _sha256(tmp_path / "good_export" / WEIGHTS_FILE)
    (tmp_path / "good_export" / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=f"step size {key.replace('.', '[.]')} holds"):
        load_exported(tmp_path / "good_export")


def test_case5_step_sizes_stay_positive_under_a_learning_rate_that_drove_them_below_zero(tmp_path, model_dir, capfd):
    # AdamW moved each (linear) step size by about the learning rate per step: at 1e-2, far more than an 8-bit weight
    # step, and the step sizes crossed zero. Trained as log(s), each moves by a share of itself.
    assert main(["train", str(recipe(tmp_path, model_dir, learning_rate=1e-2))]) == 0
    assert "went to zero or below" not in capfd.readouterr().out
    model = AutoModelForImageClassification.from_pretrained(tmp_path / "run")
    steps = [q.step_size for _, layer in saq_hf.quant.quantized_layers(model)
             for q in (layer.weight_quantizer, layer.input_quantizer) if q is not None]
    assert steps and all(bool((s > 0).all()) and bool(torch.isfinite(s).all()) for s in steps)


# --- 6. a quantization_config that no longer fits the weights fails at load ---------------------------------------

@pytest.mark.parametrize("edit,message", [
    (lambda q: q.update(bits_overrides={"classifer": {"w_bits": 8, "a_bits": 8}}),
     "bits_overrides pattern 'classifer' matches no"),
    (lambda q: q.update(modules_to_not_convert=["classifier"]), "unused quantizer tensor"),
])
def test_case6_a_config_that_does_not_fit_the_saved_quantizers_fails_at_load(tmp_path, saved_model, edit, message):
    assert quantized_layer_bits(AutoModelForImageClassification.from_pretrained(saved_model))["classifier"] == (8, 8)
    folder = edited_copy(saved_model, tmp_path / "edited", edit_config=edit)
    with pytest.raises(ValueError, match=message):
        AutoModelForImageClassification.from_pretrained(folder)


def test_case6_unexpected_quantizer_keys_fail_at_load(tmp_path, saved_model):
    def extra(tensors):
        tensors["vit.encoder.layer.9.output.dense.input_quantizer.step_size"] = torch.ones(())

    folder = edited_copy(saved_model, tmp_path / "extra", edit_tensors=extra)
    with pytest.raises(ValueError, match="1 unused quantizer tensor"):
        AutoModelForImageClassification.from_pretrained(folder)


def test_case6_eval_does_not_label_a_plain_fp_model_w4a4(tmp_path, finished_run, capfd):
    run = copy_run(finished_run, tmp_path / "run")
    tiny_vit().save_pretrained(run)  # an FP model in place of the quantized one, saq_run.json still says W4A4
    capfd.readouterr()
    assert main(["eval", str(run)]) == 2
    assert "is not quantized" in one_error_line(capfd)


# --- 7. the FP-stage cache depends on the data, and a corrupt entry is rebuilt -------------------------------------

def test_case7_changed_images_or_class_names_do_not_reuse_the_fp_cache(tmp_path, model_dir, capfd):
    path = recipe(tmp_path, model_dir, fp_max_steps=1)
    assert main(["train", str(path), "--output_dir", str(tmp_path / "a")]) == 0
    first = capfd.readouterr().out
    assert "full-precision stage ->" in first
    Image.new("RGB", (16, 16), (255, 0, 0)).save(tmp_path / "images" / "ant" / "0.png")  # same recipe, new data
    assert main(["train", str(path), "--output_dir", str(tmp_path / "b")]) == 0
    assert "reusing the full-precision model" not in capfd.readouterr().out
    (tmp_path / "images" / "eel").rename(tmp_path / "images" / "fly")  # same files, other class name
    assert main(["train", str(path), "--output_dir", str(tmp_path / "c")]) == 0
    assert "reusing the full-precision model" not in capfd.readouterr().out
    assert len(list((tmp_path / "fp_cache").iterdir())) == 3


def test_case7_a_corrupt_fp_cache_entry_is_reported_as_such_and_rebuilt(tmp_path, model_dir, capfd):
    path = recipe(tmp_path, model_dir, fp_max_steps=1)
    assert main(["train", str(path), "--output_dir", str(tmp_path / "a")]) == 0
    (entry,) = (tmp_path / "fp_cache").iterdir()
    (entry / "model.safetensors").write_bytes(b"\x00" * 10)
    capfd.readouterr()
    assert main(["train", str(path), "--output_dir", str(tmp_path / "b")]) == 0
    out = capfd.readouterr().out
    assert f"the cached full-precision model {entry} is unreadable" in out and "rebuilt" in out
    assert "full-precision stage ->" in out
    AutoModelForImageClassification.from_pretrained(entry)  # whole again


# --- 8. non-finite calibration data fails instead of giving NaN step sizes -----------------------------------------

def test_case8_a_nan_pixel_in_calibration_fails_and_leaves_no_nan_step_size():
    model = quantize_model(tiny_vit(), QuantConfig(w_bits=4, a_bits=4))
    pixels = ToyImages(4).pixel_values.clone()
    pixels[1, 0, 3, 3] = math.nan
    with pytest.raises(ValueError, match="^calibration batch 0: cannot initialise a step size from NaN or infinite"):
        calibrate(model, [{"pixel_values": pixels}])
    steps = [layer.input_quantizer.step_size for _, layer in saq_hf.quant.quantized_layers(model)]
    assert all(torch.isfinite(step).all() for step in steps)


def test_case8_a_zero_image_std_is_refused_before_any_work(tmp_path, model_dir, capfd):
    import shutil

    broken = tmp_path / "model"
    shutil.copytree(model_dir, broken)
    ViTImageProcessorPil(size={"height": 16, "width": 16}, image_std=[0.0, 0.0, 0.0]).save_pretrained(broken)
    capfd.readouterr()
    assert main(["train", str(recipe(tmp_path, broken, fp_max_steps=1))]) == 2
    assert "image processor's normalisation cannot be used" in one_error_line(capfd)
    assert not (tmp_path / "fp_cache").exists()


# --- 9. no code from a model folder ever runs ----------------------------------------------------------------------

def custom_code_folder(saved_model: Path, target: Path, marker: Path) -> Path:
    import shutil

    shutil.copytree(saved_model, target)
    config = json.loads((target / "config.json").read_text())
    config.update(model_type="evil_vit", auto_map={"AutoConfig": "evil.EvilConfig",
                                                   "AutoModelForImageClassification": "evil.EvilModel"})
    (target / "config.json").write_text(json.dumps(config))
    (target / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                    "from transformers import ViTConfig, ViTForImageClassification\n"
                                    "class EvilConfig(ViTConfig):\n    model_type = 'evil_vit'\n"
                                    "class EvilModel(ViTForImageClassification):\n    config_class = EvilConfig\n")
    ViTImageProcessorPil(size={"height": 16, "width": 16}).save_pretrained(target)
    return target


def test_case9_export_with_y_piped_in_runs_no_code_from_the_folder(tmp_path, saved_model):
    marker = tmp_path / "ran"
    folder = custom_code_folder(saved_model, tmp_path / "evil", marker)
    done = subprocess.run([sys.executable, "-m", "saq_hf", "export", str(folder), str(tmp_path / "out")],
                          input="y\ny\ny\n", capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert not marker.exists()
    assert done.returncode == 2 and "auto_map" in error_line(done.stderr, done.stdout)


@pytest.mark.parametrize("command", ["train", "eval"])
def test_case9_train_and_eval_from_a_custom_code_folder_refuse_it(tmp_path, saved_model, model_dir, finished_run,
                                                                   monkeypatch, capfd, command):
    marker = tmp_path / "ran"
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 5))
    if command == "train":
        folder = custom_code_folder(model_dir, tmp_path / "evil", marker)
        argv = ["train", str(recipe(tmp_path, folder))]
    else:
        folder = custom_code_folder(finished_run, tmp_path / "evil", marker)
        argv = ["eval", str(folder)]
    capfd.readouterr()
    assert main(argv) == 2
    assert not marker.exists()
    assert "auto_map" in one_error_line(capfd)


# --- 10. bad input is one line, exit 2, before any work -----------------------------------------------------------

TRAIN_BAD_INPUTS = {
    "batch size 0": (["--per_device_train_batch_size", "0"], "per_device_train_batch_size must be an integer >= 1"),
    "accumulation 0": (["--gradient_accumulation_steps", "0"], "gradient_accumulation_steps must be an integer >= 1"),
    "negative learning rate": (["--learning_rate", "-1"], "learning_rate must be a finite number > 0, got -1.0"),
    "nothing to quantize": (["--modules_to_not_convert", "*"], "no nn.Linear or nn.Conv2d left to quantize"),
    "finished run as model": ([], "is already quantized"),
}


@pytest.mark.parametrize("case", sorted(TRAIN_BAD_INPUTS))
def test_case10_bad_train_input_is_one_line_before_any_work(case, tmp_path, model_dir, finished_run, capfd):
    flags, message = TRAIN_BAD_INPUTS[case]
    source = finished_run if case == "finished run as model" else model_dir
    path = recipe(tmp_path, source, fp_max_steps=1)
    capfd.readouterr()
    assert main(["train", str(path), *flags]) == 2
    assert message in one_error_line(capfd)
    assert not (tmp_path / "run").exists() and not (tmp_path / "fp_cache").exists()


def test_case10_a_recipe_that_is_not_utf8_is_one_line(tmp_path, capfd):
    path = tmp_path / "recipe.yaml"
    path.write_bytes("model_type: vit\nrun_name: caf\xe9\n".encode("latin-1"))
    assert main(["train", str(path)]) == 2
    assert "is not UTF-8 text" in one_error_line(capfd)


@pytest.mark.parametrize("flags,message", [
    (["--batch_size", "0"], "--batch_size must be an integer >= 1"),
    (["--sharpness", "--sharpness_batches", "0"], "--sharpness_batches must be an integer >= 1"),
    (["--sharpness", "--sharpness_rho", "nan"], "--sharpness_rho must be a finite number"),
])
def test_case10_bad_eval_flags_are_one_line(tmp_path, finished_run, capfd, flags, message):
    run = copy_run(finished_run, tmp_path / "run")
    before = (run / "saq_run.json").read_bytes()
    capfd.readouterr()
    assert main(["eval", str(run), *flags]) == 2
    assert message in one_error_line(capfd)
    assert (run / "saq_run.json").read_bytes() == before


@pytest.mark.parametrize("content,message", [
    ("[1, 2]", "must hold a JSON object, got a list"),
    ("unknown", "has unknown fields 'surprise'"),
    ("data", "in the data settings of saq_run.json"),
])
def test_case10_a_tampered_saq_run_json_is_one_line(tmp_path, finished_run, capfd, content, message):
    run = copy_run(finished_run, tmp_path / "run")
    info = json.loads((run / "saq_run.json").read_text())
    if content == "unknown":
        info["surprise"] = 1
    elif content == "data":
        info["data"]["colour_jitter"] = 0.4
    (run / "saq_run.json").write_text(content if content.startswith("[") else json.dumps(info))
    capfd.readouterr()
    assert main(["eval", str(run)]) == 2
    assert message in one_error_line(capfd)


def test_case10_export_of_a_truncated_model_is_one_line(tmp_path, saved_model, capfd):
    folder = edited_copy(saved_model, tmp_path / "run")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size - 100])
    capfd.readouterr()
    assert main(["export", str(folder), str(tmp_path / "out")]) == 2
    assert "could not load the model in" in one_error_line(capfd)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, saved_model):
    folder = tmp_path_factory.mktemp("export")
    export_quantized(AutoModelForImageClassification.from_pretrained(saved_model), folder)
    return folder


def test_case10_load_exported_raises_value_error_on_a_deeply_nested_manifest(tmp_path, export_dir):
    import shutil

    folder = tmp_path / "export"
    shutil.copytree(export_dir, folder)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["layers"][next(iter(manifest["layers"]))]["weight"] = "NESTED"
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest).replace('"NESTED"', "[" * 100_000 + "]" * 100_000))
    with pytest.raises(ValueError, match="export_manifest.json is not valid JSON"):
        load_exported(folder)


@pytest.mark.parametrize("problem", ["zero-byte", "truncated", "truncated jpeg", "not an image", "decompression bomb"])
def test_case10_a_bad_image_file_is_one_line_naming_it_before_training(tmp_path, model_dir, capfd, monkeypatch,
                                                                       problem):
    path = recipe(tmp_path, model_dir, fp_max_steps=1)
    bad = tmp_path / "images" / "bee" / "2.png"
    if problem == "zero-byte":
        bad.write_bytes(b"")
    elif problem == "truncated":
        bad.write_bytes(bad.read_bytes()[:60])
    elif problem == "truncated jpeg":  # PIL's verify() passes it: only decoding finds the missing end
        bad = bad.with_suffix(".jpg")
        jpeg = io.BytesIO()
        Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(jpeg, "JPEG")
        bad.write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    elif problem == "not an image":
        bad.write_bytes(b"%PDF-1.4 definitely not a png")
    else:
        Image.new("L", (200, 200)).save(bad)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40,000 pixels is a bomb under this limit
    capfd.readouterr()
    assert main(["train", str(path)]) == 2
    line = one_error_line(capfd)
    assert f"image '{bad}' cannot be read" in line
    assert not (tmp_path / "fp_cache").exists() and not (tmp_path / "run").exists()


def test_case10_a_bad_image_in_a_hub_dataset_is_named_by_split_and_row(monkeypatch):
    from datasets import ClassLabel, Dataset, DatasetDict, Features
    from datasets import Image as ImageFeature

    import saq_hf.data
    from saq_hf.data import load_image_data, with_transforms

    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    images = [{"bytes": png.getvalue(), "path": None}] * 6
    images[3] = {"bytes": png.getvalue()[:40], "path": None}  # truncated, and no file name to show
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=["a", "b"])})
    raw = DatasetDict(train=Dataset.from_dict({"image": images, "label": [0, 1] * 3}, features=features))
    monkeypatch.setattr(saq_hf.data, "_load_raw", lambda data_args, cache_dir: raw)
    args = DataArguments(dataset_name="someone/pets", test_split=None, train_val_split=0.5)
    data = load_image_data(args)
    with_transforms(data, ViTImageProcessorPil(size={"height": 8, "width": 8}), args)
    with pytest.raises(UserInputError, match=r"^image train\[3\] of the dataset cannot be read"):
        for split in (data.train, data.validation):
            [split[row] for row in range(split.num_rows)]


# --- 11. YAML: no multi-GB error messages, no silently dropped duplicate keys ------------------------------------

def test_case11_a_yaml_alias_bomb_gives_a_short_error(tmp_path):
    lines = ["model_type: vit", "fp_max_steps: 1", "dataset_name: demo_digits", "modules_to_not_convert:",
             '  - &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"  - &l{level} [" + ", ".join([f"*l{level - 1}"] * 9) + "]" for level in range(1, 7)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserInputError) as error:
        parse_recipe(path, [], RECIPE_TYPES)
    assert len(str(error.value)) < 400
    assert str(error.value).startswith("modules_to_not_convert holds more than 10,000 items")


def test_case11_a_key_given_twice_is_refused_naming_it(tmp_path, capfd):
    path = tmp_path / "recipe.yaml"
    path.write_text("model_type: vit\nrho: 0.1\nw_bits: 4\nrho: 0.5\n")
    assert main(["train", str(path)]) == 2
    assert one_error_line(capfd) == "saq-hf: error: recipe key 'rho' is given twice (line 4): keep one"


# --- 12. fp16 on the CPU is refused, not silently ignored -------------------------------------------------------

def test_case12_fp16_on_the_cpu_is_refused(tmp_path, model_dir, capfd):
    if torch.cuda.is_available():
        pytest.skip("fp16 works where there is a GPU")
    capfd.readouterr()
    assert main(["train", str(recipe(tmp_path, model_dir, fp_max_steps=1)), "--fp16", "true"]) == 2
    assert "fp16 mixed precision needs a GPU" in one_error_line(capfd)
    assert not (tmp_path / "fp_cache").exists()


# --- 13. Ctrl-C: one line saying what was kept and the exact command that continues or discards it ---------------

def interrupt_before_step(monkeypatch, step: int) -> dict:
    """Ctrl-C (a KeyboardInterrupt) when optimizer step ``step`` + 1 begins, while ``armed["on"]``."""
    armed = {"on": True}
    real = SAQTrainer.training_step

    def training_step(self, model, inputs, num_items_in_batch=None):
        if armed["on"] and self.state.global_step == step:
            raise KeyboardInterrupt
        return real(self, model, inputs, num_items_in_batch)

    monkeypatch.setattr(SAQTrainer, "training_step", training_step)
    return armed


def interrupted_line(capfd) -> str:
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err + captured.out and "KeyboardInterrupt" not in captured.err
    return captured.err.strip().splitlines()[-1]


def test_case13_ctrl_c_keeps_the_last_checkpoint_and_prints_the_command_that_continues_it(tmp_path, model_dir,
                                                                                         monkeypatch, capfd):
    path = recipe(tmp_path, model_dir, max_steps=4, save_strategy="steps", save_steps=2)
    armed = interrupt_before_step(monkeypatch, 2)  # after checkpoint-2 was saved
    capfd.readouterr()
    assert main(["train", str(path)]) == 130
    staging = tmp_path / "run.partial"
    line = interrupted_line(capfd)
    continue_command = f"saq-hf train {path} --resume_from_checkpoint true"
    assert line == (f"saq-hf: interrupted; the unfinished run is kept in {staging} (last complete checkpoint: "
                    f"checkpoint-2); continue it with: {continue_command}; or start over with: rm -r {staging} && "
                    f"saq-hf train {path}")
    armed["on"] = False
    assert main(shlex.split(continue_command)[1:]) == 0
    info = json.loads((tmp_path / "run" / "saq_run.json").read_text())
    assert info["training"]["global_steps"] == 4 and not staging.exists()
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


# --- 14. An interrupted run that saved no checkpoint: only the advice that works ---------------------------------

def test_case14_an_interrupted_run_without_a_checkpoint_is_offered_only_what_can_work(tmp_path, model_dir,
                                                                                     monkeypatch, capfd):
    path = recipe(tmp_path, model_dir, max_steps=3)  # save_strategy "no", as in the demo
    armed = interrupt_before_step(monkeypatch, 1)
    capfd.readouterr()
    assert main(["train", str(path)]) == 130
    staging = tmp_path / "run.partial"
    assert interrupted_line(capfd) == (f"saq-hf: interrupted; the unfinished run in {staging} saved no checkpoint to "
                                       f"continue from; start over with: rm -r {staging} && saq-hf train {path}")
    armed["on"] = False
    assert main(["train", str(path)]) == 2
    assert one_error_line(capfd) == (f"saq-hf: error: '{staging}' holds an interrupted run that saved no complete "
                                     "checkpoint, so it cannot be continued: pass --overwrite_output_dir true to "
                                     "discard it and start over")
    # Asking to resume anyway gets the same way out, not the advice that led here.
    assert main(["train", str(path), "--resume_from_checkpoint", "true"]) == 2
    assert one_error_line(capfd) == (f"saq-hf: error: no complete checkpoint to resume from in '{tmp_path / 'run'}': "
                                     "drop resume_from_checkpoint and pass --overwrite_output_dir true to discard the "
                                     f"interrupted run in '{staging}' and start over")
    assert main(["train", str(path), "--overwrite_output_dir", "true"]) == 0
    info = json.loads((tmp_path / "run" / "saq_run.json").read_text())
    assert info["training"]["global_steps"] == 3 and not staging.exists()


# --- 15. No shipped recipe replaces a finished run; `make demo` asks for it on its command line -------------------

ROOT = Path(__file__).resolve().parents[1]


def test_case15_no_shipped_recipe_overwrites_and_the_demo_refuses_a_finished_run(tmp_path, capfd):
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        assert "overwrite_output_dir" not in yaml.safe_load(path.read_text()), path.name
    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "saq_run.json").write_text("{}\n")
    (finished / "config.json").write_text("{}\n")
    before = folder_bytes(finished)
    capfd.readouterr()
    assert main(["train", "demo_mnist_vit_w4a4", "--output_dir", str(finished)]) == 2
    assert one_error_line(capfd) == (f"saq-hf: error: output_dir '{finished}' already holds a finished saq-hf run: "
                                     "pass --overwrite_output_dir true to replace it, or choose another output_dir")
    assert folder_bytes(finished) == before
    makefile = (ROOT / "Makefile").read_text()
    demo = makefile[makefile.index("\ndemo:"):].splitlines()[2]
    assert demo == "\t$(BIN)/saq-hf train recipes/demo_mnist_vit_w4a4.yaml --overwrite_output_dir true"


# --- 16. Every file of a run folder follows the umask (safetensors writes its files 600) -------------------------

def test_case16_every_file_of_a_run_folder_and_the_fp_cache_follows_the_umask(tmp_path, model_dir):
    previous = os.umask(0o022)
    try:
        assert main(["train", str(recipe(tmp_path, model_dir, fp_max_steps=1, max_steps=2, save_strategy="steps",
                                         save_steps=1))]) == 0
    finally:
        os.umask(previous)
    files = [p for folder in ("run", "fp_cache") for p in (tmp_path / folder).rglob("*") if p.is_file()]
    # run, checkpoint-1 and -2 (each with rho="auto"'s state beside its weights), FP cache
    assert len([p for p in files if p.suffix == ".safetensors"]) == 6
    assert {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {
        str(p.relative_to(tmp_path)): "0o644" for p in files}
