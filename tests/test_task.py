"""The built-in task: oracle, determinism, disjoint splits."""

from raystages.task import is_correct, parse_prompt, reward
from raystages.task.problems import corrupt
from raystages.task.splits import preference_rows, pretrain_texts, problems, rl_prompts, sft_rows


def test_oracle_scores_by_position_and_length():
    assert reward("sort: d a c b", "a b c d") == 1.0
    assert reward("reverse: d a c b", "b c a d") == 1.0
    assert reward("sort: d a c b", "a b d c") == 0.5
    assert reward("sort: d a c b", "a b c d e") == 0.8  # 4 right of max(5, 4)
    assert reward("sort: d a c b", "") == 0.0
    assert reward("sort: d a c b", " a b c d\nsort: x y") == 1.0  # judged on the first line
    assert is_correct("reverse: a b", "b a") and not is_correct("reverse: a b", "a b")


def test_prompts_parse_and_non_prompts_do_not():
    assert parse_prompt("sort: q a").letters == ("q", "a")
    assert parse_prompt("hello") is None
    try:
        reward("hello", "x")
    except ValueError as e:
        assert "not a task prompt" in str(e)
    else:
        raise AssertionError("a non-task prompt must raise")


def test_corrupt_always_changes_the_answer():
    import random

    rng = random.Random(0)
    for p in problems("rm", "train", 300):
        assert corrupt(p.answer, rng) != p.answer


def test_splits_are_deterministic_and_disjoint():
    assert sft_rows("train", 50, seed=3) == sft_rows("train", 50, seed=3)
    assert sft_rows("train", 50, seed=3) != sft_rows("train", 50, seed=4)
    train = {p.prompt for p in problems("sft", "train", 3000)}
    val = {p.prompt for p in problems("sft", "val", 300)}
    assert not train & val


def test_preference_pairs_follow_the_oracle_strictly():
    for row in preference_rows("train", 300):
        assert reward(row["prompt"], row["chosen"]) > reward(row["prompt"], row["rejected"])


def test_pretrain_corpus_has_the_requested_noise():
    docs = pretrain_texts("train", 50, noise=0.3)
    lines = [l for d in docs for l in d.split("\n")]
    wrong = sum(not is_correct(*l.split(" = ")) for l in lines)
    assert len(lines) == 800 and 0.2 < wrong / len(lines) < 0.4
    assert all(is_correct(r["prompt"], r["answer"]) for r in rl_prompts("val", 20))
