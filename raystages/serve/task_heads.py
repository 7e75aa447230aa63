"""Encoder task heads as a Ray Serve deployment, batched across requests.

One deployment serves one checkpoint, whichever head it carries (read off its config's
``architectures``), with the checkpoint's own tokenizer and ``id2label``:

- ``*ForSequenceClassification`` with two or more labels (``sft.task: classification``):
  each text's label and the probability of every label;
- ``*ForTokenClassification`` (``sft.task: token_classification``): BIO entities with
  character offsets. A word is what the tokenizer's pre-tokenizer makes of the text
  (whitespace and punctuation), and a word's tag is its first piece's, as in training;
- ``*ForMaskedLM`` (``objective: mlm``): the ``top_k`` tokens for each mask token.

A one-label sequence classifier is a reward model: ``serve.scorer`` serves it.
"""

from __future__ import annotations

import asyncio

from ray import serve

from raystages.stages.task_metrics import bio_entities


def word_entities(text: str, offsets: list[tuple[int, int]], word_ids: list[int | None],
                  tags: list[str], probs: list[float]) -> list[dict]:
    """BIO entities over the words of ``text`` with character offsets.

    ``offsets``, ``word_ids``, ``tags``, ``probs``: one per token (``word_ids`` None on
    special tokens). Each word takes its first token's tag; an entity spans from its first
    word's first character to its last word's last, and its score is the mean probability
    of its words' tags.
    """
    first: dict[int, int] = {}  # word -> its first token
    end: dict[int, int] = {}  # word -> its last character
    for i, w in enumerate(word_ids):
        if w is None:
            continue
        first.setdefault(w, i)
        end[w] = offsets[i][1]
    words = sorted(first)
    word_tags = [tags[first[w]] for w in words]
    out = []
    for kind, a, b in bio_entities(word_tags):
        start, stop = offsets[first[words[a]]][0], end[words[b]]
        score = sum(probs[first[w]] for w in words[a:b + 1]) / (b - a + 1)
        out.append({"entity": kind, "start": start, "end": stop, "text": text[start:stop], "score": score})
    return out


class TaskHeadServer:
    """Serves one task-head or masked-LM checkpoint; ``classify`` and ``fill_mask`` are
    called once per HTTP request with all its texts, and each text joins the shared
    ``@serve.batch`` queue, so concurrent requests share a forward pass."""

    def __init__(self, path: str, max_batch_size: int = 64, batch_wait_ms: float = 5.0,
                 threads: int = 1, max_model_len: int | None = None):
        import torch
        from transformers import (AutoConfig, AutoModelForMaskedLM, AutoModelForSequenceClassification,
                                  AutoModelForTokenClassification)

        from raystages.models import load_tokenizer

        torch.set_num_threads(max(1, threads))
        arch = (AutoConfig.from_pretrained(path).architectures or [""])[0]
        self.task = ("token_classification" if arch.endswith("ForTokenClassification") else
                     "fill_mask" if arch.endswith("ForMaskedLM") else "classification")
        auto = {"token_classification": AutoModelForTokenClassification,
                "classification": AutoModelForSequenceClassification, "fill_mask": AutoModelForMaskedLM}[self.task]
        self.tok = load_tokenizer(path)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"  # GPU only if `gpus` > 0
        self.model = auto.from_pretrained(path, use_safetensors=True, dtype=torch.float32).eval().to(self.device)
        self.labels = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]
        self.max_len = max_model_len or self.model.config.max_position_embeddings
        self._forward.set_max_batch_size(max_batch_size)
        self._forward.set_batch_wait_timeout_s(batch_wait_ms / 1000)

    def _encode(self, texts: list[str], pairs: list[str] | None = None) -> list[dict] | dict:
        encs = [self.tok(t, p, return_offsets_mapping=True) for t, p in zip(texts, pairs or [None] * len(texts))]
        for i, e in enumerate(encs):
            if len(e["input_ids"]) > self.max_len:
                return {"error": f"input[{i}]: {len(e['input_ids'])} tokens, over the model's context of "
                                 f"{self.max_len}", "param": "input", "code": "context_length_exceeded"}
        return encs

    async def classify(self, texts: list[str], pairs: list[str] | None = None) -> dict:
        """``{"results": [...], "tokens": n}``: per text (or text pair) ``{"label", "score",
        "scores"}`` (classification) or ``{"entities": [...]}`` (token classification); or an error."""
        if self.task == "fill_mask":
            return {"error": "this model has no classification head", "param": "model", "code": "model_not_supported"}
        if pairs is not None and self.task != "classification":
            return {"error": "text pairs need a sequence-classification head; this model labels tokens",
                    "param": "text_pair", "code": "invalid_value"}
        encs = self._encode(texts, pairs)
        if isinstance(encs, dict):
            return encs
        probs = await asyncio.gather(*(self._forward(self._inputs(e)) for e in encs))
        results = []
        for text, enc, p in zip(texts, encs, probs):
            score, best = p.max(-1)  # (T,) each position's likeliest label and its probability
            if self.task == "classification":  # one row: the head reads [CLS]
                results.append({"label": self.labels[int(best[0])], "score": score[0].item(),
                                "scores": dict(zip(self.labels, p[0].tolist()))})
            else:
                results.append({"entities": word_entities(
                    text, [tuple(o) for o in enc["offset_mapping"]], enc.word_ids(),
                    [self.labels[b] for b in best.tolist()], score.tolist())})
        return {"results": results, "tokens": sum(len(e["input_ids"]) for e in encs)}

    async def fill_mask(self, texts: list[str], top_k: int) -> dict:
        """``{"results": [[...] per mask token] per text, "tokens": n}``: each candidate
        ``{"token", "token_id", "score", "sequence"}``, best first; or an error."""
        if self.task != "fill_mask":
            return {"error": "this model is not a masked LM", "param": "model", "code": "model_not_supported"}
        mask = self.tok.mask_token
        for i, t in enumerate(texts):
            if mask not in t:
                return {"error": f"input[{i}]: no {mask} token to fill", "param": "input", "code": "invalid_value"}
        encs = self._encode(texts)
        if isinstance(encs, dict):
            return encs
        probs = await asyncio.gather(*(self._forward(self._inputs(e)) for e in encs))
        results = []
        for enc, p in zip(encs, probs):
            ids = enc["input_ids"]
            per_mask = []
            for pos in (i for i, t in enumerate(ids) if t == self.tok.mask_token_id):
                top = p[pos].topk(min(top_k, p.shape[-1]))
                per_mask.append([{"token": self.tok.convert_ids_to_tokens(c), "token_id": c, "score": sc,
                                  "sequence": self.tok.decode(ids[:pos] + [c] + ids[pos + 1:], skip_special_tokens=True)}
                                 for sc, c in zip(top.values.tolist(), top.indices.tolist())])
            results.append(per_mask)
        return {"results": results, "tokens": sum(len(e["input_ids"]) for e in encs)}

    @staticmethod
    def _inputs(enc) -> tuple[list[int], list[int]]:
        """``(input_ids, token_type_ids)`` as training fed them: a pair's segment ids (1 on
        the second text), all 0 for a single text or a tokenizer without them."""
        ids = enc["input_ids"]
        return ids, enc.get("token_type_ids") or [0] * len(ids)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def _forward(self, batch: list[tuple[list[int], list[int]]]) -> list:
        """Right-padded forward of ``(input_ids, token_type_ids)`` pairs: per sequence, its
        positions' label (or vocabulary) probabilities, a ``(T, C)`` tensor; a sequence
        classifier's is ``(1, C)``. Each route reads off only what it answers with (a masked
        LM's vocabulary stays a tensor)."""
        import torch

        from raystages.models import padded

        ids, mask = padded([i for i, _ in batch], self.tok.pad_token_id)
        segments = {}
        if any(any(t) for _, t in batch):  # models without segment embeddings never see the argument
            segments["token_type_ids"] = padded([t for _, t in batch], 0)[0].to(self.device)
        with torch.no_grad():
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **segments).logits
        probs = logits.float().softmax(-1).cpu()
        if probs.dim() == 2:  # (B, C): one row per sequence
            return list(probs[:, None, :])
        return [probs[i, : len(s)] for i, (s, _) in enumerate(batch)]

    async def probe(self) -> bool:
        """Readiness: one forward of a one-word text."""
        await self._forward(self._inputs(self.tok("a")))
        return True

    def check_health(self):
        pass
