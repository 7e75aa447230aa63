"""SFT and preference rows: schemas, assistant-only labels, packing, bad rows, real files."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from raystages.data.chat import (conversations_of, load_split, pack_examples, pad_examples,
                                 sft_converter, skip_reasons, tokenize_conversation)
from raystages.data.preference import pad_pairs, pair_of, parse_hh, rm_converter
from raystages.data.sources import DataError
from raystages.spec import ChatFieldsSpec, DataSpec, PreferenceFieldsSpec
from raystages.stages.losses import IGNORE
from tests.conftest import shared_data

FIELDS = ChatFieldsSpec()
PAIR_FIELDS = PreferenceFieldsSpec()


@pytest.fixture(scope="module")
def tok(builtin_tokenizer_dir):
    from raystages.models import load_tokenizer

    return load_tokenizer(str(builtin_tokenizer_dir))


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_label_mask_token_by_token_on_a_multi_turn_conversation(tok):
    conv = [{"role": "system", "content": "be brief"},
            {"role": "user", "content": "sort: b a"},
            {"role": "assistant", "content": "a b"},
            {"role": "user", "content": "reverse: a c"},
            {"role": "assistant", "content": "c a"}]
    ids, labels = tokenize_conversation(tok, conv)
    assert ids == tok(tok.apply_chat_template(conv, tokenize=False), add_special_tokens=False)["input_ids"]
    pieces = [(tok.decode([i]), lab != IGNORE) for i, lab in zip(ids, labels)]
    supervised = [p for p, on in pieces if on]
    # Exactly the two answers and the "<|end|>" closing each; never the newline after it,
    # the role headers, the system or user turns.
    assert supervised == [" a", " b", "<|end|>", " c", " a", "<|end|>"]
    text = "".join(p for p, _ in pieces)
    assert text == tok.apply_chat_template(conv, tokenize=False)
    for (piece, on), lab, i in zip(pieces, labels, ids):
        assert lab == (i if on else IGNORE)
    # Supervision starts right after each "<|assistant|>" header, with the reply's
    # space-prefixed first token (the template sets the reply off with a space).
    heads = [k for k, (p, _) in enumerate(pieces) if p == "<|assistant|>"]
    assert [pieces[k][1] for k in heads] == [False, False]
    assert [pieces[k + 1] for k in heads] == [(" a", True), (" c", True)]


def test_the_three_schemas_and_configurable_field_names(tok):
    as_messages = conversations_of({"messages": [{"role": "user", "content": "sort: b a"},
                                                 {"role": "assistant", "content": "a b"}]}, FIELDS)
    assert conversations_of({"prompt": "sort: b a", "completion": "a b"}, FIELDS) == as_messages
    inst = conversations_of({"instruction": "Name it.", "input": "x", "output": "y"}, FIELDS)[0]
    assert inst == [{"role": "user", "content": "Name it.\n\nx"}, {"role": "assistant", "content": "y"}]
    alpaca = conversations_of({"instruction": "Do.", "instances": [{"input": "", "output": "1"},
                                                                  {"input": "in", "output": "2"}]}, FIELDS)
    assert [c[0]["content"] for c in alpaca] == ["Do.", "Do.\n\nin"] and alpaca[1][1]["content"] == "2"
    custom = ChatFieldsSpec(format="prompt_completion", prompt_field="q", completion_field="a")
    assert conversations_of({"q": "sort: b a", "a": "a b"}, custom) == as_messages


@pytest.mark.parametrize("row, reason", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}, "empty response"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, r"messages\[0\]: expected"),
    ({"prompt": "hi"}, "missing field 'completion'"),
    ({"prompt": "hi", "completion": ""}, "empty response"),
    ({"instruction": "do", "output": 3}, "not text"),
    ({"text": "plain"}, "no 'messages'"),
    (["not", "an", "object"], "expected an object"),
])
def test_bad_sft_rows_say_why(row, reason):
    with pytest.raises(DataError, match=reason):
        conversations_of(row, FIELDS)


def test_too_long_examples_are_skipped_or_truncated_but_never_left_without_labels(tok):
    long = {"prompt": "sort: " + " ".join("abcdefgh"), "completion": " ".join("abcdefgh")}
    ids, _ = tokenize_conversation(tok, conversations_of(long, FIELDS)[0])
    with pytest.raises(DataError, match="too long"):
        sft_converter(FIELDS, tok, len(ids) - 1, truncate=False)(long)
    cut = sft_converter(FIELDS, tok, len(ids) - 3, truncate=True)(long)[0]
    assert len(cut["input_ids"]) == len(ids) - 3 and any(t != IGNORE for t in cut["labels"][1:])
    with pytest.raises(DataError, match="no supervised token"):
        sft_converter(FIELDS, tok, 12, truncate=True)(long)  # the answer starts after token 12


def test_strict_mode_names_file_and_row_and_skip_mode_counts(tmp_path, tok):
    good = {"prompt": "sort: b a", "completion": "a b"}
    path = _write_jsonl(tmp_path / "sft.jsonl", [
        good, {"prompt": "sort: c a"}, "{not json", good,
        {"messages": [{"role": "user", "content": "x"}]}, good, good])
    convert = sft_converter(FIELDS, tok, 64, truncate=False)
    with pytest.raises(DataError, match=r"sft\.jsonl:line 2: missing field 'completion'"):
        load_split(DataSpec(source=str(path)), convert, None)
    train, val, skipped = load_split(DataSpec(source=str(path), on_bad_row="skip", val_fraction=0.25),
                                     convert, None)
    assert len(train) == 3 and len(val) == 1 and len(skipped) == 3
    assert skip_reasons(skipped) == {"missing field 'completion'": 1, "not valid JSON (Expecting property name enclosed in double quotes)": 1,
                                     "conversation has no assistant turn": 1}


def test_builtin_rows_convert_and_name_their_split_on_error(tok):
    from raystages.task.splits import sft_rows

    spec = DataSpec(source="builtin", builtin={"num_train": 30, "num_val": 5})
    train, val, skipped = load_split(spec, sft_converter(FIELDS, tok, 64, False), sft_rows)
    assert len(train) == 30 and len(val) == 5 and not skipped
    with pytest.raises(DataError, match=r"builtin:train:row 1: too long"):
        load_split(spec, sft_converter(FIELDS, tok, 8, False), sft_rows)


def test_padding_and_packing_layouts(tok):
    a = {"input_ids": [1, 2, 3], "labels": [IGNORE, 2, 3]}
    b = {"input_ids": [4, 5], "labels": [IGNORE, 5]}
    c = {"input_ids": [6, 7, 8, 9], "labels": [6, 7, 8, 9]}
    padded = pad_examples([a, b], pad_id=0)
    assert padded["input_ids"].tolist() == [[1, 2, 3], [4, 5, 0]]
    assert padded["labels"].tolist() == [[IGNORE, 2, 3], [IGNORE, 5, IGNORE]]
    assert padded["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    packed = pack_examples([a, b, c], seq_len=6, pad_id=0)
    assert packed["input_ids"].tolist() == [[1, 2, 3, 4, 5, 0], [6, 7, 8, 9, 0, 0]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]]
    # The first token of every packed example carries no loss, even when its row said so.
    assert packed["labels"].tolist() == [[IGNORE, 2, 3, IGNORE, 5, IGNORE], [IGNORE, 7, 8, 9, IGNORE, IGNORE]]


def test_packed_examples_do_not_attend_to_each_other(random_checkpoint):
    """Logits of each example inside a packed block equal its logits alone."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(random_checkpoint, use_safetensors=True).eval()
    a = {"input_ids": [5, 9, 12, 40, 7], "labels": [IGNORE] * 5}
    b = {"input_ids": [33, 8, 21, 6], "labels": [IGNORE] * 4}
    packed = pack_examples([a, b], seq_len=12, pad_id=1)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(packed["input_ids"]),
                    position_ids=torch.from_numpy(packed["position_ids"]), use_cache=False).logits[0]
        alone_a = model(input_ids=torch.tensor([a["input_ids"]])).logits[0]
        alone_b = model(input_ids=torch.tensor([b["input_ids"]])).logits[0]
        plain = model(input_ids=torch.from_numpy(packed["input_ids"])).logits[0]  # no restarts
    assert torch.allclose(out[:5], alone_a, atol=1e-5)
    assert torch.allclose(out[5:9], alone_b, atol=1e-5)
    assert not torch.allclose(plain[5:9], alone_b, atol=1e-3)  # the check can fail


def test_preference_schemas(tok):
    explicit = pair_of({"prompt": "sort: b a", "chosen": "a b", "rejected": "b a", "margin": 1}, PAIR_FIELDS)
    assert explicit[0] == [{"role": "user", "content": "sort: b a"}, {"role": "assistant", "content": "a b"}]
    assert explicit[2] == 1.0
    as_lists = pair_of({"prompt": [{"role": "user", "content": "sort: b a"}],
                        "chosen": [{"role": "assistant", "content": "a b"}],
                        "rejected": [{"role": "assistant", "content": "b a"}]}, PAIR_FIELDS)
    assert as_lists == (explicit[0], explicit[1], 0.0)
    hh = pair_of({"chosen": "\n\nHuman: hi\n\nAssistant: hello!\n\nHuman: ok?\n\nAssistant: yes",
                  "rejected": "\n\nHuman: hi\n\nAssistant: hello!\n\nHuman: ok?\n\nAssistant: go away"}, PAIR_FIELDS)
    assert [m["role"] for m in hh[0]] == ["user", "assistant", "user", "assistant"]
    assert hh[0][:3] == hh[1][:3] and hh[0][3]["content"] == "yes" and hh[1][3]["content"] == "go away"
    raw = pair_of({"chosen": "Q: 2+2? A: 4", "rejected": "Q: 2+2? A: 5"}, PAIR_FIELDS)
    assert raw[:2] == ("Q: 2+2? A: 4", "Q: 2+2? A: 5")
    ids = rm_converter(PAIR_FIELDS, tok, 64)({"prompt": "sort: b a", "chosen": "a b", "rejected": "b a"})
    assert ids["chosen_ids"] == tok(tok.apply_chat_template(explicit[0], tokenize=False),
                                    add_special_tokens=False)["input_ids"]
    arrays = pad_pairs([ids, {**ids, "chosen_ids": ids["chosen_ids"][:3], "margin": 2.0}], pad_id=1)
    assert arrays["chosen_ids"].shape == (2, len(ids["chosen_ids"]))
    assert arrays["chosen_len"].tolist() == [len(ids["chosen_ids"]), 3]
    assert arrays["chosen_ids"][1, 3:].tolist() == [1] * (len(ids["chosen_ids"]) - 3)
    assert arrays["margin"].tolist() == [0.0, 2.0]


@pytest.mark.parametrize("row, reason", [
    ({"prompt": "p", "chosen": "a"}, "missing field 'rejected'"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "identical"),
    ({"prompt": "p", "chosen": " ", "rejected": "x"}, "empty response"),
    ({"chosen": "\n\nHuman: hi\n\nAssistant:", "rejected": "\n\nHuman: hi\n\nAssistant: yo"}, "empty response"),
    ({"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hi\n\nAssistant: yo"}, "no assistant turn"),
    ({"chosen": [{"role": "user", "content": "hi"}], "rejected": "x"}, "no assistant turn"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}, "finite number"),
])
def test_bad_preference_rows_say_why(row, reason):
    with pytest.raises(DataError, match=reason):
        pair_of(row, PAIR_FIELDS)


def test_too_long_pairs_are_bad_rows(tok):
    row = {"prompt": "sort: " + " ".join("abcdefgh"), "chosen": "a b", "rejected": "b a"}
    with pytest.raises(DataError, match="too long: chosen has"):
        rm_converter(PAIR_FIELDS, tok, 10)(row)


def test_real_hh_rlhf_pairs_through_the_public_data_path():
    from raystages.models import gpt2_tokenizer_from_files

    tok = gpt2_tokenizer_from_files(shared_data("gpt2_bpe"))
    path = shared_data("hh_rlhf", "harmless-base-test.jsonl.gz")
    spec = DataSpec(source=str(path), on_bad_row="skip", val_fraction=0.1)
    train, val, skipped = load_split(spec, rm_converter(PAIR_FIELDS, tok, 512), None)
    with gzip.open(path, "rt") as f:
        n_rows = sum(1 for line in f if line.strip())
    assert n_rows == 2312 and len(train) + len(val) + len(skipped) == n_rows
    assert len(train) > 1500 and len(val) == int((len(train) + len(val)) * 0.1)
    reasons = skip_reasons(skipped)
    assert set(reasons) <= {"too long", "chosen and rejected are identical", "empty response in field 'chosen'",
                            "empty response in field 'rejected'"}, reasons
    assert reasons.get("too long", 0) > 0  # some HH dialogues exceed 512 GPT-2 tokens
    first = train[0]
    assert first["chosen_ids"] != first["rejected_ids"]
    text = tok.decode(first["chosen_ids"])
    assert text.startswith("<|user|>\nwhat are some pranks with a pen") and "<|assistant|> " in text
    assert parse_hh("plain text") is None


def test_real_alpaca_seed_tasks_through_the_public_data_path():
    from raystages.models import gpt2_tokenizer_from_files

    tok = gpt2_tokenizer_from_files(shared_data("gpt2_bpe"))
    path = shared_data("alpaca", "seed_tasks.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    spec = DataSpec(source=str(path), on_bad_row="skip", val_fraction=0.1)
    train, val, skipped = load_split(spec, sft_converter(FIELDS, tok, 512, truncate=False), None)
    assert len(train) + len(val) + len(skipped) == len(rows) == 175
    assert 1 <= len(skipped) <= 5 and set(skip_reasons(skipped)) == {"too long"}  # line 63: 1,295 tokens
    assert any("seed_tasks.jsonl:line 63: too long: 1295 tokens" in s for s in skipped)
    train, val, skipped = load_split(spec, sft_converter(FIELDS, tok, 512, truncate=True), None)
    # Cut to 512 tokens, most long rows keep part of their answer; line 63's answer starts
    # after token 512, and an example left with nothing to learn is skipped, not kept.
    assert [s.split(": ", 1)[1] for s in skipped] == ["no supervised token within the first 512 tokens"]
    assert "line 63" in skipped[0] and len(train) + len(val) == 174
    examples = [e for row in train + val for e in row]
    assert len(examples) == sum(len(r["instances"]) for r in rows) - 1
    assert max(len(e["input_ids"]) for e in examples) == 512
    first = examples[0]
    answer = tok.decode([t for t in first["labels"] if t != IGNORE])
    assert answer == " " + rows[0]["instances"][0]["output"] + "<|end|>"  # the template's space
    prompt = tok.decode([t for t, lab in zip(first["input_ids"], first["labels"]) if lab == IGNORE])
    assert rows[0]["instruction"] in prompt
