"""The RL stage end to end on the built-in task: GRPO and PPO raise the oracle reward of an
SFT-like policy while the KL to it stays bounded; a rollout actor killed mid-run is replaced
and its work redone; a learner worker killed mid-run makes Ray Train restart the group from
the last checkpoint and the run completes; a KL blow-up aborts cleanly with a final
checkpoint; a rerun resumes; bad specs fail at parse time (exit 2 from the CLI).

Hooks run on learner rank 0 inside its Ray Train worker and reach it by pickle: they report
back through files, not through the test's variables."""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path

import pytest
import torch

from raystages.spec import SpecError, load_spec
from tests.conftest import ROOT
from tests.run_helpers import logged_metrics


@pytest.fixture(scope="module")
def sft_policy(tmp_path_factory, builtin_tokenizer_dir) -> Path:
    """A nano Llama fine-tuned on the task's chat data with plain torch (~10 s): right on
    about a fifth of held-out prompts when sampling (oracle reward ~0.67), so RL has room to
    show. (400 steps reach ~0.85, too close to the ceiling for a clear margin.)"""
    from raystages.models import build_causal_lm, export_hf, load_tokenizer
    from raystages.spec import ModelSpec
    from raystages.task.splits import sft_rows

    tok = load_tokenizer(str(builtin_tokenizer_dir))
    model = build_causal_lm(ModelSpec(preset="nano"), tok, seed=0)
    data = []
    for r in sft_rows("train", 3000):
        prompt = tok.apply_chat_template(r["messages"][:1], add_generation_prompt=True, return_dict=True)["input_ids"]
        full = tok.apply_chat_template(r["messages"], return_dict=True)["input_ids"]
        data.append((full, len(prompt)))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95))
    rng = random.Random(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is as fast, and kinder to a shared machine
    for _ in range(200):
        batch = rng.sample(data, 32)
        width = max(len(f) for f, _ in batch)
        ids = torch.full((32, width), tok.pad_token_id)
        labels = torch.full((32, width), -100)
        attn = torch.zeros((32, width), dtype=torch.long)
        for i, (f, p) in enumerate(batch):
            ids[i, :len(f)], attn[i, :len(f)] = torch.tensor(f), 1
            labels[i, p:len(f)] = torch.tensor(f[p:])
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    out = tmp_path_factory.mktemp("rl") / "sft-nano"
    export_hf(model, tok, out)
    return out


def _spec(job: str, runs_dir: Path, name: str, policy: Path, *overrides: str):
    return load_spec(ROOT / "jobs" / job, [f"model.path={policy}", f"run.storage_path={runs_dir}",
                                           f"run.name={name}", *overrides])


def _check_run(result, spec, policy: Path, min_gain: float) -> dict:
    m = result.metrics
    assert m["aborted"] is None and m["iterations"] == spec.algo.iterations
    # Sampled responses on held-out prompts, fixed seeds: what RL optimises.
    assert m["sampled_reward_after"] >= m["sampled_reward_before"] + min_gain, m
    rows = logged_metrics(result.run_dir)
    assert len(rows) == spec.algo.iterations
    assert max(r["kl_ref"] for r in rows) < spec.limits.max_kl
    # On-policy right after each sync: the learner recomputes what the engine reported.
    assert max(r["logprob_gap_mean"] for r in rows) < 1e-4
    assert all(r["stale_rollouts"] == 0 and r["sync_bytes"] > 0 for r in rows)
    lineage = json.loads((result.export_dir / "lineage.json").read_text())
    assert lineage["stage"] == "rl" and lineage["parent"] == str(policy.resolve())
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["before"]["sampled_reward_oracle"] == m["sampled_reward_before"]
    assert summary["after"]["version"] == spec.algo.iterations
    return m


@pytest.mark.slow
def test_grpo_raises_the_oracle_reward_and_survives_a_killed_rollout_actor(ray_session, runs_dir, sft_policy, tmp_path):
    from raystages.generate import greedy_complete
    from raystages.stages import rl

    spec = _spec("grpo.yaml", runs_dir, "grpo-test", sft_policy, "algo.iterations=30", "algo.group_size=8",
                 "optim.lr=5e-4", "optim.warmup_steps=10", "limits.max_kl=5")
    killed = tmp_path / "killed-actor"

    def kill_actor(ctx, iteration):  # SIGKILL the rollout process right before iteration 5's rollouts
        if iteration == 5 and not killed.exists():
            import ray

            pid = ray.get(ctx.pool.actors[0].pid.remote())
            killed.write_text(str(pid))
            os.kill(pid, signal.SIGKILL)

    result = rl.run(spec, hooks={"before_submit": kill_actor})
    assert killed.exists() and result.metrics["actor_restarts"] == 1
    m = _check_run(result, spec, sft_policy, min_gain=0.05)
    print(f"GRPO oracle reward (held-out) sampled {m['sampled_reward_before']:.3f} -> {m['sampled_reward_after']:.3f}, "
          f"greedy {m['reward_before']:.3f} -> {m['reward_after']:.3f}")
    # The export is a plain Hugging Face checkpoint.
    assert greedy_complete(str(result.export_dir), ["sort: c b a"], max_new_tokens=8, chat=True)[0].strip()


@pytest.mark.slow
def test_ppo_with_a_critic_raises_the_oracle_reward(ray_session, runs_dir, sft_policy):
    from raystages.stages import rl

    spec = _spec("rl.yaml", runs_dir, "ppo-test", sft_policy, "algo.iterations=30", "algo.prompts_per_iteration=64",
                 "optim.lr=5e-4", "optim.warmup_steps=20", "limits.max_kl=5")
    result = rl.run(spec)
    m = _check_run(result, spec, sft_policy, min_gain=0.05)
    rows = logged_metrics(result.run_dir)
    # The critic learns: its error on the GAE returns falls and it explains their variance.
    assert rows[-1]["value_error"] < 0.5 * rows[0]["value_error"]
    assert sum(r["explained_var"] for r in rows[-10:]) / 10 > 0.1
    assert all(0 <= r["clip_frac"] < 0.5 for r in rows)
    print(f"PPO oracle reward (held-out) sampled {m['sampled_reward_before']:.3f} -> {m['sampled_reward_after']:.3f}, "
          f"greedy {m['reward_before']:.3f} -> {m['reward_after']:.3f}")


@pytest.mark.slow
def test_kl_blowup_aborts_cleanly_with_a_final_checkpoint_hf_engine(ray_session, runs_dir, sft_policy):
    from transformers import AutoModelForCausalLM

    from raystages.stages import rl

    spec = _spec("grpo.yaml", runs_dir, "abort-test", sft_policy, "rollout.engine=hf", "scaling.num_workers=1",
                 "algo.iterations=6", "algo.group_size=4", "optim.lr=3e-3", "optim.warmup_steps=0",
                 "limits.max_kl=0.05", "rollout.eval_prompts=8")
    result = rl.run(spec)
    m = result.metrics
    assert m["aborted"] and "limits.max_kl" in m["aborted"]
    assert 2 <= m["iterations"] < 6  # iteration 1 runs on the reference weights: KL 0
    rows = logged_metrics(result.run_dir)
    assert rows[-1]["kl_ref"] > 0.05 and all(r["kl_ref"] <= 0.05 for r in rows[:-1])
    assert max(r["logprob_gap_mean"] for r in rows) < 1e-4  # the HF engine is on-policy too
    # The final checkpoint holds the weights of the last update, not the starting policy.
    tuned = AutoModelForCausalLM.from_pretrained(str(result.export_dir))
    start = AutoModelForCausalLM.from_pretrained(str(sft_policy))
    diff = max((a - b).abs().max().item() for a, b in zip(tuned.parameters(), start.parameters()))
    assert diff > 1e-3
    assert json.loads((result.run_dir / "summary.json").read_text())["metrics"]["aborted"] == m["aborted"]


def _final_checkpoint(run_dir: Path) -> Path:
    """The Ray Train checkpoint the run ended with (summary.json names it)."""
    return Path(json.loads((run_dir / "summary.json").read_text())["checkpoint"])


@pytest.mark.slow
def test_one_step_off_policy_then_a_rerun_resumes_from_the_checkpoint(ray_session, runs_dir, sft_policy):
    from raystages.stages import rl

    # A small lr: this test is about staleness and resume, and at 5e-4 one update of the nano
    # policy has pushed KL to the reference past limits.max_kl (18 nats), ending the run early.
    common = ("scaling.num_workers=1", "run.checkpoint_every=2", "rollout.eval_prompts=8", "optim.lr=1e-4",
              "optim.warmup_steps=0", "algo.group_size=4")
    spec = _spec("grpo.yaml", runs_dir, "offpolicy-test", sft_policy, "algo.iterations=4",
                 "algo.one_step_off_policy=true", *common)
    rl.run(spec)
    rows = logged_metrics(spec.run_dir())
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]
    # Batch k+1 was generated during update k, with the weights from before it.
    batch = spec.algo.prompts_per_iteration * spec.algo.group_size
    assert [r["stale_rollouts"] for r in rows] == [0, batch, batch, batch]
    assert rows[0]["logprob_gap_mean"] < 1e-4 < min(r["logprob_gap_mean"] for r in rows[1:])
    # The run ended on a Ray Train checkpoint holding the learner's DeepSpeed state, the loop
    # state and the export; at most run.keep_checkpoints of them are kept.
    final = _final_checkpoint(spec.run_dir())
    assert final.parent == spec.run_dir() and (final / "policy").is_dir() and (final / "hf" / "config.json").is_file()
    assert json.loads((final / "loop.json").read_text())["iteration"] == 4
    assert len([p for p in spec.run_dir().glob("checkpoint_*") if p.is_dir()]) <= spec.run.keep_checkpoints

    # Same run name, more iterations: continues from the end with the learner's saved state.
    more = _spec("grpo.yaml", runs_dir, "offpolicy-test", sft_policy, "algo.iterations=5", *common)
    result = rl.run(more)
    rows = logged_metrics(spec.run_dir())
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[4]["resumed_from"] == 4 and rows[4]["version"] == 5 and "resumed_from" not in rows[3]
    assert rows[4]["kl_ref"] > 0 and rows[4]["stale_rollouts"] == 0  # resumed weights, synced to the actors
    assert rows[4]["logprob_gap_mean"] < 1e-4
    assert result.metrics["iterations"] == 5

    # Once more: the run has ended, so it hands back its export without training.
    again = rl.run(more)
    assert len(logged_metrics(spec.run_dir())) == 5 and again.metrics["iterations"] == 5
    assert (again.export_dir / "config.json").is_file()


@pytest.mark.slow
def test_a_killed_learner_worker_restarts_the_group_from_the_last_checkpoint(ray_session, runs_dir, sft_policy,
                                                                            tmp_path):
    from raystages.stages import rl

    spec = _spec("grpo.yaml", runs_dir, "learner-kill-test", sft_policy, "algo.iterations=5",
                 "run.checkpoint_every=2", "run.max_failures=1", "scaling.num_workers=2",
                 "scaling.cpus_per_worker=0.5", "algo.group_size=4", "rollout.eval_prompts=8",
                 "optim.warmup_steps=0")
    marker, run_dir = tmp_path / "killed-learner", spec.run_dir()

    def kill_rank1(ctx, iteration):
        """Before iteration 4's rollouts (after the checkpoint at 2), once: SIGKILL rank 1."""
        import time

        if iteration != 3 or marker.exists():
            return
        deadline = time.time() + 120
        # Ray registers a reported checkpoint a moment after the ranks report it.
        while not (run_dir / "checkpoint_manager_snapshot.json").exists() and time.time() < deadline:
            time.sleep(0.2)
        marker.write_text(str(ctx.learner.pids[1]))
        os.kill(ctx.learner.pids[1], signal.SIGKILL)

    result = rl.run(spec, hooks={"before_submit": kill_rank1})
    assert marker.exists()
    rows = logged_metrics(run_dir)
    # Iteration 3 ran, rank 1 died before 4; the new group resumed from the checkpoint at 2
    # and ran 3 again.
    assert [r["iteration"] for r in rows] == [1, 2, 3, 3, 4, 5], [r["iteration"] for r in rows]
    assert rows[3]["resumed_from"] == 2 and rows[3]["version"] == 3
    # The restored weights were synced to the (surviving) rollout actor before its rollouts.
    assert rows[3]["stale_rollouts"] == 0 and rows[3]["logprob_gap_mean"] < 1e-4 and rows[3]["kl_ref"] > 0
    assert max(r["logprob_gap_mean"] for r in rows) < 1e-4
    assert result.metrics["iterations"] == 5 and result.metrics["aborted"] is None
    assert (result.export_dir / "config.json").is_file() and (result.export_dir / "lineage.json").is_file()


def test_zero3_learner_shards_reference_and_reward_model_and_syncs_in_buckets(ray_session, runs_dir, sft_policy,
                                                                               tmp_path):
    """ZeRO-3 on two learner ranks: the frozen reference policy and a same-tokenizer reward
    model are partitioned like the policy (each rank holds about half of each), every rank
    scores its own rows with them, and the weight sync ships the policy in many small buckets
    — after which the engine's log-probs still match the learner's."""
    from raystages.stages import rl

    spec = _spec("grpo.yaml", runs_dir, "zero3-test", sft_policy, "rollout.engine=hf", "deepspeed.zero_stage=3",
                 "scaling.num_workers=2", "scaling.cpus_per_worker=0.5", "algo.iterations=2",
                 "algo.prompts_per_iteration=8", "algo.group_size=4", "algo.mini_batch_size=16",
                 "optim.micro_batch_size=8", "rollout.eval_prompts=8", "rollout.sync_bucket_mb=0.1",
                 "reward.normalize_model=false",
                 f"reward.sources=[{{kind: oracle}}, {{kind: model, ref: {sft_policy}, weight: 0.1}}]")
    held = tmp_path / "held.json"

    def record_shards(ctx, iteration):
        if iteration == 1:
            models = {"policy": ctx.learner.policy.module, "ref": ctx.learner.ref.module,
                      "rm": ctx.learner.rm.model}
            held.write_text(json.dumps({
                name: [sum(p.ds_tensor.numel() for p in m.parameters()), sum(p.ds_numel for p in m.parameters())]
                for name, m in models.items()} | {"buckets": len(ctx.learner.weight_buckets())}))

    result = rl.run(spec, hooks={"before_submit": record_shards})
    shards = json.loads(held.read_text())
    for name in ("policy", "ref", "rm"):
        local, full = shards[name]
        assert full > 0 and local <= 0.55 * full, (name, local, full)  # half, plus padding
    policy_bytes = 4 * shards["policy"][1]
    assert shards["buckets"] >= policy_bytes / (0.1 * 2**20) - 1 and shards["buckets"] > 3
    rows = logged_metrics(result.run_dir)
    assert [r["iteration"] for r in rows] == [1, 2]
    # Iteration 1 is on the reference weights: the sharded reference gives the policy's log-probs.
    assert rows[0]["kl_ref"] < 1e-6 and rows[1]["kl_ref"] > 0
    assert max(r["logprob_gap_mean"] for r in rows) < 1e-4  # every bucket arrived
    assert all(r["sync_bytes"] == policy_bytes for r in rows)
    assert all(abs(r["reward_model"]) < 1e3 and r["reward_model"] == r["reward_model"] for r in rows)
    assert (result.export_dir / "config.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("job", ["grpo.yaml", "rl.yaml"])
def test_lora_syncs_merged_weights_and_exports_a_merged_policy(job, ray_session, runs_dir, sft_policy, tmp_path):
    """LoRA on the policy (and PPO's critic): no second model for the reference (the policy
    with its adapters off), only the adapters train, the vLLM actor receives merged weights
    after every update (its log-probs still match the learner's), and the export is a plain
    checkpoint in which only the adapted projections moved."""
    from safetensors.torch import load_file

    from raystages.stages import rl

    spec = _spec(job, runs_dir, f"lora-test-{job[:-5]}", sft_policy, "lora.enabled=true", "optim.lr=3e-3",
                 "algo.iterations=4", "algo.prompts_per_iteration=8", "algo.group_size=4", "algo.mini_batch_size=16",
                 "optim.micro_batch_size=8", "rollout.eval_prompts=8", "run.checkpoint_every=1000")
    held = tmp_path / "held.json"

    def record(ctx, iteration):
        if iteration == 1:
            trained = {name: [sum(p.numel() for p in e.module.parameters() if p.requires_grad),
                              sum(p.numel() for p in e.module.parameters())]
                       for name, e in (("policy", ctx.learner.policy), ("critic", ctx.learner.critic)) if e}
            held.write_text(json.dumps({"ref_model": ctx.learner.ref is not None, "trained": trained}))

    result = rl.run(spec, hooks={"before_submit": record})
    seen = json.loads(held.read_text())
    assert not seen["ref_model"] and list(seen["trained"]) == (["policy", "critic"] if spec.algo.name == "ppo"
                                                               else ["policy"])
    assert all(0 < trainable < 0.1 * total for trainable, total in seen["trained"].values()), seen
    rows = logged_metrics(result.run_dir)
    # Iteration 1 is on the parent's weights (LoRA's B starts at 0), then the policy moves.
    assert rows[0]["kl_ref"] < 1e-6 and rows[-1]["kl_ref"] > 0
    assert max(r["logprob_gap_mean"] for r in rows) < 1e-4  # the merged weights are the learner's
    parent, export = load_file(sft_policy / "model.safetensors"), load_file(result.export_dir / "model.safetensors")
    assert set(export) == set(parent) and all(r["sync_bytes"] == sum(4 * t.numel() for t in parent.values())
                                              for r in rows)
    moved = {name for name in parent if not torch.equal(parent[name], export[name])}
    assert moved and all(n.split(".")[-2] in spec.lora.target_modules for n in moved), moved


def _raw(**sections) -> dict:
    raw = {"stage": "rl", "model": {"path": "runs/sft/model"}}
    raw.update(sections)
    return raw


@pytest.mark.parametrize("sections, message", [
    ({"algo": {"name": "grpo", "group_size": 1}}, "group_size must be >= 2"),
    ({"algo": {"name": "rloo", "group_size": 1}}, "group_size must be >= 2"),
    ({"reward": {"sources": []}}, "reward.sources is empty"),
    ({"reward": {"sources": [{"kind": "callable", "ref": "justaname"}]}}, "is not 'module:function'"),
    ({"reward": {"sources": [{"kind": "model"}]}}, "needs `ref`"),
    ({"algo": {"name": "ppo", "prompts_per_iteration": 10, "group_size": 1, "mini_batch_size": 4}}, "must divide the batch"),
    ({"algo": {"mini_batch_size": 16}, "optim": {"micro_batch_size": 16}}, "multiple of"),
    ({"algo": {"name": "ppo"}, "critic": {"init": "reward_model"}}, "needs a reward source of kind 'model'"),
    ({"algo": {"clip_eps": 1.5}}, "algo.clip_eps"),
    ({"algo": {"bogus": 1}}, "algo.bogus"),
    ({"lora": {"enabled": True}, "deepspeed": {"zero_stage": 3}}, "lora.enabled with deepspeed.zero_stage 3"),
])
def test_bad_spec_combinations_fail_at_parse_time(sections, message):
    from raystages.spec import parse_spec

    with pytest.raises(SpecError, match=message):
        parse_spec(_raw(**sections))


def test_preflight_loads_reward_code_where_the_job_runs(random_checkpoint):
    from raystages.preflight import preflight
    from raystages.spec import parse_spec

    spec = parse_spec({"stage": "rl", "model": {"path": str(random_checkpoint)},
                       "reward": {"sources": [{"kind": "callable", "ref": "no_such_module:f"}]}})
    with pytest.raises(SpecError, match="cannot load"):  # parsing alone imports nothing
        preflight(spec)


def test_reward_model_with_another_tokenizer_needs_retokenize(tmp_path, random_checkpoint):
    from raystages.models import build_causal_lm, export_hf, train_tokenizer
    from raystages.preflight import preflight
    from raystages.spec import ModelSpec, parse_spec

    other_tok = train_tokenizer(["completely different text " * 50, "another corpus entirely"], 300, tmp_path / "tok")
    rm_dir = tmp_path / "rm"
    export_hf(build_causal_lm(ModelSpec(preset="nano"), other_tok, seed=0), other_tok, rm_dir)
    sources = {"sources": [{"kind": "model", "ref": str(rm_dir)}]}
    raw = {"stage": "rl", "model": {"path": str(random_checkpoint)}, "reward": sources}
    with pytest.raises(SpecError, match="different tokenizer.*retokenize"):
        preflight(parse_spec(raw))
    preflight(parse_spec({**raw, "reward": {**sources, "retokenize": True}}))
    # The same tokenizer needs no re-tokenisation.
    preflight(parse_spec({**raw, "reward": {"sources": [{"kind": "model", "ref": str(random_checkpoint)}]}}))


def test_bench_rl_spec_parses_with_its_options(tmp_path, random_checkpoint):
    """CI never runs ``raystages bench rl``; its PPO spec must still track the rl spec."""
    from raystages.bench.rl import _options, ppo_spec

    o = _options(["batch=32", "off_policy=true", "num_workers=1"])
    spec = ppo_spec(random_checkpoint, random_checkpoint, tmp_path, o)
    a = spec.algo
    assert (a.name, a.prompts_per_iteration, a.mini_batch_size, a.one_step_off_policy) == ("ppo", 32, 32, True)
    assert spec.critic.init == "reward_model" and spec.scaling.num_workers == 1
    assert ppo_spec(random_checkpoint, random_checkpoint, tmp_path, o | {"zero_stage": 0}).deepspeed.zero_stage == 0
    with pytest.raises(ValueError, match="unknown option 'bogus'"):
        _options(["bogus=1"])


def test_cli_exits_2_before_ray_for_a_bad_rl_spec(tmp_path, capsys):
    from raystages import cli

    assert cli.main(["rl", str(ROOT / "jobs" / "grpo.yaml"), "algo.group_size=1"]) == 2
    assert "group_size" in capsys.readouterr().err
    assert cli.main(["rl", str(ROOT / "jobs" / "grpo.yaml"), f"model.path={tmp_path / 'missing'}"]) == 2
    assert "model.path" in capsys.readouterr().err


def test_reward_stats_reads_the_rm_stage_keys_and_old_files():
    from raystages.rl.rewards import reward_stats

    assert reward_stats({"reward_mean": 1.5, "reward_std": 2.0, "pairs": 10}) == (1.5, 2.0)
    assert reward_stats({"mean": -1.0, "std": 0.0}) == (-1.0, 1e-6)


def test_rl_fails_fast_when_learners_and_actors_cannot_all_be_placed(ray_session, random_checkpoint):
    from raystages.spec import parse_spec
    from raystages.resources import check_cluster

    raw = {"stage": "rl", "model": {"path": str(random_checkpoint)}}
    check_cluster(parse_spec({**raw, "scaling": {"num_workers": 2, "cpus_per_worker": 0.5}}))
    too_many = parse_spec({**raw, "scaling": {"num_workers": 4, "cpus_per_worker": 1}})  # 4 + 1 actor > 4 CPUs
    with pytest.raises(SpecError, match=r"rl needs 5 CPU at once .* has 4: lower those"):
        check_cluster(too_many)
