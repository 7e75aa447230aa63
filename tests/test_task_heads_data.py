"""Task-head data without Ray: rows, labels, alignment and every bad-input path named by
file and row (or skipped and counted), the built-in oracles, heads on a causal body."""

from __future__ import annotations

import json
import subprocess

import pytest

from raystages.data.labelled import class_weights, encode, load_labelled, pad_labelled
from raystages.data.sources import DataError
from raystages.spec import SpecError, load_spec
from raystages.task.labelling import (classification_rows, is_sorted, run_tags,
                                      tagging_rows)
from tests.conftest import CLI, ROOT


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _spec(ckpt, task, *extra):
    return load_spec(None, [f"model.path={ckpt}", f"sft.task={task}", *extra], stage="sft")


def _load(spec):
    rows = classification_rows if spec.sft.task == "classification" else tagging_rows
    return load_labelled(spec.data, spec.sft.head, spec.sft.task, rows)


def test_builtin_oracles_and_splits():
    assert is_sorted(list("abbz")) and not is_sorted(list("aba"))
    assert run_tags(list("aabccc")) == ["B-RUN", "I-RUN", "O", "B-RUN", "I-RUN", "I-RUN"]
    train, val = classification_rows("train", 400), classification_rows("val", 100)
    assert not {r["text"] for r in train} & {r["text"] for r in val}
    assert all((r["label"] == "sorted") == is_sorted(r["text"].split()) for r in train + val)
    assert 0.4 < sum(r["label"] == "sorted" for r in train) / 400 < 0.6
    tags = tagging_rows("train", 100)
    assert all(r["tags"] == run_tags(r["tokens"]) for r in tags)
    assert classification_rows("train", 5, seed=1) == classification_rows("train", 5, seed=1)


def test_labels_come_from_the_data_ints_or_names_and_align_to_first_pieces(tmp_path, random_checkpoint):
    from raystages.models import load_tokenizer

    src = _jsonl(tmp_path / "cls.jsonl", [{"text": f"row {i}", "label": i % 3} for i in range(10)])
    split = _load(_spec(random_checkpoint, "classification", f"data.source={src}", "data.val_fraction=0.2"))
    assert split.labels == ["0", "1", "2"] and [y for _, y in split.train] == [0, 1, 2, 0, 1, 2, 0, 1]
    names = _jsonl(tmp_path / "ner.jsonl", [{"tokens": ["Paris", "is", "big"], "tags": ["B-LOC", "O", "O"]},
                                            {"tokens": ["Ann"], "tags": ["B-PER"]}] * 3)
    split = _load(_spec(random_checkpoint, "token_classification", f"data.source={names}"))
    assert split.labels == ["O", "B-LOC", "B-PER"]  # O first, then sorted
    tok = load_tokenizer(str(random_checkpoint))
    (enc,) = encode(tok, [((["Paris", "is"],), [1, 0])], "token_classification", 32)
    word_ids = tok(["Paris", "is"], is_split_into_words=True).word_ids()
    firsts = [i for i, w in enumerate(word_ids) if w is not None and w != (word_ids[i - 1] if i else None)]
    assert [enc["labels"][i] for i in firsts] == [1, 0]
    assert sum(label != -100 for label in enc["labels"]) == 2
    arrays = pad_labelled(encode(tok, split.train, "token_classification", 32), tok.pad_token_id)
    assert arrays["labels"].shape == arrays["input_ids"].shape
    assert class_weights(split_head("balanced"), [((), [0, 0, 0, 1])], 3) == [4 / 9, 4 / 3, 0.0]


def test_text_pairs_keep_their_segment_ids_through_padding(tmp_path):
    from raystages.models import train_wordpiece_tokenizer

    tok = train_wordpiece_tokenizer(["a b c d e f"] * 10, 50, tmp_path / "wp")
    pair, single = encode(tok, [(("a b", "c d e"), 1), (("f", None), 0)], "classification", 32)
    # [CLS] a b [SEP] c d e [SEP]: BERT's segment ids, as tokenizer(a, b) gives them.
    assert pair["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1, 1] and "token_type_ids" not in single
    arrays = pad_labelled([pair, {**single, "token_type_ids": [0, 0, 0]}], tok.pad_token_id)
    assert arrays["token_type_ids"].tolist() == [[0, 0, 0, 0, 1, 1, 1, 1], [0] * 8]
    assert "token_type_ids" not in pad_labelled([single], tok.pad_token_id)


def split_head(weights):
    from raystages.spec import HeadSpec

    return HeadSpec(class_weights=weights)


@pytest.mark.parametrize("row, task, message", [
    ({"tokens": ["a", "b"], "tags": ["O"]}, "token_classification", "1 tags for 2 tokens"),
    ({"text": "a b", "tags": ["O", "O"]}, "token_classification", "no 'tokens' field"),
    ({"tokens": ["a"], "tags": "O"}, "token_classification", "field 'tags' must be a list"),
    ({"text": "a b"}, "classification", "missing label field 'label'"),
    ({"text": "", "label": 1}, "classification", "field 'text' is not a non-empty text"),
    ({"text": "x", "label": 1.5}, "classification", "field 'label': a label is a name or an int id"),
])
def test_a_bad_row_is_named_by_file_and_line_or_skipped_and_counted(tmp_path, random_checkpoint, row, task, message):
    good = {"tokens": ["a", "b"], "tags": ["B-X", "O"]} if task == "token_classification" else {"text": "a", "label": 0}
    src = _jsonl(tmp_path / "d.jsonl", [good, good, row, good, good])
    with pytest.raises(DataError, match=f"d.jsonl:line 3: {message}"):
        _load(_spec(random_checkpoint, task, f"data.source={src}"))
    split = _load(_spec(random_checkpoint, task, f"data.source={src}", "data.on_bad_row=skip"))
    assert len(split.train) + len(split.val) == 4 and len(split.skipped) == 1 and "line 3" in split.skipped[0]


def test_unknown_held_out_label_and_num_labels_disagreement(tmp_path, random_checkpoint):
    train = _jsonl(tmp_path / "train.jsonl", [{"text": "t", "label": "pos"}, {"text": "u", "label": "neg"}] * 4)
    val = _jsonl(tmp_path / "val.jsonl", [{"text": "v", "label": "pos"}, {"text": "w", "label": "meh"}])
    with pytest.raises(DataError, match=r"val.jsonl:line 2: unknown label 'meh' \(the labels are \['neg', 'pos'\]\)"):
        _load(_spec(random_checkpoint, "classification", f"data.source={train}", f"data.val_source={val}"))
    with pytest.raises(DataError, match="num_labels is 3 but the data has 2 labels"):
        _load(_spec(random_checkpoint, "classification", f"data.source={train}", "sft.head.num_labels=3"))
    ints = _jsonl(tmp_path / "ints.jsonl", [{"text": "t", "label": 0}, {"text": "u", "label": 5}])
    with pytest.raises(DataError, match="ints.jsonl:line 2: unknown label 5"):
        _load(_spec(random_checkpoint, "classification", f"data.source={ints}", "sft.head.labels=[neg,pos]"))
    tags = _jsonl(tmp_path / "tags.jsonl", [{"tokens": ["a"], "tags": [0]}, {"tokens": ["b"], "tags": [1]}])
    with pytest.raises(DataError, match="name them in id order in sft.head.labels"):
        _load(_spec(random_checkpoint, "token_classification", f"data.source={tags}"))


def test_head_spec_errors_and_bad_data_exit_2_before_ray(tmp_path, random_checkpoint):
    with pytest.raises(SpecError, match="num_labels 3 but 2 labels are named"):
        _spec(random_checkpoint, "classification", "sft.head.labels=[a,b]", "sft.head.num_labels=3")
    with pytest.raises(SpecError, match="sft.lora and sft.packing are for chat"):
        _spec(random_checkpoint, "classification", "sft.packing=true")
    with pytest.raises(SpecError, match="sft.task"):
        _spec(random_checkpoint, "regression")
    src = _jsonl(tmp_path / "bad.jsonl", [{"tokens": ["a", "b"], "tags": ["O"]}])
    out = subprocess.run([*CLI, "sft", f"model.path={random_checkpoint}", "sft.task=token_classification",
                          f"data.source={src}", f"run.storage_path={tmp_path}"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 2, out.stderr
    assert "bad.jsonl:line 1: 1 tags for 2 tokens" in out.stderr and "ray" not in out.stdout.lower()


@pytest.mark.parametrize("task", ["classification", "token_classification"])
def test_a_head_on_a_causal_checkpoint_trains_and_exports_its_labels(tmp_path, random_checkpoint, task):
    import torch

    from raystages.models import export_hf, load_tokenizer
    from raystages.stages.task_heads import HeadStage, head_model_class, score_export

    tok = load_tokenizer(str(random_checkpoint))
    spec = _spec(random_checkpoint, task, "data.builtin.num_train=64", "data.builtin.num_val=16")
    split = _load(spec)
    stage = HeadStage(task, split.labels, None)
    model = stage.build_model(spec, tok)
    assert type(model).__name__.startswith("Llama")
    arrays = pad_labelled(encode(tok, split.train, task, 32), tok.pad_token_id)
    batch = {k: torch.from_numpy(v[:8]) for k, v in arrays.items()}
    loss, n = stage.loss(model, batch)
    loss.backward()
    assert torch.isfinite(loss) and n > 0 and model.score.weight.grad.abs().sum() > 0
    export_hf(model, tok, tmp_path / "head")
    loaded = head_model_class(task).from_pretrained(tmp_path / "head")
    assert loaded.config.id2label == dict(enumerate(split.labels))
    val = pad_labelled(encode(tok, split.val, task, 32), tok.pad_token_id)
    scores = score_export(str(tmp_path / "head"), val, task)
    assert set(scores) >= ({"accuracy", "macro_f1"} if task == "classification" else {"entity_f1"})


def test_bench_baselines_memorisation_and_bag_of_words():
    from raystages.bench.tasks import bag_of_words_accuracy, memorisation_f1

    train = [{"tokens": ["Paris", "is", "nice"], "tags": ["B-loc", "O", "O"]},
             {"tokens": ["Paris", "Hilton"], "tags": ["B-per", "I-per"]},
             {"tokens": ["Paris"], "tags": ["B-loc"]}]
    test = [{"tokens": ["Paris", "Hilton", "Rome"], "tags": ["B-per", "I-per", "B-loc"]}]
    # Memorised: Paris -> B-loc (2 of 3), Hilton -> I-per, Rome unseen -> O. Predicted
    # entities: (loc 0-0), (per 1-1); gold: (per 0-1), (loc 2-2): no match, F1 0.
    assert memorisation_f1(train, test) == 0.0
    assert memorisation_f1(train, [{"tokens": ["Paris", "is"], "tags": ["B-loc", "O"]}]) == 1.0
    rows = [{"text": "good fine", "label": 1}, {"text": "bad awful", "label": 0}] * 10
    assert bag_of_words_accuracy(rows, [{"text": "fine", "label": 1}, {"text": "awful", "label": 0}]) == 1.0
