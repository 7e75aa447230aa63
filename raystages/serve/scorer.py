"""Reward-model scoring as a Ray Serve deployment, batched across requests.

A reward checkpoint is a ``*ForSequenceClassification`` with one label: the score of a
conversation is the logit at its last token. Inputs are laid out by the same function the
RM stage lays out its preference pairs with (``raystages.data.preference.scoring_ids``):
``(prompt, response)`` through the checkpoint's chat template as a user turn and an
assistant turn, a message list as that conversation, and a bare string without a prompt as
raw text.
"""

from __future__ import annotations

import asyncio

from ray import serve

from raystages.data.preference import scoring_ids


def score_padded(model, seqs: list[list[int]], pad_id: int, device="cpu") -> list[float]:
    """One forward over right-padded sequences: ``(B, max_len)`` ids -> ``(B,)`` scores, the
    logit at each sequence's last real token (found from ``pad_token_id``)."""
    import torch

    from raystages.models import padded

    ids, mask = padded(seqs, pad_id)
    with torch.no_grad():
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # (B, 1)
    return logits[:, 0].tolist()


class RewardScorer:
    """Scores conversations with a sequence-classification checkpoint.

    ``score`` is called once per HTTP request with all its responses; each conversation
    joins the shared ``@serve.batch`` queue, so concurrent requests are scored together.
    """

    def __init__(self, path: str, max_batch_size: int = 64, batch_wait_ms: float = 5.0,
                 threads: int = 1, max_model_len: int | None = None):
        import torch
        from transformers import AutoModelForSequenceClassification

        from raystages.models import load_tokenizer

        torch.set_num_threads(max(1, threads))
        self.tok = load_tokenizer(path)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"  # GPU only if `gpus` > 0
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, use_safetensors=True, dtype=torch.float32).eval().to(self.device)
        if self.model.config.num_labels != 1:
            raise ValueError(f"{path}: a reward model has num_labels=1, this one has {self.model.config.num_labels}")
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tok.pad_token_id
        self.pad = self.model.config.pad_token_id
        self.max_len = max_model_len or self.model.config.max_position_embeddings
        self._forward.set_max_batch_size(max_batch_size)
        self._forward.set_batch_wait_timeout_s(batch_wait_ms / 1000)

    async def score(self, prompt: str | None, responses: list) -> dict:
        """``{"scores": [float, ...], "tokens": n}``, or ``{"error", "param", "code"}`` for bad input."""
        try:
            ids = [scoring_ids(self.tok, prompt, r) for r in responses]
        except Exception as e:  # noqa: BLE001 - a template that cannot render these messages
            return {"error": f"responses: cannot lay out the conversation: {e}", "param": "responses", "code": "invalid_value"}
        for i, seq in enumerate(ids):
            if len(seq) > self.max_len:
                return {"error": f"responses[{i}]: {len(seq)} tokens with the prompt, over the model's context of "
                                 f"{self.max_len}", "param": "responses", "code": "context_length_exceeded"}
        scores = await asyncio.gather(*(self._forward(seq) for seq in ids))
        return {"scores": list(scores), "tokens": sum(len(s) for s in ids)}

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def _forward(self, batch: list[list[int]]) -> list[float]:
        return score_padded(self.model, batch, self.pad, self.device)

    def check_health(self):
        pass
