"""Masking, label losses and the encoder presets/tokenizer: pure functions, checked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from raystages.stages.label_losses import label_ce, label_hits
from raystages.stages.masking import Masker, choose_positions, mask_tokens

IGNORE = -100
# A toy vocabulary: 0 [PAD], 1 [UNK], 2 [CLS], 3 [SEP], 4 [MASK], 5..19 regular tokens.
SPECIALS = (0, 1, 2, 3, 4)
MASK, V = 4, 20


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_each_row_gets_exactly_round_p_times_its_eligible_tokens():
    ids = torch.tensor([[2, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 3],    # 10 eligible -> 2 at p=0.15
                        [2, 5, 6, 7, 3, 0, 0, 0, 0, 0, 0, 0],         # 3 eligible -> max(1, 0) = 1
                        [2, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]])        # none eligible -> none
    chosen = choose_positions(~torch.isin(ids, torch.tensor(SPECIALS)), 0.15, _gen())
    assert chosen.sum(1).tolist() == [2, 1, 0]
    assert not chosen[torch.isin(ids, torch.tensor(SPECIALS))].any()


def test_masking_never_touches_specials_or_padding_and_labels_only_chosen():
    ids = torch.randint(5, V, (64, 32), generator=_gen(1))
    ids[:, 0], ids[:, 20] = 2, 3
    attention = torch.ones_like(ids)
    attention[:, 25:] = 0  # padding that holds regular-looking ids
    inputs, labels = mask_tokens(ids, _gen(), mask_id=MASK, vocab_size=V, special_ids=SPECIALS,
                                 attention_mask=attention)
    chosen = labels != IGNORE
    assert torch.equal(labels[chosen], ids[chosen])
    assert not chosen[:, [0, 20]].any() and not chosen[:, 25:].any()
    assert torch.equal(inputs[~chosen], ids[~chosen])  # only chosen positions change
    # 23 eligible per row -> round(3.45) = 3 chosen in each of the 64 rows.
    assert chosen.sum(1).tolist() == [3] * 64
    assert not torch.isin(inputs[chosen & (inputs != MASK)], torch.tensor(SPECIALS)).any()


def test_same_generator_seed_same_masks_other_seed_other_masks():
    ids = torch.randint(5, V, (8, 40), generator=_gen(2))
    kw = dict(mask_id=MASK, vocab_size=V, special_ids=SPECIALS)
    a, b, c = (mask_tokens(ids, _gen(s), **kw) for s in (7, 7, 8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_replacement_split_is_80_10_10_and_configurable():
    ids = torch.randint(5, V, (400, 100), generator=_gen(3))
    inputs, labels = mask_tokens(ids, _gen(), mask_id=MASK, vocab_size=V, special_ids=SPECIALS)
    chosen = labels != IGNORE
    n = int(chosen.sum())
    assert n == 400 * 15
    masked = (inputs[chosen] == MASK).float().mean().item()
    kept = (inputs[chosen] == ids[chosen]).float().mean().item()
    # 6000 draws: a binomial share's standard error is <= 0.0065; 4 s.e. bounds it.
    # A random replacement equals the original with probability 1/15, so "kept" is 0.1 + 0.1/15.
    assert abs(masked - 0.8) < 0.026 and abs(kept - (0.1 + 0.1 / 15)) < 0.026
    inputs, labels = mask_tokens(ids, _gen(), mask_id=MASK, vocab_size=V, special_ids=SPECIALS,
                                 mask_prob=0.5, mask_token_frac=1.0, random_token_frac=0.0)
    chosen = labels != IGNORE
    assert chosen.sum().item() == 400 * 50 and (inputs[chosen] == MASK).all()


def test_whole_word_masking_takes_every_piece_of_a_chosen_word():
    # words: [5 ##6 ##7] [8] [9 ##10] [11] ... ; 16, 17 are "##" pieces.
    ids = torch.tensor([[2, 5, 16, 17, 8, 9, 16, 11, 12, 17, 13, 3]] * 200)
    masker = Masker(mask_id=MASK, vocab_size=V, special_ids=SPECIALS, continuation_ids=(16, 17),
                    mask_prob=0.3, mask_token_frac=1.0, random_token_frac=0.0, whole_word=True)
    inputs, labels = masker(ids, _gen())
    chosen = labels != IGNORE
    words = [[1, 2, 3], [4], [5, 6], [7], [8, 9], [10]]
    for row in chosen:
        for w in words:
            assert row[w].all() or not row[w].any(), (row, w)
        # k = round(0.3 * 10) = 3; the word crossing the budget is taken whole: 3..5 tokens.
        assert 3 <= int(row.sum()) <= 5
    # Over 200 rows every word is chosen at some point, the 3-piece word included.
    assert chosen[:, 1:11].any(0).all()


def test_label_ce_is_the_mean_over_labelled_items_and_weights_like_torch():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 0.0], [1.0, 3.0]]])  # (1, 3, 2)
    labels = torch.tensor([[0, IGNORE, 1]])
    want = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-2))) / 2
    assert label_ce(logits, labels).item() == pytest.approx(want, rel=1e-6)
    # Class weights: sum(w[y] * ce) / sum(w[y]) -> here (1 * ce0 + 3 * ce1) / 4, and ce0 == ce1.
    weighted = label_ce(logits, labels, torch.tensor([1.0, 3.0]))
    assert weighted.item() == pytest.approx(want, rel=1e-6)
    logits2 = torch.tensor([[0.0, 1.0], [0.0, 0.0]])  # (2, 2) sequence classification
    ce_a, ce_b = math.log(1 + math.exp(1)), math.log(2)
    assert label_ce(logits2, torch.tensor([0, 1]), torch.tensor([1.0, 3.0])).item() == \
        pytest.approx((ce_a + 3 * ce_b) / 4, rel=1e-6)
    empty = label_ce(logits.requires_grad_(), torch.full((1, 3), IGNORE))
    empty.backward()
    assert empty.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_label_hits_counts_labelled_argmax_matches():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 5.0], [1.0, 3.0]]])
    correct, count = label_hits(logits, torch.tensor([[0, IGNORE, 0]]))
    assert (correct.item(), count.item()) == (1, 2)


def test_wordpiece_tokenizer_has_bert_specials_and_export_loads_as_masked_lm(tmp_path):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from raystages.models import build_masked_lm, export_hf, load_tokenizer, train_wordpiece_tokenizer
    from raystages.spec import ModelSpec

    texts = ["the cat sat on the mat", "unbelievable things happen", "a b c d e"] * 20
    train_wordpiece_tokenizer(texts, 300, tmp_path / "tok")
    tok = load_tokenizer(str(tmp_path / "tok"))
    for name in ("[CLS]", "[SEP]", "[MASK]", "[PAD]", "[UNK]"):
        assert name in tok.all_special_tokens
    enc = tok("The cat", "sat")
    pieces = tok.convert_ids_to_tokens(enc["input_ids"])
    assert pieces == ["[CLS]", "the", "cat", "[SEP]", "sat", "[SEP]"]  # lower-cased
    words = tok(["the", "zebra"], is_split_into_words=True)
    assert words.word_ids()[0] is None and words.word_ids()[-1] is None
    model = build_masked_lm(ModelSpec(preset="bert-nano"), tok, seed=0)
    export_hf(model, tok, tmp_path / "model")
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "model", use_safetensors=True)
    assert type(loaded).__name__ == "BertForMaskedLM" and loaded.config.hidden_size == 64
    assert AutoTokenizer.from_pretrained(tmp_path / "model").mask_token == "[MASK]"
    assert not (tmp_path / "model" / "generation_config.json").exists()


def test_cased_wordpiece_keeps_capitals_for_ner(tmp_path):
    from raystages.models import load_tokenizer, train_wordpiece_tokenizer

    texts = ["Empire State Building in New York", "the state of things in the empire"] * 20
    train_wordpiece_tokenizer(texts, 300, tmp_path / "cased", lowercase=False)
    tok = load_tokenizer(str(tmp_path / "cased"))
    assert tok.convert_ids_to_tokens(tok("Empire empire")["input_ids"]) == ["[CLS]", "Empire", "empire", "[SEP]"]


def test_masked_positions_lm_scores_the_labelled_positions_as_the_full_model_does():
    from transformers import BertConfig, BertForMaskedLM

    from raystages.stages.mlm import MaskedPositionsLM

    torch.manual_seed(0)
    mlm = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)).eval()
    ids = torch.randint(5, 50, (3, 7))
    labels = torch.full_like(ids, IGNORE)
    labels[0, 2], labels[1, 0], labels[1, 6], labels[2, 3] = 7, 8, 9, 10
    full = mlm(input_ids=ids).logits
    sparse = MaskedPositionsLM(mlm)(ids, labels)
    assert sparse.shape == (4, 50)
    torch.testing.assert_close(sparse, full[labels != IGNORE], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(label_ce(sparse, labels[labels != IGNORE]), label_ce(full, labels), atol=1e-5, rtol=1e-5)
