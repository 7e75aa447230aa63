"""Stage 3 — reward model: a checkpoint with a scalar head learns which answer is better.

    raystages rm jobs/rm.yaml [model.path=runs/sft/model rm.center_coef=0.01 ...]

Preference pairs (``{"prompt","chosen","rejected"}``, the implicit-prompt form of Anthropic
HH, an optional ``margin``; the built-in task's oracle-ranked pairs by default) are scored
by ``AutoModelForSequenceClassification`` (``num_labels=1``, reading the last non-pad
token) and trained with the Bradley-Terry loss ``-log σ(r_c - r_r - margin)`` on Ray Train
+ DeepSpeed. The driver then scores every held-out pair with the export, loaded as a user
would load it, and writes pairwise accuracy and the reward distribution to
``reward_stats.json`` in the export, where RL reads it to normalise rewards.
"""

from __future__ import annotations

import json
import time

from raystages import atomic
from raystages.stages.losses import pairwise_accuracy, pairwise_loss
from raystages.train.stage import Stage

REWARD_STATS = "reward_stats.json"


class RewardStage(Stage):
    name = "rm"
    throughput_unit = "pair"

    def __init__(self, center_coef: float = 0.0):
        self.center_coef = center_coef

    def build_model(self, spec, tokenizer):
        from raystages.models import with_lora

        model = load_reward_model(spec.model.path, tokenizer, spec.model.trust_remote_code,
                                  spec.model.config_overrides)
        return with_lora(model, spec.rm.lora, "SEQ_CLS")

    def rewards(self, model, batch):
        """Scalar rewards ``(B,)`` of the chosen and of the rejected sides of ``B`` pairs."""
        import torch

        n = batch["chosen_ids"].shape[0]
        width = int(torch.maximum(batch["chosen_len"], batch["rejected_len"]).max())
        ids = torch.cat([batch["chosen_ids"][:, :width], batch["rejected_ids"][:, :width]])
        lengths = torch.cat([batch["chosen_len"], batch["rejected_len"]])
        mask = (torch.arange(width, device=ids.device)[None, :] < lengths[:, None]).long()
        # One forward for both sides; the head reads each row's last non-pad token.
        r = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.squeeze(-1).float()
        return r[:n], r[n:]

    def loss(self, model, batch):
        r_c, r_r = self.rewards(model, batch)
        return pairwise_loss(r_c, r_r, batch["margin"], self.center_coef), int(r_c.shape[0])

    def extra_eval(self, model, batches):
        import torch

        rc, rr = zip(*(self.rewards(model, b) for b in batches)) if batches else ((), ())
        if not rc:
            return {"pair_accuracy": 0.0}
        return {"pair_accuracy": pairwise_accuracy(torch.cat(rc), torch.cat(rr)).item()}


def load_reward_model(path: str, tokenizer, trust_remote_code: bool = False, overrides: dict | None = None):
    """A sequence classifier with one output from any causal-LM (or reward) checkpoint.

    ``pad_token_id`` goes into the config: without it the head cannot find the last real
    token of a padded row (transformers refuses batches > 1).
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, use_safetensors=True, dtype=torch.float32,
        trust_remote_code=trust_remote_code, **(overrides or {}))
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def score_pairs(export_dir: str, arrays: dict, batch_size: int = 64) -> dict:
    """Held-out statistics of an exported reward model over padded pairs ``arrays``."""
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(export_dir, use_safetensors=True).eval()
    stage, rc, rr = RewardStage(), [], []
    with torch.no_grad():
        for i in range(0, len(arrays["margin"]), batch_size):
            batch = {k: torch.from_numpy(v[i:i + batch_size]) for k, v in arrays.items()}
            c, r = stage.rewards(model, batch)
            rc.append(c)
            rr.append(r)
    rc, rr = torch.cat(rc), torch.cat(rr)
    both = torch.cat([rc, rr])
    return {"pairs": len(rc), "pair_accuracy": pairwise_accuracy(rc, rr).item(),
            "reward_mean": both.mean().item(), "reward_std": both.std().item(),
            "chosen_mean": rc.mean().item(), "rejected_mean": rr.mean().item(),
            "margin_mean": (rc - rr).mean().item()}


def preference_split(spec, make_converter) -> tuple:
    """What the preference stages (rm, dpo) start from: ``(parent, tokenizer_dir, tokenizer,
    train, val, skipped)``: the parent checked, the run spec saved, the rows converted with
    ``make_converter(tokenizer)`` (the built-in task's oracle-ranked pairs by default) and
    their number checked against the workers' micro-batches."""
    from raystages.data.chat import load_split
    from raystages.data.tokenizer import prepare_tokenizer
    from raystages.models import load_tokenizer
    from raystages.stages.sft import check_parent, check_sizes
    from raystages.task.splits import preference_rows
    from raystages.train.runner import save_run_spec

    parent = check_parent(spec)
    save_run_spec(spec)
    tokenizer_dir = prepare_tokenizer(spec, [])
    tok = load_tokenizer(tokenizer_dir)
    train, val, skipped = load_split(spec.data, make_converter(tok), preference_rows)
    check_sizes(spec, len(train), len(val), "pairs")
    return parent, tokenizer_dir, tok, train, val, skipped


def run(spec) -> "StageResult":
    from raystages.data.chat import skip_reasons
    from raystages.data.preference import pad_pairs, rm_converter
    from raystages.stages.sft import ray_dataset
    from raystages.train.runner import EXPORT_DIR, connect_ray, finish_stage, run_training

    started = time.time()
    parent, tokenizer_dir, tok, train, val, skipped = preference_split(
        spec, lambda tok: rm_converter(spec.rm.fields, tok, spec.optim.seq_len))
    val_arrays = pad_pairs(val, tok.pad_token_id)

    connect_ray()
    datasets = {"train": ray_dataset(pad_pairs(train, tok.pad_token_id), spec.run.seed),
                "val": ray_dataset(val_arrays, None)}
    metrics = run_training(spec, RewardStage(spec.rm.center_coef), datasets, tokenizer_dir)
    export = spec.run_dir() / EXPORT_DIR
    stats = score_pairs(str(export), val_arrays)
    atomic.write_text(export / REWARD_STATS, json.dumps(stats, indent=2))
    metrics.update(stats, train_pairs=len(train), val_pairs=len(val), skipped_rows=len(skipped),
                   train_tokens=sum(len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in train),
                   skipped_by_reason=skip_reasons(skipped), wall_s=round(time.time() - started, 1))
    return finish_stage(spec, export, metrics, parent, skipped)
