"""Task metrics (scikit-learn) and the resource numbers the training loop reports."""
from __future__ import annotations

import resource
import sys

import torch
from sklearn.metrics import f1_score, matthews_corrcoef

MAIN_METRIC = "accuracy"


def classification_scores(preds: list[int], labels: list[int], num_labels: int) -> dict[str, float]:
    """accuracy, plus MCC for a binary task or macro F1 over the task's labels for a multi-class one.
    A prediction of -1 (a generation that names no label) counts as wrong."""
    if len(preds) != len(labels) or not labels:
        raise ValueError(f"need as many predictions as labels, and at least one: {len(preds)} vs {len(labels)}")
    scores = {"accuracy": sum(p == y for p, y in zip(preds, labels)) / len(labels)}
    if num_labels == 2:
        scores["mcc"] = float(matthews_corrcoef(labels, preds))
    else:
        scores["f1"] = float(f1_score(labels, preds, labels=list(range(num_labels)), average="macro",
                                      zero_division=0))
    return scores


def peak_memory_mib(device: torch.device | str) -> float:
    """Peak accelerator memory allocated by torch on a GPU; on a CPU the process's resident-set
    high-water mark (ru_maxrss: KiB on Linux, bytes on macOS)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10
