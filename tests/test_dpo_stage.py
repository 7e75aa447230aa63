"""The DPO stage: its pairs, its spec's bad values, and real Ray Train runs from the session's
SFT checkpoint (pretrain -> SFT -> DPO) measured against the built-in task's oracle."""

from __future__ import annotations

import json

import pytest

from raystages import cli
from raystages.spec import load_spec
from tests.conftest import ROOT, TASK, shared_data
from tests.run_helpers import logged_metrics, run_killing_a_worker

BAD_DPO_SPECS = [
    (["dpo.beta=0"], "dpo.beta"),
    (["dpo.beta=-0.1"], "dpo.beta"),
    (["dpo.loss=kto"], "dpo.loss"),
    (["dpo.loss=simpo"], "dpo.simpo_gamma"),
    (["dpo.simpo_gamma=0.5"], "dpo.simpo_gamma"),
    (["dpo.label_smoothing=0.5"], "dpo.label_smoothing"),
    (["dpo.loss=ipo", "dpo.label_smoothing=0.1"], "dpo.label_smoothing"),
    (["dpo.orpo_lambda=0", "dpo.loss=orpo"], "dpo.orpo_lambda"),
    (["dpo.typo=1"], "dpo.typo"),
    (["model.path="], "model.path"),  # no parent: no policy and no reference
    (["model.path=/nope/sft/model"], "does not exist"),
]


@pytest.mark.parametrize("overrides,needle", BAD_DPO_SPECS)
def test_bad_dpo_specs_exit_2_naming_the_field(overrides, needle, capsys, no_ray, tmp_path):
    code = cli.main(["dpo", str(ROOT / "jobs" / "dpo.yaml"), f"run.storage_path={tmp_path}", *overrides])
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err, err


def test_pairs_label_only_the_response_and_share_the_rm_bad_row_rules(builtin_tokenizer_dir):
    from raystages.data.preference import dpo_converter, pad_pairs
    from raystages.data.sources import DataError
    from raystages.models import load_tokenizer
    from raystages.spec import PreferenceFieldsSpec
    from raystages.stages.losses import IGNORE

    tok = load_tokenizer(str(builtin_tokenizer_dir))
    convert = dpo_converter(PreferenceFieldsSpec(), tok, 64)

    def response(pair, side):
        return tok.decode([t for t in pair[f"{side}_labels"] if t != IGNORE])

    pair = convert({"prompt": "sort: l p c", "chosen": "c l p", "rejected": "c m p"})
    assert response(pair, "chosen") == " c l p<|end|>" and response(pair, "rejected") == " c m p<|end|>"
    # HH text: only the last assistant turn is the response, earlier turns are prompt.
    turns = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: "
    pair = convert({"chosen": turns + "see you", "rejected": turns + "whatever"})
    assert response(pair, "chosen") == " see you<|end|>" and response(pair, "rejected") == " whatever<|end|>"
    # Other raw text: the response is what follows the two sides' shared tokens.
    pair = convert({"chosen": "q: 1 + 1 = 2", "rejected": "q: 1 + 1 = 3"})
    assert response(pair, "chosen") == "2" and response(pair, "rejected") == "3"
    arrays = pad_pairs([pair, convert({"prompt": "p", "chosen": "a b c d", "rejected": "b"})], tok.pad_token_id)
    assert arrays["chosen_labels"].shape == arrays["chosen_ids"].shape
    assert (arrays["rejected_labels"][0, arrays["rejected_len"][0]:] == IGNORE).all()
    for row, why in [({"prompt": "p", "chosen": "a", "rejected": "a"}, "identical"),
                     ({"prompt": "p", "chosen": "a"}, "missing field 'rejected'"),
                     ({"chosen": "same text", "rejected": "same text and more"}, "no token after the shared prompt"),
                     ({"prompt": "p", "chosen": "a " * 80, "rejected": "b"}, "too long")]:
        with pytest.raises(DataError, match=why):
            convert(row)


@pytest.fixture(scope="module")
def dpo_result(sft_result, runs_dir):
    from raystages.stages import dpo

    spec = load_spec(ROOT / "jobs" / "dpo.yaml", [
        f"run.storage_path={runs_dir}", "run.name=test-dpo", f"model.path={sft_result.export_dir}",
        *TASK, "logging.log_every=20", "run.eval_every=100", "run.checkpoint_every=1000"])
    return dpo.run(spec)


@pytest.mark.slow
def test_dpo_raises_task_accuracy_over_the_sft_parent(dpo_result, sft_result):
    m = dpo_result.metrics
    print(f"DPO exact-match accuracy {m['accuracy_before']:.2f} -> {m['accuracy_after']:.2f}, "
          f"held-out reward accuracy {m['val_reward_accuracy']:.3f}, margin {m['val_reward_margin']:.2f}")
    # The parent is judged on SFT's own held-out prompts: its score here is SFT's.
    assert m["accuracy_before"] == sft_result.metrics["accuracy_after"]
    # jobs/dpo.yaml (beta 0.5, rpo_alpha 1.0) measured 0.58 -> 0.68 from this fixture.
    assert m["accuracy_after"] >= m["accuracy_before"] + 0.05, m
    # The chosen answer's NLL (rpo_alpha) alone could lift accuracy; the DPO term is what
    # ranks held-out pairs: 0.84 measured, while a flipped sign (or labels on the wrong
    # tokens) ranks them below chance (0.5).
    assert m["val_reward_accuracy"] >= 0.75 and m["val_reward_margin"] > 0, m
    assert m["val_pairs"] == 200 and m["skipped_rows"] == 0 and m["loss_type"] == "sigmoid"
    logged = [json.loads(line) for line in (dpo_result.run_dir / "metrics.jsonl").read_text().splitlines()]
    first = logged[0]
    assert {"reward_accuracy", "reward_chosen", "reward_rejected", "reward_margin", "logp_chosen"} <= set(first)
    assert logged[-1]["loss"] < first["loss"]
    lineage = json.loads((dpo_result.export_dir / "lineage.json").read_text())
    assert lineage["stage"] == "dpo" and lineage["parent"] == str(sft_result.export_dir.resolve())
    assert lineage["parent_lineage"] == str((sft_result.export_dir / "lineage.json").resolve())
    summary = json.loads((dpo_result.run_dir / "summary.json").read_text())
    assert summary["metrics"]["accuracy_after"] == m["accuracy_after"]


def _pairs(tokenizer_dir, n=8):
    import torch

    from raystages.data.preference import dpo_converter, pad_pairs
    from raystages.models import load_tokenizer
    from raystages.spec import PreferenceFieldsSpec
    from raystages.task.splits import preference_rows

    tok = load_tokenizer(str(tokenizer_dir))
    convert = dpo_converter(PreferenceFieldsSpec(), tok, 64)
    arrays = pad_pairs([convert(r) for r in preference_rows("train", n, min_len=3, max_len=4)], tok.pad_token_id)
    return arrays, lambda a: {k: torch.tensor(v) for k, v in a.items()}


def test_precomputed_reference_log_probs_give_the_frozen_reference_loss(ray_session, random_checkpoint, tmp_path,
                                                                         monkeypatch):
    """``dpo.precompute_ref``: the reference scored once by a Ray task (cached in the run dir
    and read back on a rerun) gives the loss and rewards of the reference held per worker; a
    crash while the cache is written leaves none."""
    import torch

    from raystages.models import build_causal_lm, load_tokenizer
    from raystages.stages.dpo import DpoStage, with_reference_logps

    spec = load_spec(ROOT / "jobs" / "dpo.yaml", [f"model.path={random_checkpoint}", f"run.storage_path={tmp_path}",
                                                  "dpo.precompute_ref=true", "scaling.cpus_per_worker=0.5"])
    arrays, as_torch = _pairs(random_checkpoint)
    tok = load_tokenizer(str(random_checkpoint))
    policy = build_causal_lm(spec.model, tok, 0)
    with torch.no_grad():  # move the policy away from the reference
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    held = DpoStage(spec.dpo.model_copy(update={"precompute_ref": False}))
    held.frozen = {"ref": build_causal_lm(spec.model, tok, 0).eval()}
    want_loss, want = held.pair_terms(policy, as_torch(arrays))

    cached = with_reference_logps(spec, str(random_checkpoint), arrays, "train")
    cache = spec.run_dir() / "ref_logps" / "train.npz"
    stamp = cache.stat().st_mtime_ns
    assert with_reference_logps(spec, str(random_checkpoint), arrays, "train").keys() == cached.keys()
    assert cache.stat().st_mtime_ns == stamp  # read back, not scored again
    got_loss, got = DpoStage(spec.dpo).pair_terms(policy, as_torch(cached))
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    assert got["reward_margin"].item() == pytest.approx(want["reward_margin"].item(), rel=1e-4, abs=1e-6)

    # Killed half-way through writing a cache: nothing is left that a resume would read.
    from contextlib import nullcontext
    from pathlib import Path

    import numpy as np

    def dies_mid_write(file, **arrays):  # np.savez's signature: a path or an open file
        with open(file, "wb") if isinstance(file, (str, Path)) else nullcontext(file) as f:
            f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        with_reference_logps(spec, str(random_checkpoint), arrays, "val")
    assert sorted(p.name for p in cache.parent.iterdir()) == ["train.npz"]


def _held_out_terms(spec, model_dir, n_val: int) -> tuple[float, float]:
    """Mean loss and reward accuracy of the model in ``model_dir`` on the stage's ``n_val``
    held-out built-in pairs (the ones its own evaluation scores)."""
    import torch
    from transformers import AutoModelForCausalLM

    from raystages.data.preference import dpo_converter, pad_pairs
    from raystages.models import load_tokenizer
    from raystages.stages.dpo import DpoStage
    from raystages.task.splits import preference_rows

    tok = load_tokenizer(str(model_dir))
    convert = dpo_converter(spec.dpo.fields, tok, spec.optim.seq_len)
    rows = preference_rows("val", n_val, min_len=spec.data.builtin.min_len, max_len=spec.data.builtin.max_len)
    batch = {k: torch.tensor(v) for k, v in pad_pairs([convert(r) for r in rows], tok.pad_token_id).items()}
    model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True).eval()
    with torch.no_grad():
        loss, metrics = DpoStage(spec.dpo).pair_terms(model, batch)
    return loss.mean().item(), metrics["reward_accuracy"].item()


@pytest.mark.slow
@pytest.mark.parametrize("loss,extra", [
    # Reference-free, LoRA adapters merged into the export.
    ("simpo", ["dpo.beta=2.0", "dpo.simpo_gamma=0.5", "dpo.lora.enabled=true", "dpo.lora.r=4"]),
])
def test_other_losses_run_end_to_end(loss, extra, sft_result, runs_dir):
    from transformers import AutoModelForCausalLM

    from raystages.stages import dpo

    spec = load_spec(ROOT / "jobs" / "dpo.yaml", [
        f"run.storage_path={runs_dir}", f"run.name=test-dpo-{loss}", f"model.path={sft_result.export_dir}",
        *TASK, f"dpo.loss={loss}", "dpo.rpo_alpha=0", "optim.lr=1e-3", *extra, "dpo.eval_prompts=0", "data.builtin.num_train=640",
        "data.builtin.num_val=256", "optim.max_steps=20", "optim.warmup_steps=0", "logging.log_every=5",
        "run.eval_every=20", "run.eval_batches=2", "run.checkpoint_every=1000", "scaling.cpus_per_worker=0.5"])
    result = dpo.run(spec)
    m = result.metrics
    assert m["loss_type"] == loss and "accuracy_after" not in m
    # The effect is judged on the same 256 held-out pairs before (the SFT parent) and after
    # (the export), not on the logged training loss: over 20 steps of 32 pairs that loss
    # moves more with each step's batch than with training (0.26, 0.32, 0.74, 0.26 at both
    # lr 1e-3 and 3e-4). Measured from the suite's SFT model: loss 0.416 -> 0.392, accuracy
    # 0.879 -> 0.895 (3e-3: 0.388, 0.902). An export that kept the parent's weights (adapters
    # not merged) scores exactly the parent's loss; a sign error raises it.
    loss_before, acc_before = _held_out_terms(spec, sft_result.export_dir, 256)
    loss_after, acc_after = _held_out_terms(spec, result.export_dir, 256)
    print(f"{loss} held-out loss {loss_before:.4f} -> {loss_after:.4f}, reward accuracy {acc_before:.3f} -> {acc_after:.3f}")
    assert loss_after < loss_before and acc_after >= acc_before, (loss_before, loss_after, acc_before, acc_after)
    model = AutoModelForCausalLM.from_pretrained(result.export_dir, use_safetensors=True)
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert json.loads((result.export_dir / "lineage.json").read_text())["stage"] == "dpo"


@pytest.mark.slow
def test_a_killed_worker_restarts_from_the_checkpoint_and_a_rerun_returns_the_export(ray_session, random_checkpoint,
                                                                                     runs_dir):
    """Fault tolerance on the shared engine, with the frozen reference sharded by ZeRO-3 beside
    the policy: a worker killed past a checkpoint restarts the group from that checkpoint (the
    reference is rebuilt with it), and rerunning the finished run hands back its export
    without training again."""
    import math

    from raystages.stages import dpo

    spec = load_spec(ROOT / "jobs" / "dpo.yaml", [
        f"run.storage_path={runs_dir}", "run.name=dpo-worker-kill", f"model.path={random_checkpoint}", *TASK,
        "dpo.rpo_alpha=0", "dpo.eval_prompts=0", "deepspeed.zero_stage=3", "data.builtin.num_train=640",
        "data.builtin.num_val=64", "optim.max_steps=60", "optim.micro_batch_size=8", "run.checkpoint_every=20",
        "run.max_failures=2", "logging.log_every=5", "run.eval_every=1000", "scaling.cpus_per_worker=0.5"])
    result = run_killing_a_worker(dpo.run, spec, 20)
    rows = logged_metrics(spec.run_dir())
    steps = [r["step"] for r in rows]
    # Some steps ran twice after the restart, which began at a checkpoint, not at step 0.
    assert result.metrics["step"] == 60 and len(steps) > len(set(steps)) and steps.count(5) == 1, steps
    assert 20 <= result.metrics["start_step"] < 60, result.metrics
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["reward_margin"]) for r in rows), rows
    again = dpo.run(spec)
    assert again.metrics["step"] == 60 and again.export_dir == result.export_dir
    assert logged_metrics(spec.run_dir()) == rows  # nothing trained again


@pytest.mark.parametrize("overrides", [["dpo.loss=sigmoid", "dpo.rpo_alpha=0"], ["dpo.loss=ipo", "dpo.rpo_alpha=0"],
                                       ["dpo.loss=simpo", "dpo.simpo_gamma=0.5", "dpo.rpo_alpha=0"],
                                       ["dpo.loss=orpo", "dpo.rpo_alpha=0"], ["dpo.loss=sigmoid"]])
def test_every_loss_through_the_stage_on_a_real_model(overrides, random_checkpoint):
    """The stage's wiring of each loss on a real model and real pairs: at the reference
    (policy = reference) DPO is log 2 and IPO (1/2β)²; every loss is finite and trains."""
    import math

    import torch

    from raystages.models import build_causal_lm, load_tokenizer
    from raystages.stages.dpo import DpoStage

    spec = load_spec(ROOT / "jobs" / "dpo.yaml", [f"model.path={random_checkpoint}", *overrides])
    arrays, as_torch = _pairs(random_checkpoint)
    tok = load_tokenizer(str(random_checkpoint))
    stage = DpoStage(spec.dpo)
    frozen = stage.build_frozen(spec, tok)
    assert set(frozen) == ({"ref"} if spec.dpo.loss in ("sigmoid", "ipo") else set())
    stage.frozen = {k: m.eval() for k, m in frozen.items()}
    policy = build_causal_lm(spec.model, tok, 0)
    loss, n = stage.loss(policy, as_torch(arrays))
    at_reference = {"sigmoid": math.log(2), "ipo": (1 / (2 * spec.dpo.beta)) ** 2}.get(spec.dpo.loss)
    if at_reference is not None and not spec.dpo.rpo_alpha:
        assert loss.item() == pytest.approx(at_reference, rel=1e-5)
        assert stage.train_metrics()["reward_margin"].item() == pytest.approx(0.0, abs=1e-5)
    assert n == 8 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in policy.parameters() if p.requires_grad)
    assert set(stage.train_metrics()) == {"reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy",
                                          "logp_chosen", "logp_rejected"}


def test_bench_dpo_spec_parses_with_its_options(tmp_path, random_checkpoint):
    """CI never runs ``raystages bench dpo``; its spec must still track the dpo spec."""
    from raystages.bench.dpo import DEFAULTS, dpo_spec

    spec = dpo_spec(str(random_checkpoint), tmp_path / "pairs.jsonl", tmp_path, DEFAULTS)
    # One optimizer step is the bench's batch of pairs, as TRL's micro-batch x accumulation is.
    per_step = spec.optim.micro_batch_size * spec.scaling.num_workers * spec.optim.grad_accum
    assert per_step == DEFAULTS["batch"] and spec.dpo.loss == "sigmoid" and not spec.dpo.precompute_ref


@pytest.mark.slow
def test_dpo_smoke_on_real_hh_rlhf_pairs(ray_session, tmp_path):
    """Anthropic's HH harmless pairs (HH text, multi-turn) from a small fresh checkpoint: a
    nano Llama with a BPE trained on the pairs' text (both sides alike, no labels). The
    held-out loss falls below log 2 and held-out reward accuracy rises above chance."""
    import gzip
    import math

    from raystages.models import build_causal_lm, export_hf, train_tokenizer
    from raystages.spec import ModelSpec, parse_spec
    from raystages.stages import dpo

    source = shared_data("hh_rlhf", "harmless-base-test.jsonl.gz")
    rows = [json.loads(line) for line in gzip.open(source, "rt") if line.strip()]
    tok = train_tokenizer([r[side] for r in rows for side in ("chosen", "rejected")], 2000, tmp_path / "tok")
    export_hf(build_causal_lm(ModelSpec(preset="nano"), tok, seed=0), tok, tmp_path / "model")
    spec = parse_spec({
        "stage": "dpo", "model": {"path": str(tmp_path / "model")},
        "data": {"source": str(source), "on_bad_row": "skip", "val_fraction": 0.15},
        "dpo": {"loss": "sigmoid", "beta": 0.1, "eval_prompts": 0},
        "optim": {"lr": 1e-3, "schedule": "constant", "warmup_steps": 10, "max_steps": 100, "micro_batch_size": 8,
                  "seq_len": 256},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5}, "logging": {"tensorboard": False, "log_every": 25},
        "run": {"name": "hh", "storage_path": str(tmp_path / "runs"), "checkpoint_every": 1000, "eval_every": 50,
                "eval_batches": 100}})
    m = dpo.run(spec).metrics
    print(f"HH DPO held-out loss {m['val_loss']:.3f}, reward accuracy {m['val_reward_accuracy']:.3f} "
          f"on {m['val_pairs']} pairs ({m['skipped_rows']} too long for 256 tokens, skipped)")
    # 238 held-out pairs (725 of the 2,312 rows exceed 256 tokens and are skipped): chance is
    # 0.5 with a standard error of 0.032, and a flipped sign ranks them below it. Measured at
    # these seeds: loss 0.650, accuracy 0.630 after 100 steps (0.645 and 0.630 after 150).
    assert m["val_pairs"] >= 200 and m["val_reward_accuracy"] >= 0.57, m
    assert m["val_loss"] < math.log(2) - 0.02, m
