"""SFT and the reward model for real: Ray Train, 2 workers, DeepSpeed ZeRO-2, chained from
the session's pretrained checkpoint (pretrain -> SFT -> RM), plus their bad-input paths."""

from __future__ import annotations

import json

import pytest

from raystages.spec import load_spec
from tests.conftest import ROOT, TASK


@pytest.fixture(scope="module")
def rm_result(sft_result, runs_dir):
    from raystages.stages import rm

    spec = load_spec(ROOT / "jobs" / "rm.yaml", [
        f"run.storage_path={runs_dir}", "run.name=test-rm", f"model.path={sft_result.export_dir}",
        *TASK, "logging.log_every=200", "run.eval_every=1000", "run.checkpoint_every=2000"])
    return rm.run(spec)


@pytest.mark.slow
def test_sft_raises_task_accuracy_well_above_the_parent(sft_result, pretrained_checkpoint):
    from transformers import AutoModelForCausalLM

    m = sft_result.metrics
    # Exact match on 100 held-out prompts: guessing 3-4 letters out of 16 right in order is
    # ~0, and a loss on the wrong tokens (prompt, padding) leaves the parent's 0 in chat form.
    print(f"SFT exact-match accuracy {m['accuracy_before']:.2f} -> {m['accuracy_after']:.2f}")
    assert m["accuracy_after"] >= m["accuracy_before"] + 0.15, m
    assert m["eval_prompts"] == 100 and m["skipped_rows"] == 0
    assert m["val_loss"] < 1.0, m  # nats per answer token; a letter guess is ln 16 = 2.8
    lineage = json.loads((sft_result.export_dir / "lineage.json").read_text())
    assert lineage["stage"] == "sft" and lineage["parent"] == str(pretrained_checkpoint.resolve())
    assert lineage["parent_lineage"] == str((pretrained_checkpoint / "lineage.json").resolve())
    summary = json.loads((sft_result.run_dir / "summary.json").read_text())
    assert summary["metrics"]["accuracy_after"] == m["accuracy_after"]
    model = AutoModelForCausalLM.from_pretrained(sft_result.export_dir, use_safetensors=True)
    assert model.config.num_hidden_layers == 4


@pytest.mark.slow
def test_reward_model_agrees_with_the_oracle_on_held_out_pairs(rm_result, sft_result):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from raystages.task.splits import preference_rows

    m = rm_result.metrics
    # Chance is 0.5. With 4000 pairs over 3 epochs this ~0.9M-parameter RM overfit at ~0.83
    # (0.89 on right-vs-wrong pairs, 0.65 where both are wrong and the closer one wins). One
    # epoch over 32000 pairs (1000 steps) sat on the bar: 0.895-0.910 on 200 pairs,
    # so CI failed on noise. jobs/rm.yaml now trains 2000 steps over 64000 pairs: 0.952 on
    # 1000 held-out pairs, whose standard error at 0.9 is 0.0095, so the bar of 0.90 (the
    # issue's: agreement with the oracle on >= 90% of pairs) is five of them below.
    print(f"RM held-out pair accuracy {m['pair_accuracy']:.3f}")
    assert m["pair_accuracy"] >= 0.90, m
    assert m["val_pairs"] == 1000 and m["skipped_rows"] == 0
    stats = json.loads((rm_result.export_dir / "reward_stats.json").read_text())
    assert stats["pair_accuracy"] == m["pair_accuracy"] and stats["reward_std"] > 0
    assert stats["chosen_mean"] > stats["rejected_mean"]
    lineage = json.loads((rm_result.export_dir / "lineage.json").read_text())
    assert lineage["stage"] == "rm" and lineage["parent"] == str(sft_result.export_dir.resolve())
    # The export is a plain transformers reward model: scoring the same 1000 held-out pairs
    # through it reproduces the stage's accuracy (a sample of 20 was too noisy to bound).
    model = AutoModelForSequenceClassification.from_pretrained(rm_result.export_dir).eval()
    tok = AutoTokenizer.from_pretrained(rm_result.export_dir)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id
    rows = preference_rows("val", 1000, min_len=3, max_len=4)
    rewards = {}
    for k in ("chosen", "rejected"):
        texts = [tok.apply_chat_template([{"role": "user", "content": row["prompt"]},
                                          {"role": "assistant", "content": row[k]}], tokenize=False)
                 for row in rows]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            rewards[k] = model(**enc).logits[:, 0]
    by_hand = (rewards["chosen"] > rewards["rejected"]).float().mean().item()
    assert abs(by_hand - m["pair_accuracy"]) <= 1 / 1000, (by_hand, m["pair_accuracy"])


@pytest.mark.slow
def test_reward_model_with_lora_adapters_learns_and_exports_merged(sft_result, runs_dir):
    """rm.lora: adapters on the body's attention, the new score head trained whole; the
    export is a plain reward model whose MLP is the parent's, bit for bit."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from raystages.stages import rm

    spec = load_spec(ROOT / "jobs" / "rm.yaml", [
        f"run.storage_path={runs_dir}", "run.name=test-rm-lora", f"model.path={sft_result.export_dir}",
        *TASK, "data.builtin.num_train=6400", "data.builtin.num_val=1000", "rm.lora.enabled=true",
        "optim.lr=3e-3", "optim.max_steps=200", "logging.log_every=50", "run.eval_every=1000",
        "run.checkpoint_every=1000"])
    result = rm.run(spec)
    m = result.metrics
    print(f"LoRA RM held-out pair accuracy {m['pair_accuracy']:.3f}")
    # 1000 held-out pairs: chance is 0.5 with a standard error of 0.016.
    assert m["pair_accuracy"] >= 0.65, m
    assert not (result.export_dir / "adapter_config.json").exists()
    merged = AutoModelForSequenceClassification.from_pretrained(result.export_dir, use_safetensors=True)
    assert not any("lora" in n or "modules_to_save" in n for n, _ in merged.named_parameters())
    parent = AutoModelForCausalLM.from_pretrained(sft_result.export_dir, use_safetensors=True)
    layer, base = merged.model.layers[0], parent.model.layers[0]
    assert (layer.self_attn.q_proj.weight - base.self_attn.q_proj.weight).abs().max() > 1e-4
    assert (layer.mlp.up_proj.weight == base.mlp.up_proj.weight).all()


def test_lora_packing_and_skipped_rows_from_a_file(ray_session, runs_dir, random_checkpoint, tmp_path):
    """LoRA adapters merged into a plain export, packed blocks, bad rows skipped and counted."""
    from transformers import AutoModelForCausalLM

    from raystages.stages import sft
    from raystages.task.splits import sft_rows

    rows = [json.dumps(r) for r in sft_rows("train", 120, min_len=3, max_len=4)]
    rows[5] = json.dumps({"prompt": "sort: a b"})  # no completion
    rows[9] = json.dumps({"messages": [{"role": "user", "content": "hi"}]})  # no assistant turn
    rows[11] = json.dumps({"prompt": "reverse: " + " ".join("abcdefghijklmnop" * 6), "completion": "x"})
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(rows) + "\n")
    spec = load_spec(ROOT / "jobs" / "sft.yaml", [
        f"run.storage_path={runs_dir}", "run.name=test-sft-lora", f"model.path={random_checkpoint}",
        f"data.source={data}", "data.on_bad_row=skip", "data.val_fraction=0.1",
        "sft.packing=true", "sft.lora.enabled=true", "sft.lora.r=4", "optim.seq_len=64",
        "optim.micro_batch_size=4", "optim.max_steps=60", "optim.lr=1e-2", "run.eval_every=60",
        "run.checkpoint_every=1000", "logging.log_every=10"])
    result = sft.run(spec)
    m = result.metrics
    assert m["skipped_rows"] == 3 and m["train_examples"] + m["val_examples"] == 117
    assert set(m["skipped_by_reason"]) == {"missing field 'completion'", "conversation has no assistant turn", "too long"}
    assert "accuracy_after" not in m  # a file source: no oracle
    logged = [json.loads(l) for l in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    # Adapters on attention only, over a random base model: the loss moves, slowly. The
    # training windows (10 steps each) carry the effect (5.29 -> 4.95 on this machine); the
    # ~12 held-out examples move less (5.20), and by how much varies between CPUs (the old
    # "val < first - 0.1" passed by 0.014 on one machine and missed by 0.011 on another).
    assert logged[-1]["loss"] < logged[0]["loss"] - 0.1, logged
    assert logged[-1]["val_loss"] < logged[0]["loss"], logged
    files = {p.name for p in result.export_dir.iterdir()}
    assert "adapter_config.json" not in files and "model.safetensors" in files
    merged = AutoModelForCausalLM.from_pretrained(result.export_dir, use_safetensors=True)
    base = AutoModelForCausalLM.from_pretrained(random_checkpoint, use_safetensors=True)
    q_merged = merged.model.layers[0].self_attn.q_proj.weight
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert (q_merged - base.model.layers[0].self_attn.q_proj.weight).abs().max() > 1e-4
    # Only adapted modules changed: the MLP is frozen under LoRA.
    assert (merged.model.layers[0].mlp.up_proj.weight == base.model.layers[0].mlp.up_proj.weight).all()


def test_bad_rows_in_strict_mode_exit_2_naming_file_and_row(tmp_path, capsys, random_checkpoint):
    from raystages.cli import main

    data = tmp_path / "prefs.jsonl"
    data.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n"
                    + json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}) + "\n")
    code = main(["rm", str(ROOT / "jobs" / "rm.yaml"), f"model.path={random_checkpoint}",
                 f"data.source={data}", f"run.storage_path={tmp_path}"])
    assert code == 2
    assert f"{data}:line 2: chosen and rejected are identical" in capsys.readouterr().err


def test_a_missing_parent_checkpoint_exits_2_before_ray_starts(tmp_path, capsys):
    import ray

    from raystages.cli import main

    was_up = ray.is_initialized()
    code = main(["sft", str(ROOT / "jobs" / "sft.yaml"), f"model.path={tmp_path}/nope/model",
                 f"run.storage_path={tmp_path}"])
    assert code == 2 and "does not exist" in capsys.readouterr().err
    assert ray.is_initialized() == was_up
    code = main(["sft", "model.path=", f"run.storage_path={tmp_path}"])
    assert code == 2 and "model.path" in capsys.readouterr().err
