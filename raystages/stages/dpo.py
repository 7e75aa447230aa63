"""Stage "dpo" — preference optimisation without RL: the SFT policy learns from pairs directly.

    raystages dpo jobs/dpo.yaml [model.path=runs/sft/model dpo.loss=simpo dpo.simpo_gamma=0.5 ...]

Reads the reward model's preference rows (``{"prompt","chosen","rejected"}``, implicit
prompts, Anthropic HH text, message lists; the built-in task's oracle-ranked pairs by
default) and scores each side by the summed log-probability of its response tokens (the
last assistant turn). ``dpo.loss`` picks DPO (``sigmoid``, conservative with
``label_smoothing``), IPO, or the reference-free SimPO and ORPO
(``raystages/stages/dpo_losses.py``). The reference policy is the frozen parent, loaded
once per worker by the shared runner (sharded under ZeRO-3); the reference-free losses load
none. Logged per step and on held-out pairs: the implicit rewards of both sides, their
margin, reward accuracy (chosen above rejected) and log-probs. On the built-in task the
driver also answers held-out prompts greedily with the parent and the export.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from raystages import atomic

from raystages.train.stage import Stage


def pair_logps(model, batch: dict) -> tuple:
    """Summed response log-probs ``(B,)`` of the chosen and the rejected sides of ``B``
    padded pairs, and their response token counts ``(B,)``: one forward for both sides."""
    import torch

    from raystages.stages.dpo_losses import sequence_logps

    n = batch["chosen_ids"].shape[0]
    width = int(torch.maximum(batch["chosen_len"], batch["rejected_len"]).max())
    ids = torch.cat([batch["chosen_ids"][:, :width], batch["rejected_ids"][:, :width]])
    labels = torch.cat([batch["chosen_labels"][:, :width], batch["rejected_labels"][:, :width]])
    lengths = torch.cat([batch["chosen_len"], batch["rejected_len"]])
    mask = (torch.arange(width, device=ids.device)[None, :] < lengths[:, None]).long()
    total, count = sequence_logps(model(input_ids=ids, attention_mask=mask, use_cache=False).logits, labels)
    return total[:n], total[n:], count[:n], count[n:]


class DpoStage(Stage):
    name = "dpo"
    throughput_unit = "pair"

    def __init__(self, section):
        self.cfg = section  # the spec's `dpo:` section
        self._last: dict = {}

    def build_model(self, spec, tokenizer):
        from raystages.stages.sft import build_policy

        return build_policy(spec, tokenizer, self.cfg.lora)

    def build_frozen(self, spec, tokenizer):
        from raystages.models import build_causal_lm

        if not self.cfg.needs_reference or self.cfg.precompute_ref:
            return {}
        return {"ref": build_causal_lm(spec.model, tokenizer, spec.run.seed)}

    def pair_terms(self, model, batch) -> tuple:
        """``(per-pair loss (B,), metrics)``; the metrics are means over the pairs.

        Implicit rewards: ``β·(log π - log π_ref)`` summed over the response for DPO and IPO
        (Rafailov et al. 2023, §5); ``β·`` mean log-prob for SimPO; mean log-prob for ORPO.
        """
        import torch

        from raystages.stages import dpo_losses as L

        c = self.cfg
        pc, pr, nc, nr = pair_logps(model, batch)
        mc, mr = pc / nc.clamp(min=1), pr / nr.clamp(min=1)
        if c.needs_reference:
            if c.precompute_ref:
                rc, rr = batch["ref_chosen_logp"], batch["ref_rejected_logp"]
            else:
                with torch.no_grad():
                    rc, rr, _, _ = pair_logps(self.frozen["ref"], batch)
            if c.loss == "sigmoid":
                loss = L.dpo_sigmoid_loss(pc, pr, rc, rr, c.beta, c.label_smoothing)
            else:  # IPO on per-token means, as TRL does: a summed gap would scale with length
                loss = L.ipo_loss(mc, mr, rc / nc.clamp(min=1), rr / nr.clamp(min=1), c.beta)
            if c.rpo_alpha:  # the chosen answer's NLL per token (RPO)
                loss = loss - c.rpo_alpha * mc
            reward_c, reward_r = c.beta * (pc - rc).detach(), c.beta * (pr - rr).detach()
        elif c.loss == "simpo":
            loss = L.simpo_loss(mc, mr, c.beta, c.simpo_gamma)
            reward_c, reward_r = c.beta * mc.detach(), c.beta * mr.detach()
        else:
            loss = L.orpo_loss(mc, mr, c.orpo_lambda)
            reward_c, reward_r = mc.detach(), mr.detach()
        metrics = {"reward_chosen": reward_c.mean(), "reward_rejected": reward_r.mean(),
                   "reward_margin": (reward_c - reward_r).mean(),
                   "reward_accuracy": (reward_c > reward_r).float().mean(),
                   "logp_chosen": pc.detach().mean(), "logp_rejected": pr.detach().mean()}
        return loss, metrics

    def loss(self, model, batch):
        loss, self._last = self.pair_terms(model, batch)
        return loss.mean(), int(loss.shape[0])

    def train_metrics(self):
        return self._last

    def extra_eval(self, model, batches):
        """Held-out means of the per-step metrics (equal-size micro-batches: a plain mean)."""
        sums: dict = {}
        for batch in batches:
            for key, value in self.pair_terms(model, batch)[1].items():
                sums[key] = sums.get(key, 0.0) + float(value)
        return {k: v / max(1, len(batches)) for k, v in sums.items()}


def reference_logps(spec, tokenizer_dir: str, arrays: dict, batch_size: int = 64) -> dict:
    """``ref_chosen_logp``/``ref_rejected_logp`` ``(N,)`` of padded pairs ``arrays`` under
    the frozen parent, loaded as the workers load it (run as a Ray task with a worker's
    resources)."""
    import math

    import numpy as np
    import torch

    from raystages.models import build_causal_lm, load_tokenizer

    torch.set_num_threads(max(1, math.ceil(spec.scaling.cpus_per_worker)))
    device = "cuda" if spec.scaling.use_gpu and torch.cuda.is_available() else "cpu"
    tok = load_tokenizer(tokenizer_dir, spec.model.trust_remote_code)
    model = build_causal_lm(spec.model, tok, spec.run.seed).to(device).eval()
    rc, rr = [], []
    with torch.no_grad():
        for i in range(0, len(arrays["margin"]), batch_size):
            batch = {k: torch.from_numpy(v[i:i + batch_size]).to(device) for k, v in arrays.items()}
            c, r, _, _ = pair_logps(model, batch)
            rc.append(c.cpu())
            rr.append(r.cpu())
    return {"ref_chosen_logp": torch.cat(rc).numpy().astype(np.float32),
            "ref_rejected_logp": torch.cat(rr).numpy().astype(np.float32)}


def with_reference_logps(spec, tokenizer_dir: str, arrays: dict, split: str) -> dict:
    """``arrays`` plus the reference's log-probs of each pair, computed once and cached in
    ``run_dir/ref_logps/<split>.npz`` under a hash of the parent and the tokens, so a rerun
    (resume) reads them back instead of scoring again."""
    import hashlib

    import numpy as np
    import ray

    h = hashlib.sha256(json.dumps(spec.model.model_dump(mode="json"), sort_keys=True).encode())
    lineage = Path(spec.model.path, "lineage.json")  # a parent retrained in place is new
    h.update(lineage.read_bytes() if lineage.is_file() else b"")
    for key in sorted(arrays):
        h.update(key.encode() + np.ascontiguousarray(arrays[key]).tobytes())
    cache = spec.run_dir() / "ref_logps" / f"{split}.npz"
    if cache.is_file():
        with np.load(cache) as saved:
            if str(saved["digest"]) == h.hexdigest():
                return arrays | {k: saved[k] for k in ("ref_chosen_logp", "ref_rejected_logp")}
    s = spec.scaling
    task = ray.remote(num_cpus=s.cpus_per_worker, num_gpus=s.gpus_per_worker if s.use_gpu else 0)(reference_logps)
    ref = ray.get(task.remote(spec, tokenizer_dir, arrays))
    # A crash mid-write leaves no cache a resume would read.
    atomic.write_file(lambda f: np.savez(f, digest=h.hexdigest(), **ref), cache)
    return arrays | ref


def run(spec) -> "StageResult":
    from raystages.data.chat import skip_reasons
    from raystages.data.preference import dpo_converter, pad_pairs
    from raystages.stages.rm import preference_split
    from raystages.stages.sft import ray_dataset, task_accuracy, task_eval_prompts
    from raystages.train.runner import EXPORT_DIR, connect_ray, finish_stage, run_training

    started = time.time()
    parent, tokenizer_dir, tok, train, val, skipped = preference_split(
        spec, lambda tok: dpo_converter(spec.dpo.fields, tok, spec.optim.seq_len))
    builtin = spec.data.source == "builtin" and spec.dpo.eval_prompts > 0
    if builtin:
        prompts = task_eval_prompts(spec.data, spec.dpo.eval_prompts)
        acc_before, _ = task_accuracy(parent, tokenizer_dir, prompts, spec.dpo.max_new_tokens)

    connect_ray()
    arrays = {"train": pad_pairs(train, tok.pad_token_id), "val": pad_pairs(val, tok.pad_token_id)}
    if spec.dpo.precompute_ref:
        arrays = {split: with_reference_logps(spec, tokenizer_dir, a, split) for split, a in arrays.items()}
    datasets = {"train": ray_dataset(arrays["train"], spec.run.seed), "val": ray_dataset(arrays["val"], None)}
    metrics = run_training(spec, DpoStage(spec.dpo), datasets, tokenizer_dir)
    export = spec.run_dir() / EXPORT_DIR
    metrics.update(loss_type=spec.dpo.loss, train_pairs=len(train), val_pairs=len(val),
                   skipped_rows=len(skipped), skipped_by_reason=skip_reasons(skipped))
    samples = []
    if builtin:
        acc_after, samples = task_accuracy(str(export), tokenizer_dir, prompts, spec.dpo.max_new_tokens)
        metrics.update(accuracy_before=acc_before, accuracy_after=acc_after, eval_prompts=len(prompts))
    metrics["wall_s"] = round(time.time() - started, 1)
    return finish_stage(spec, export, metrics, parent, skipped, samples[: spec.run.samples])
