"""Accuracy through ``evaluate``, offline: the shipped top-1/top-5 module, the Trainer hook, an eval loop."""

from pathlib import Path

import datasets
import evaluate
import numpy as np
import torch
from torch.utils.data import DataLoader

TOP_K_ACCURACY = str(Path(__file__).parent / "top_k_accuracy")


def load_metric(name: str | None = None) -> evaluate.EvaluationModule:
    """The shipped top-k accuracy module (loaded by path, so no network), or any ``evaluate`` id or path."""
    return evaluate.load(name or TOP_K_ACCURACY)


def _takes_scores(metric: evaluate.EvaluationModule) -> bool:
    # Our module scores logits (top-5 needs them); Hub metrics such as "accuracy" take class ids.
    # (datasets 3.x's ``Sequence`` has a ``dtype`` too, so the type is what tells.)
    features = metric.features[0] if isinstance(metric.features, list) else metric.features
    return not isinstance(features["predictions"], datasets.Value)


def score(metric: evaluate.EvaluationModule, logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    predictions = logits if _takes_scores(metric) else np.argmax(logits, axis=-1)
    return metric.compute(predictions=predictions, references=labels)


def compute_metrics_fn(metric: evaluate.EvaluationModule):
    """``compute_metrics`` for a ``Trainer``: logits and label ids in, accuracy (and top-5) out."""

    def compute_metrics(eval_pred) -> dict[str, float]:
        logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        return score(metric, logits, eval_pred.label_ids)

    return compute_metrics


@torch.no_grad()
def evaluate_classifier(model: torch.nn.Module, dataset, metric: evaluate.EvaluationModule, collate_fn,
                        batch_size: int = 64) -> dict[str, float]:
    """Accuracy of ``model`` on a transformed ``dataset`` (``pixel_values``/``labels`` items), in eval mode."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    logits, labels = [], []
    try:
        for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate_fn):
            logits.append(model(pixel_values=batch["pixel_values"].to(device)).logits.float().cpu())
            labels.append(batch["labels"])
    finally:
        model.train(was_training)
    return score(metric, torch.cat(logits).numpy(), torch.cat(labels).numpy())
