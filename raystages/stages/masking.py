"""Dynamic masking for masked-LM pretraining, as pure seeded tensor functions.

BERT's recipe (Devlin et al. 2019, §3.1 and App. A): choose ``mask_prob`` of the tokens
that may be predicted, replace 80% of the chosen with ``[MASK]``, 10% with a random token
and keep 10% as they are; the loss is on the chosen tokens only. As in BERT's own data
script (``create_pretraining_data.py``: ``max(1, round(n * masked_lm_prob))``) each row
gets an exact number of predictions, so a batch always has some and tests can count them.
Whole-word masking (BERT's later release) chooses words and masks all their pieces.

Conventions: ``input_ids`` ``(B, T)`` int64; ``IGNORE`` (-100) marks labels without loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from raystages.stages.losses import IGNORE


@dataclass(frozen=True)
class Masker:
    """What masking needs to know of the tokenizer, picklable to the Ray Train workers.

    ``special_ids``: never chosen and never drawn as random replacements ([CLS], [SEP],
    [PAD], [MASK], [UNK]). ``continuation_ids``: pieces that continue the previous token's
    word (WordPiece ``##x``), used by whole-word masking.
    """

    mask_id: int
    vocab_size: int
    special_ids: tuple[int, ...]
    continuation_ids: tuple[int, ...] = ()
    mask_prob: float = 0.15
    mask_token_frac: float = 0.8
    random_token_frac: float = 0.1
    whole_word: bool = False

    def __call__(self, input_ids: Tensor, generator: torch.Generator,
                 attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        starts = None
        if self.whole_word:
            starts = ~torch.isin(input_ids, torch.tensor(self.continuation_ids, dtype=input_ids.dtype))
        return mask_tokens(input_ids, generator, mask_id=self.mask_id, vocab_size=self.vocab_size,
                           special_ids=self.special_ids, mask_prob=self.mask_prob,
                           mask_token_frac=self.mask_token_frac,
                           random_token_frac=self.random_token_frac,
                           attention_mask=attention_mask, word_starts=starts)


def masker_for(tokenizer, mlm_spec) -> Masker:
    """A :class:`Masker` for ``tokenizer`` with the fractions of ``mlm_spec``."""
    if tokenizer.mask_token_id is None:
        raise ValueError("masked-LM pretraining needs a tokenizer with a mask token "
                         "(the bert-* presets train one with [CLS] [SEP] [MASK] [PAD] [UNK])")
    vocab = tokenizer.get_vocab()
    return Masker(mask_id=tokenizer.mask_token_id, vocab_size=len(tokenizer),
                  special_ids=tuple(sorted(set(tokenizer.all_special_ids))),
                  continuation_ids=tuple(sorted(i for t, i in vocab.items() if t.startswith("##"))),
                  mask_prob=mlm_spec.mask_prob, mask_token_frac=mlm_spec.mask_token_frac,
                  random_token_frac=mlm_spec.random_token_frac, whole_word=mlm_spec.whole_word)


def choose_positions(eligible: Tensor, mask_prob: float, generator: torch.Generator,
                     word_starts: Tensor | None = None) -> Tensor:
    """The positions to predict, ``(B, T)`` bool.

    ``eligible``: ``(B, T)`` bool. Each row gets ``k = max(1, round(mask_prob * n))`` of its
    ``n`` eligible tokens (none when ``n == 0``), uniformly at random. With ``word_starts``
    (``(B, T)`` bool, True where a word begins) whole words are chosen, in random order,
    until the first ``k`` tokens of that order are covered: every token of a chosen word is
    chosen, so a row may get a few more than ``k`` (never one less).
    """
    B, T = eligible.shape
    n = eligible.sum(1)
    k = torch.where(n > 0, torch.clamp(torch.round(n * mask_prob), min=1), torch.zeros_like(n))
    scores = torch.rand(B, T, generator=generator)
    if word_starts is not None:
        # Every token takes the score of its word's first token (a word's pieces are adjacent).
        word = torch.cumsum(word_starts.long(), dim=1).clamp(min=1) - 1
        first = torch.zeros(B, T, dtype=torch.long)
        first.scatter_reduce_(1, word, torch.arange(T).expand(B, T), reduce="amin", include_self=False)
        scores = scores.gather(1, first.gather(1, word))
    scores = scores.masked_fill(~eligible, -1.0)  # ineligible tokens sort last
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(T).expand(B, T))
    if word_starts is None:
        return (rank < k[:, None]) & eligible
    word_rank = torch.full((B, T), T, dtype=torch.long)
    word_rank.scatter_reduce_(1, word, rank, reduce="amin", include_self=True)
    return (word_rank.gather(1, word) < k[:, None]) & eligible


def mask_tokens(input_ids: Tensor, generator: torch.Generator, *, mask_id: int, vocab_size: int,
                special_ids: tuple[int, ...], mask_prob: float = 0.15, mask_token_frac: float = 0.8,
                random_token_frac: float = 0.1, attention_mask: Tensor | None = None,
                word_starts: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(inputs, labels)`` for one masked-LM batch; ``input_ids`` is left unchanged.

    ``input_ids``: ``(B, T)``; special tokens and padding (``attention_mask == 0``) are
    never chosen. Of the chosen positions (see :func:`choose_positions`) each becomes
    ``mask_id`` with probability ``mask_token_frac``, a uniformly drawn non-special token
    with probability ``random_token_frac``, and stays itself otherwise. ``labels`` hold the
    original token at chosen positions and ``IGNORE`` elsewhere. All randomness comes from
    ``generator`` (a CPU ``torch.Generator``): the same seed gives the same masks.
    """
    device = input_ids.device
    ids = input_ids.cpu()
    specials = torch.tensor(special_ids, dtype=ids.dtype)
    eligible = ~torch.isin(ids, specials)
    if attention_mask is not None:
        eligible &= attention_mask.cpu().bool()
    starts = word_starts.cpu() if word_starts is not None else None
    chosen = choose_positions(eligible, mask_prob, generator, starts)
    draw = torch.rand(ids.shape, generator=generator)
    to_mask = chosen & (draw < mask_token_frac)
    to_random = chosen & (draw >= mask_token_frac) & (draw < mask_token_frac + random_token_frac)
    regular = torch.ones(vocab_size, dtype=torch.bool)
    regular[specials[specials < vocab_size]] = False
    pool = regular.nonzero().squeeze(1)
    random_ids = pool[torch.randint(len(pool), ids.shape, generator=generator)]
    inputs = torch.where(to_mask, torch.tensor(mask_id, dtype=ids.dtype), ids)
    inputs = torch.where(to_random, random_ids, inputs)
    labels = torch.where(chosen, ids, torch.tensor(IGNORE, dtype=ids.dtype))
    return inputs.to(device), labels.to(device)
