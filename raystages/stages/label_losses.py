"""Cross-entropy and accuracy against per-item labels, as pure tensor functions.

One pair of functions serves every encoder-style objective: masked-LM (``logits`` ``(B, T, V)``
against the original tokens at masked positions), token classification (``(B, T, C)``
against a tag per word's first piece) and sequence classification (``(B, C)`` against one
label per row). Unlike :mod:`raystages.stages.losses` there is no shift: the label at a
position is predicted from the logits at that same position. ``IGNORE`` (-100) marks
labels without loss.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from raystages.stages.losses import IGNORE


def label_ce(logits: Tensor, labels: Tensor, weight: Tensor | None = None) -> Tensor:
    """Mean cross-entropy over the labelled items; a 0-dim tensor.

    ``logits``: ``(..., C)``; ``labels``: ``(...)``, ``IGNORE`` where unlabelled. With class
    ``weight`` ``(C,)`` it is the weighted mean ``Σ w[y]·ce / Σ w[y]`` (torch's and HF's
    convention), so a weight only changes how much each class counts. No labelled item: 0
    with a zero gradient, never NaN. Computed in fp32 whatever the logits' dtype.
    """
    flat_logits = logits.float().reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1)
    if not (flat_labels != IGNORE).any():
        return flat_logits.sum() * 0.0
    w = weight.float().to(flat_logits.device) if weight is not None else None
    return F.cross_entropy(flat_logits, flat_labels, weight=w, ignore_index=IGNORE)


def label_hits(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """``(correct, count)``: labelled items whose argmax is the label, and how many are labelled.

    ``logits``: ``(..., C)``; ``labels``: ``(...)``. Both results are 0-dim int64 tensors, so
    they can be summed over batches and ranks before dividing.
    """
    keep = labels != IGNORE
    correct = (logits.argmax(-1) == labels) & keep
    return correct.sum(), keep.sum()
