"""Metrics of the task heads, as pure functions: accuracy and macro-F1 of a classifier,
entity-level precision/recall/F1 of a BIO tagger.

Entity spans follow ``seqeval``'s default (conlleval) reading of BIO tags: an ``I-X`` that
does not continue an ``X`` entity (after ``O``, after another type, at the start) opens a
new one, and an entity is right only if its type, first and last word all match.
"""

from __future__ import annotations

from raystages.data.labelled import split_tag


def bio_entities(tags: list[str]) -> list[tuple[str, int, int]]:
    """``(type, first, last)`` of every entity in one sentence's BIO tags (inclusive ends)."""
    entities, start, kind = [], None, ""
    for i, tag in enumerate(tags):
        prefix, this = split_tag(tag)
        continues = prefix == "I" and start is not None and this == kind
        if start is not None and not continues:
            entities.append((kind, start, i - 1))
            start = None
        if prefix != "O" and not continues:
            start, kind = i, this
    if start is not None:
        entities.append((kind, start, len(tags) - 1))
    return entities


def entity_counts(gold: list[list[str]], pred: list[list[str]]) -> tuple[int, int, int]:
    """``(true positives, predicted entities, gold entities)`` over sentences, exact spans."""
    tp = n_pred = n_gold = 0
    for g, p in zip(gold, pred, strict=True):
        if len(g) != len(p):
            raise ValueError(f"a sentence has {len(g)} gold tags and {len(p)} predicted")
        ge, pe = set(bio_entities(g)), set(bio_entities(p))
        tp += len(ge & pe)
        n_pred += len(pe)
        n_gold += len(ge)
    return tp, n_pred, n_gold


def precision_recall_f1(tp: float, n_pred: float, n_gold: float) -> dict[str, float]:
    """Micro precision, recall and F1 from counts; 0 where a denominator is 0 (seqeval's
    and scikit-learn's ``zero_division=0``)."""
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_gold if n_gold else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}


def confusion(gold: list[int], pred: list[int], num_labels: int) -> list[list[int]]:
    """``m[g][p]``: how many items of gold class ``g`` were predicted ``p``."""
    m = [[0] * num_labels for _ in range(num_labels)]
    for g, p in zip(gold, pred, strict=True):
        m[g][p] += 1
    return m


def classification_metrics(m: list[list[float]]) -> dict[str, float]:
    """Accuracy and macro-F1 of a confusion matrix. Macro-F1 averages the per-class F1 over
    the classes that occur in gold or predictions (scikit-learn's ``average="macro"``)."""
    n = len(m)
    total = sum(map(sum, m))
    f1s = []
    for c in range(n):
        tp = m[c][c]
        n_gold, n_pred = sum(m[c]), sum(m[g][c] for g in range(n))
        if n_gold or n_pred:
            f1s.append(precision_recall_f1(tp, n_pred, n_gold)["f1"])
    return {"accuracy": sum(m[c][c] for c in range(n)) / total if total else 0.0,
            "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0}
