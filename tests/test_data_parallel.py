"""Two-process data parallel SAQ on CPU (gloo), launched with torchrun like a real multi-GPU run, against one process
accumulating the same micro-batches."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent

WORKER = """
import json, sys
import torch
sys.path[:0] = [{tests!r}, {repo!r}]
from conftest import ToyImages, tiny_vit
from transformers import TrainerCallback
from saq_hf import SAQTrainer, SAQTrainingArguments, quantize_model

out = sys.argv[1]
with_teacher = sys.argv[2] == "teacher"
reduced_backwards = []


class CountAllReduces(TrainerCallback):
    # Every all-reduced backward pass hands DDP's communication hook bucket 0 exactly once.
    def on_train_begin(self, args, state, control, **kwargs):
        def allreduce(_, bucket):
            if bucket.index() == 0:
                reduced_backwards.append(1)
            tensor = bucket.buffer() / torch.distributed.get_world_size()
            return torch.distributed.all_reduce(tensor, async_op=True).get_future().then(lambda f: f.value()[0])

        trainer.model_wrapped.register_comm_hook(None, allreduce)


model = quantize_model(tiny_vit())
args = SAQTrainingArguments(output_dir=out, saq_mode="saq", rho=0.05, saq_start_ratio=0.0, max_steps=3,
                            per_device_train_batch_size=4,
                            use_cpu=True, ddp_backend="gloo", report_to=[], save_strategy="no", disable_tqdm=True,
                            logging_steps=1, seed=0, **({{"distill_alpha": 0.5, "distill_temperature": 2.0}}
                                                        if with_teacher else {{}}))
model(pixel_values=ToyImages().pixel_values[:4])  # the same step sizes on both workers as in the reference below
teacher = tiny_vit(7) if with_teacher else None
trainer = SAQTrainer(model=model, args=args, train_dataset=ToyImages(), callbacks=[CountAllReduces()],
                     teacher_model=teacher)
trainer.train()
rank = trainer.args.process_index
if with_teacher:  # each rank's own unwrapped teacher, one forward per micro-batch, outside DDP's all-reduce
    assert type(trainer.distiller.teacher).__name__ == "ViTForImageClassification"
    assert trainer.distiller.forwards == 3, trainer.distiller.forwards
torch.save({{k: v.detach().clone() for k, v in model.state_dict().items()}}, f"{{out}}/rank{{rank}}.pt")
with open(f"{{out}}/rank{{rank}}.json", "w") as f:
    json.dump({{"world_size": trainer.args.world_size, "reduced_backwards": len(reduced_backwards),
               "ascent_grad_norms": [h["saq_ascent_grad_norm"] for h in trainer.state.log_history if "loss" in h]}}, f)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("teacher", ["", "teacher"], ids=["labels", "distilled"])
def test_two_process_saq_keeps_replicas_identical(tmp_path, teacher):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(TESTS_DIR), repo=str(REPO_ROOT)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), str(script), str(tmp_path), teacher or "none"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]

    states = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in reports] == [2, 2]
    different = [k for k in states[0] if not torch.equal(states[0][k], states[1][k])]
    assert not different, f"replicas diverged in {different[:3]}"
    # Only the 3 descent passes are all-reduced: ascent gradients stay local to each worker.
    assert [r["reduced_backwards"] for r in reports] == [3, 3]
    # Each worker builds ε from its own shard of the batch.
    assert reports[0]["ascent_grad_norms"] != reports[1]["ascent_grad_norms"]

    # The reference: one process accumulating the two workers' micro-batches (each at its own ε) takes the same steps.
    torch.manual_seed(0)
    from saq_hf import SAQTrainer, SAQTrainingArguments, quantize_model
    from conftest import ToyImages, tiny_vit
    model = quantize_model(tiny_vit())
    model(pixel_values=ToyImages().pixel_values[:4])
    distill = {"distill_alpha": 0.5, "distill_temperature": 2.0} if teacher else {}
    args = SAQTrainingArguments(output_dir=str(tmp_path / "single"), saq_mode="saq", rho=0.05, saq_start_ratio=0.0,
                                max_steps=3, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                                use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True, seed=0, **distill)
    SAQTrainer(model=model, args=args, train_dataset=ToyImages(), teacher_model=tiny_vit(7) if teacher else None).train()
    single = model.state_dict()
    worst = max((single[k].float() - states[0][k].float()).abs().max().item() for k in single)
    assert worst == 0.0, worst  # bit for bit: the all-reduce of two workers sums as the accumulation does
