"""Top-1 and top-5 accuracy from classifier logits, as an offline ``evaluate`` metric module."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Top-k classification accuracy computed from per-class scores (logits or probabilities): the fraction of
examples whose label is the highest-scoring class (top-1, reported as ``accuracy``) and the fraction whose
label is among the ``k`` highest-scoring classes (``top{k}_accuracy``, k = 5 by default; 1.0 when there are
no more than k classes).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): per-class scores, one row per example.
    references (`list` of `int`): the true class ids.
    k (`int`, defaults to 5): the k of the top-k score.
Returns:
    accuracy (`float`): top-1 accuracy in [0, 1].
    top{k}_accuracy (`float`): top-k accuracy in [0, 1].
Examples:
    >>> metric = evaluate.load("saq_hf/metrics/top_k_accuracy")
    >>> metric.compute(predictions=[[0.1, 0.9, 0.0], [0.8, 0.15, 0.05]], references=[1, 1], k=2)
    {'accuracy': 0.5, 'top2_accuracy': 1.0}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TopKAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float32")),
                    "references": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, predictions, references, k=5):
        scores = np.asarray(predictions, dtype=np.float64)
        labels = np.asarray(references, dtype=np.int64)
        if scores.ndim != 2 or len(scores) != len(labels):
            raise ValueError("predictions must be one row of class scores per reference")
        # Ties broken by class index (stable sort), so the result does not depend on the platform. With fewer
        # than k classes every label is in the top k; the key keeps the requested k so callers can rely on it.
        top_k = np.argsort(-scores, axis=1, kind="stable")[:, : min(k, scores.shape[1])]
        return {
            "accuracy": float(np.mean(top_k[:, 0] == labels)),
            f"top{k}_accuracy": float(np.mean((top_k == labels[:, None]).any(axis=1))),
        }
