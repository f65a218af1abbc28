"""saq_hf.strategies: the registry the arguments validate against, and the interface a strategy implements."""

import pytest
import torch
from conftest import ToyImages, tiny_vit
from safetensors import safe_open
from test_trainer import quantized, train

from saq_hf import SAQTrainingArguments
from saq_hf.strategies import STRATEGIES, LookSAM, ReuseGrad, SAQStrategy


def test_an_unknown_strategy_is_refused_in_one_line_naming_the_registered_ones(tmp_path):
    with pytest.raises(ValueError) as error:
        SAQTrainingArguments(output_dir=str(tmp_path), saq_strategy="sometimes")
    message = str(error.value)
    assert "\n" not in message and "'sometimes'" in message and "(field: saq_strategy)" in message
    assert all(repr(name) in message for name in STRATEGIES)


class OddSteps(SAQStrategy):
    """SAQ on odd optimizer steps only."""

    def is_plain_step(self, step: int) -> bool:
        return step % 2 == 0


def test_a_registered_strategy_is_trained_with_no_other_change(tmp_path, monkeypatch):
    monkeypatch.setitem(STRATEGIES, "odd_steps", OddSteps)
    model = quantized(tiny_vit)
    forwards = []
    model.register_forward_pre_hook(lambda *_: forwards.append(1))
    trainer = train(model, tmp_path, saq_strategy="odd_steps", max_steps=3)
    assert isinstance(trainer.strategy, OddSteps)
    assert len(forwards) == 1 + 2 + 1  # plain, SAQ, plain
    assert [h["step"] for h in trainer.state.log_history if "saq_eps_norm" in h] == [2]


def test_a_state_file_in_the_earlier_single_layout_loads_into_each_strategy(tmp_path):
    """Earlier releases wrote one file for both strategies: every size in the metadata, 0 for the unused one."""
    args = SAQTrainingArguments(output_dir=str(tmp_path))
    kept = torch.ones(3)
    looksam_file = {"looksam.1": kept}, {"looksam_built_at": "5", "looksam_size": "2", "reuse_grad_size": "0"}
    reuse_file = {"reuse_grad.0": kept}, {"looksam_built_at": "None", "looksam_size": "0", "reuse_grad_size": "1"}

    looksam = LookSAM(args)
    looksam.load_state_dict(*looksam_file)
    assert (looksam.directions[0], looksam.built_at) == (None, 5) and looksam.directions[1] is kept
    reuse_grad = ReuseGrad(args)
    reuse_grad.load_state_dict(*reuse_file)
    assert reuse_grad.previous_descent_grads == [kept]
    # Resumed under the other strategy, a file keeps nothing for it.
    looksam.load_state_dict(*reuse_file)
    reuse_grad.load_state_dict(*looksam_file)
    assert (looksam.directions, looksam.built_at, reuse_grad.previous_descent_grads) == (None, None, None)


@pytest.mark.parametrize("strategy", ["looksam", "reuse_grad"])
def test_what_a_strategy_keeps_is_written_under_the_checkpoint_names(tmp_path, strategy):
    train(quantized(tiny_vit), tmp_path, ToyImages(), saq_strategy=strategy, saq_interval=2, max_steps=2,
          save_strategy="steps", save_steps=2)
    with safe_open(str(tmp_path / "checkpoint-2" / "saq_strategy_state_0.safetensors"), framework="pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    size = int(metadata[f"{strategy}_size"])
    assert size and keys and keys <= {f"{strategy}.{i}" for i in range(size)}
    assert ("looksam_built_at" in metadata) == (strategy == "looksam")
