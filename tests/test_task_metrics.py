"""Task-head metrics and label alignment, against figures worked out by hand (and the
values seqeval / scikit-learn give for the same inputs)."""

from __future__ import annotations

import pytest

from raystages.data.labelled import first_piece_labels
from raystages.stages.task_metrics import (bio_entities, classification_metrics, confusion,
                                           entity_counts, precision_recall_f1)

X = -100


def test_first_piece_of_each_word_carries_its_label_the_rest_are_ignored():
    # [CLS] new ##york is big ##gest [SEP]  ->  words 0 0 1 2 2
    word_ids = [None, 0, 0, 1, 2, 2, None]
    assert first_piece_labels(word_ids, [3, 0, 5]) == [X, 3, X, 0, 5, X, X]
    # A word truncated away has no piece; a word of one piece keeps its label.
    assert first_piece_labels([None, 0, 1, None], [1, 2, 7]) == [X, 1, 2, X]
    assert first_piece_labels([], []) == []


def test_bio_entities_read_like_seqeval():
    assert bio_entities(["B-PER", "I-PER", "O", "B-LOC"]) == [("PER", 0, 1), ("LOC", 3, 3)]
    # An I- without a B- opens an entity (at the start, after O).
    assert bio_entities(["I-PER", "I-PER", "O", "I-LOC"]) == [("PER", 0, 1), ("LOC", 3, 3)]
    # A type change inside a run splits it; B- after B- starts a new entity.
    assert bio_entities(["B-PER", "I-LOC", "I-LOC"]) == [("PER", 0, 0), ("LOC", 1, 2)]
    assert bio_entities(["B-PER", "B-PER", "I-PER"]) == [("PER", 0, 0), ("PER", 1, 2)]
    # Types may contain dashes (WNUT's creative-work); an entity may end the sentence.
    assert bio_entities(["O", "B-creative-work", "I-creative-work"]) == [("creative-work", 1, 2)]
    assert bio_entities(["O", "O"]) == [] and bio_entities([]) == []
    with pytest.raises(ValueError, match="not BIO"):
        bio_entities(["PER"])


def test_entity_scores_need_exact_spans():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG"]]
    pred = [["B-PER", "O", "O", "B-LOC"],      # PER cut short: wrong; LOC right
            ["O", "I-ORG"]]                     # I- without B- still the same span: right
    tp, n_pred, n_gold = entity_counts(gold, pred)
    assert (tp, n_pred, n_gold) == (2, 3, 3)
    s = precision_recall_f1(tp, n_pred, n_gold)
    assert s == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3})
    # Nothing predicted: precision and F1 are 0, not NaN (zero_division=0).
    assert precision_recall_f1(*entity_counts(gold, [["O"] * 4, ["O"] * 2])) == \
        {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    # The seqeval README example: f1_score = 0.50.
    y_true = [["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    y_pred = [["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    assert precision_recall_f1(*entity_counts(y_true, y_pred))["f1"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="2 gold tags and 1 predicted"):
        entity_counts([["O", "O"]], [["O"]])


def test_accuracy_and_macro_f1_from_a_confusion_matrix():
    gold = [0, 0, 0, 1, 1, 2]
    pred = [0, 0, 1, 1, 0, 0]
    m = confusion(gold, pred, 3)
    assert m == [[2, 1, 0], [1, 1, 0], [1, 0, 0]]
    # class 0: p 2/4, r 2/3 -> f1 4/7; class 1: p 1/2, r 1/2 -> 1/2; class 2: 0.
    out = classification_metrics(m)
    assert out["accuracy"] == pytest.approx(3 / 6)
    assert out["macro_f1"] == pytest.approx((4 / 7 + 1 / 2 + 0) / 3)
    # A class absent from gold and predictions does not count (scikit-learn's macro).
    assert classification_metrics(confusion([0, 1], [0, 1], 3))["macro_f1"] == 1.0


def test_word_entities_take_each_words_first_piece_and_span_characters():
    from raystages.serve.task_heads import word_entities

    text = "New Yorkshire is big"
    # [CLS] New York ##shire is big [SEP]; the second piece of a word does not vote.
    offsets = [(0, 0), (0, 3), (4, 8), (8, 13), (14, 16), (17, 20), (0, 0)]
    word_ids = [None, 0, 1, 1, 2, 3, None]
    tags = ["O", "B-location", "I-location", "B-person", "O", "I-group", "O"]
    probs = [1.0, 0.9, 0.7, 0.1, 0.8, 0.6, 1.0]
    assert word_entities(text, offsets, word_ids, tags, probs) == [
        {"entity": "location", "start": 0, "end": 13, "text": "New Yorkshire", "score": pytest.approx(0.8)},
        # An I- that continues nothing opens an entity, as seqeval reads BIO.
        {"entity": "group", "start": 17, "end": 20, "text": "big", "score": pytest.approx(0.6)}]
