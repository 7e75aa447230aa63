"""The transformers engine: generation without vLLM, batched with ``@serve.batch``.

Used when vLLM is not installed (or ``engine: transformers`` forces it). Requests that
arrive together are decoded together: one left-padded forward over the prompts, then one
token per step for every row with a shared KV cache, each row with its own sampling
parameters and seeded generator. ``@serve.batch`` on an async generator streams each
caller its own deltas as the batch decodes. No continuous batching: a request that
arrives mid-batch waits for the next one.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

from ray import serve


@dataclass
class Job:
    """One sequence to generate (a prompt's ``n`` choices are ``n`` jobs)."""

    ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int = 0
    stream: bool = False  # without streaming or stop strings, text is decoded once, at the end
    ignore_eos: bool = False  # an end token is taken as text (dropped when decoding), not as the end


def _held_back(text: str, stops: list[str]) -> int:
    """Characters at the end of ``text`` not safe to stream yet: a partial UTF-8 character
    (decoded as U+FFFD) or the start of a stop string."""
    hold = 1 if text.endswith("\ufffd") else 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold


class HFEngine:
    """A causal LM checkpoint served by ``transformers`` (float32)."""

    def __init__(self, path: str, max_batch_size: int = 64, batch_wait_ms: float = 5.0,
                 threads: int = 1, max_model_len: int | None = None):
        import torch
        from transformers import AutoModelForCausalLM, GenerationConfig

        from raystages.models import end_token_ids, load_tokenizer

        torch.set_num_threads(max(1, threads))
        self.tok = load_tokenizer(path)
        # Ray hides GPUs from replicas that did not reserve one, so this is CPU unless `gpus` > 0.
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = AutoModelForCausalLM.from_pretrained(
            path, use_safetensors=True, dtype=torch.float32).eval().to(self.device)
        ends = set(end_token_ids(self.tok))
        try:
            eos = GenerationConfig.from_pretrained(path).eos_token_id
            ends |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        except OSError:
            pass
        self.end_ids = ends
        self.max_len = max_model_len or self.model.config.max_position_embeddings
        self._decode.set_max_batch_size(max_batch_size)
        self._decode.set_batch_wait_timeout_s(batch_wait_ms / 1000)

    def prompt_ids(self, prompt: str | list[int] | None = None, messages: list[dict] | None = None) -> list[int]:
        if isinstance(prompt, list):  # already token ids
            return prompt
        if messages is not None:
            text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = prompt
        return self.tok(text, add_special_tokens=False)["input_ids"]

    async def generate(self, req: dict):
        """Stream of events for one request: first ``{"prompt_tokens": [...]}`` (or
        ``{"error", "param", "code"}``), then ``{"index", "text", "finish_reason",
        "completion_tokens"}`` deltas (one whole one per choice unless ``req["stream"]``);
        choice ``index = prompt_index * n + j``."""
        try:
            prompts = ([self.prompt_ids(messages=req["messages"])] if "messages" in req
                       else [self.prompt_ids(prompt=p) for p in req["prompts"]])
        except Exception as e:  # noqa: BLE001 - e.g. a chat template that rejects the roles
            yield {"error": f"messages: {e}", "param": "messages", "code": "invalid_value"}
            return
        jobs = []
        for p, ids in enumerate(prompts):
            err = self._check_length(len(ids), req.get("max_tokens"), "messages" in req)
            if err:
                yield err
                return
            max_tokens = req.get("max_tokens") or self.max_len - len(ids)
            for j in range(req.get("n", 1)):
                seed = req["seed"] + p * req.get("n", 1) + j if req.get("seed") is not None else random.getrandbits(63)
                jobs.append(Job(ids, max_tokens, temperature=req.get("temperature", 1.0), top_p=req.get("top_p", 1.0),
                                stop=list(req.get("stop") or []), seed=seed, stream=bool(req.get("stream")),
                                ignore_eos=bool(req.get("ignore_eos"))))
        yield {"prompt_tokens": [len(ids) for ids in prompts]}
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, job: Job):
            try:
                async for delta in self._decode(job):
                    await queue.put({"index": index, **delta})
            finally:
                await queue.put(None)

        tasks = [asyncio.create_task(pump(i, job)) for i, job in enumerate(jobs)]
        live, whole = len(tasks), {}
        while live:
            item = await queue.get()
            if item is None:
                live -= 1
            elif req.get("stream"):
                yield item
            else:  # one message per choice: each streamed item is a round trip to the ingress
                prev = whole.get(item["index"], {"text": ""})
                whole[item["index"]] = {**item, "text": prev["text"] + item["text"]}
        for item in whole.values():
            yield item
        for t in tasks:
            t.result()  # re-raise a decoding failure instead of returning a silent short stream

    def _check_length(self, n_prompt: int, max_tokens: int | None, chat: bool) -> dict | None:
        from raystages.serve.requests import context_error

        err = context_error(n_prompt, max_tokens, self.max_len, "messages" if chat else "prompt")
        return err and {"error": err.message, "param": err.param, "code": err.code}

    def _sample(self, logits, jobs: list[Job], gens):
        """``(rows, vocab)`` logits -> ``(rows,)`` next tokens: argmax where temperature is 0,
        else top-p (nucleus) sampling from ``softmax(logits / temperature)``."""
        import torch

        out = logits.argmax(-1)
        for r, job in enumerate(jobs):
            if job.temperature == 0:
                continue
            probs = torch.softmax(logits[r] / job.temperature, -1)
            if job.top_p < 1:
                sorted_p, order = probs.sort(descending=True)
                drop = sorted_p.cumsum(-1) - sorted_p > job.top_p  # keep the smallest set reaching top_p
                probs = probs.scatter(0, order, sorted_p.masked_fill(drop, 0))
            out[r] = torch.multinomial(probs, 1, generator=gens[r])[0]
        return out

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def _decode(self, jobs: list[Job]):
        """Decode a batch: yields, per step, one item per job — a delta dict, or
        ``StopIteration`` once that job has finished.

        Prompts are left-padded to ``(batch, width)`` with positions counted over real tokens
        only; each later step feeds ``(batch, 1)`` new tokens against the shared KV cache."""
        import torch

        from raystages.models import padded

        # Left padding: every row's next token is at the end.
        ids, mask = padded([j.ids for j in jobs], self.tok.pad_token_id, left=True)
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        gens = [torch.Generator().manual_seed(j.seed) for j in jobs]
        tokens: list[list[int]] = [[] for _ in jobs]
        sent = [""] * len(jobs)
        done = [False] * len(jobs)
        with torch.no_grad():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
            for _ in range(max(j.max_tokens for j in jobs)):
                nxt = self._sample(out.logits[:, -1].float().cpu(), jobs, gens)  # seeded on CPU
                step = []
                for r, job in enumerate(jobs):
                    if done[r]:
                        step.append(StopIteration)
                        continue
                    step.append(self._advance(r, job, int(nxt[r]), tokens, sent, done))
                yield step
                if all(done):
                    return
                mask = torch.cat([mask, mask.new_ones(len(jobs), 1)], 1)
                pos = pos[:, -1:] + 1
                out = self.model(input_ids=nxt[:, None].to(self.device), attention_mask=mask,
                                 position_ids=pos, past_key_values=out.past_key_values, use_cache=True)
                await asyncio.sleep(0)  # let requests queue for the next batch

    def _advance(self, r: int, job: Job, token: int, tokens, sent, done) -> dict:
        """Take ``token`` for row ``r``; return the text delta that is safe to stream."""
        finish = None
        if token in self.end_ids and not job.ignore_eos:
            finish = "stop"
        else:
            tokens[r].append(token)
            if len(tokens[r]) >= job.max_tokens:
                finish = "length"
            if not (job.stream or job.stop or finish):
                return {"text": "", "finish_reason": None, "completion_tokens": len(tokens[r])}
        text = self.tok.decode(tokens[r], skip_special_tokens=True)
        hits = [text.find(s) for s in job.stop if s and s in text]
        if hits:
            finish, text = "stop", text[: min(hits)]
        if finish is None:
            text = text[: len(text) - _held_back(text, job.stop)]
        delta = text[len(sent[r]):] if text.startswith(sent[r]) else ""
        sent[r] = text if text.startswith(sent[r]) else sent[r]
        done[r] = finish is not None
        return {"text": delta, "finish_reason": finish, "completion_tokens": len(tokens[r])}

    def check_health(self):
        pass
