"""saq_hf.checkpoint_state, step_log and radius_rule_for: the arguments saved as JSON (no pickle), the log sums, the
rule a run gets."""

import dataclasses
import io
import json
import math
import pickletools
import zipfile

import pytest
import torch
from conftest import NUM_LABELS, ToyImages, tiny_vit

from saq_hf import QuantConfig, SAQTrainer, SAQTrainingArguments, quantize_model
from saq_hf.checkpoint_state import TRAINING_ARGS_JSON
from saq_hf.radius import radius_rule_for
from saq_hf.step_log import StepLog


def is_pickle(path) -> bool:
    """Whether ``path`` holds a pickle: torch.save's zip of one, or a bare pickle stream."""
    if zipfile.is_zipfile(path):
        return any(name.endswith(".pkl") for name in zipfile.ZipFile(path).namelist())
    try:
        with open(path, "rb") as f:
            pickletools.dis(f, out=io.StringIO())  # parses a whole pickle or raises
        return True
    except Exception:
        return False


def test_a_saved_run_and_its_checkpoints_keep_the_arguments_as_json_not_a_pickle(tmp_path):
    args = SAQTrainingArguments(output_dir=str(tmp_path / "run"), rho=0.003, learning_rate=2e-3, max_steps=2,
                                save_strategy="steps", save_steps=1, per_device_train_batch_size=8, report_to=[],
                                use_cpu=True, disable_tqdm=True, seed=0, hub_token="secret",
                                saq_start_ratio=0.0)
    trainer = SAQTrainer(model=quantize_model(tiny_vit(), QuantConfig(w_bits=4, a_bits=4)), args=args,
                         train_dataset=ToyImages())
    trainer.train()
    run = tmp_path / "run"
    trainer.save_model(str(run))
    checkpoints = sorted(run.glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == ["checkpoint-1", "checkpoint-2"]
    for folder in [run, *checkpoints]:
        saved = json.loads((folder / TRAINING_ARGS_JSON).read_text(encoding="utf-8"))
        assert saved["rho"] == 0.003 and saved["learning_rate"] == 2e-3 and saved["max_steps"] == 2
        assert saved["saq_mode"] == "saq" and saved["hub_token"] == "<HUB_TOKEN>"  # tokens redacted
        assert not (folder / "training_args.bin").exists(), folder
    # The run folder holds no pickle at all; a checkpoint only the Trainer's own resume state (optimizer, scheduler,
    # RNG), none of it the arguments.
    assert [p.name for p in run.iterdir() if p.is_file() and is_pickle(p)] == []
    for checkpoint in checkpoints:
        pickled = {p.name for p in checkpoint.iterdir() if p.is_file() and is_pickle(p)}
        assert "optimizer.pt" in pickled and pickled <= {"optimizer.pt", "scheduler.pt", "rng_state.pth"}, pickled
    resumed = SAQTrainer(model=quantize_model(tiny_vit(), QuantConfig(w_bits=4, a_bits=4)),
                         args=dataclasses.replace(args, output_dir=str(tmp_path / "resumed"), max_steps=3),
                         train_dataset=ToyImages())
    resumed.train(resume_from_checkpoint=str(checkpoints[-1]))  # nothing a resume reads was lost with the pickle
    assert resumed.state.global_step == 3


def test_the_step_log_writes_means_since_the_last_log_and_pops_the_radius():
    log = StepLog()
    assert log.write(logs := {}) is None and logs == {} and log.mean_radius() is None
    for grad_norm, loss in ((1.0, 2.0), (3.0, 4.0)):
        log.add_epsilon(torch.tensor(grad_norm), [torch.tensor([3.0, 4.0]), None, torch.tensor([0.0])])
        log.add_losses(torch.tensor(loss), torch.tensor(2 * loss))
    log.add_radius(torch.tensor(0.01))
    log.add_radius(0.03)
    assert log.write(logs) == (3.0, 6.0, 2)
    assert logs == pytest.approx({"saq_ascent_grad_norm": 2.0, "saq_eps_norm": 5.0, "saq_ascent_loss": 3.0,
                                  "saq_descent_loss": 6.0})
    assert log.pop_radius() == pytest.approx(0.02) and log.mean_radius() is None
    log.clear()
    assert log.write(logs := {}) is None and logs == {}


def test_rho_auto_gets_a_rule_on_a_classifier_only():
    model = tiny_vit()
    auto = SAQTrainingArguments(output_dir="unused", report_to=[], use_cpu=True)
    rule = radius_rule_for(model, auto)
    assert rule.num_classes == NUM_LABELS and rule.rho_max == 0.02
    assert rule.scale == pytest.approx(0.5 * math.log(NUM_LABELS))
    assert radius_rule_for(model, SAQTrainingArguments(output_dir="unused", rho=0.01, report_to=[])) is None
    assert radius_rule_for(model, SAQTrainingArguments(output_dir="unused", saq_mode="qat", report_to=[])) is None
    model.config.num_labels = 1
    with pytest.raises(ValueError, match="needs the model's config.num_labels >= 2"):
        radius_rule_for(model, auto)
