"""Stage 2 — supervised fine-tuning: a checkpoint learns to answer, loss on its answers only.

    raystages sft jobs/sft.yaml [model.path=runs/pretrain/model optim.max_steps=300 ...]

Rows (conversations, prompt/completion or instruction rows; the built-in task's chat split
by default) are rendered with the tokenizer's chat template and labelled so that only
assistant tokens, each turn's ``<|end|>`` included, carry loss. Examples are padded one
per row, or packed several per block (``sft.packing``) without attention between them.
Ray Train + DeepSpeed fine-tune all weights or LoRA adapters (``sft.lora``, merged into
the export by ``Stage.export``). On the built-in task the driver then answers held-out
prompts greedily with both the parent checkpoint and the export and reports exact-match
accuracy of each.
``sft.task: classification | token_classification`` trains a new head instead: see
:mod:`raystages.stages.task_heads`.
"""

from __future__ import annotations

import time

from raystages.stages.losses import IGNORE, masked_token_ce
from raystages.train.stage import Stage


class SftStage(Stage):
    name = "sft"
    throughput_unit = "sup-tok"  # supervised (answer) tokens

    def build_model(self, spec, tokenizer):
        return build_policy(spec, tokenizer, spec.sft.lora)

    def count(self, batch):
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def loss(self, model, batch, normalizer=None):
        """Mean cross-entropy per supervised token; ``normalizer`` (from the runner) makes
        it exact over the whole optimizer step instead of this micro-batch."""
        kwargs = {}
        if "attention_mask" in batch:
            # Padded rows: drop the columns that are padding in every row of the batch.
            width = int(batch["attention_mask"].sum(1).max())
            batch = {k: v[:, :width] for k, v in batch.items()}
            kwargs["attention_mask"] = batch["attention_mask"]
        else:
            kwargs["position_ids"] = batch["position_ids"]  # packed: restarts mark examples
        logits = model(input_ids=batch["input_ids"], use_cache=False, **kwargs).logits
        return masked_token_ce(logits, batch["labels"], normalizer), self.count(batch)


def build_policy(spec, tokenizer, lora):
    """The causal LM of ``spec.model``, with LoRA adapters when ``lora.enabled``."""
    from raystages.models import build_causal_lm, with_lora

    return with_lora(build_causal_lm(spec.model, tokenizer, spec.run.seed), lora, "CAUSAL_LM")


def check_parent(spec) -> str:
    """``model.path`` as given, after the preflight (SpecError before anything starts)."""
    from raystages.preflight import preflight

    preflight(spec)
    return spec.model.path


def ray_dataset(arrays: dict, seed: int | None):
    """A materialised Ray Dataset of the rows of ``arrays`` (shuffled with ``seed``)."""
    import numpy as np
    import ray.data

    n = len(next(iter(arrays.values())))
    order = np.random.default_rng(seed).permutation(n) if seed is not None else np.arange(n)
    return ray.data.from_items([{k: v[i] for k, v in arrays.items()} for i in order]).materialize()


def check_sizes(spec, n_train: int, n_val: int, what: str) -> None:
    from raystages.data.sources import DataError

    need = spec.scaling.num_workers * spec.optim.micro_batch_size
    if n_train < need:
        raise DataError(f"data.source: {n_train} training {what}; each of {spec.scaling.num_workers} workers "
                        f"needs a micro-batch of {spec.optim.micro_batch_size}: add data or lower optim.micro_batch_size")
    if n_val < spec.scaling.num_workers:
        raise DataError(f"held-out data: {n_val} {what}, fewer than scaling.num_workers; add data or raise data.val_fraction")


def task_eval_prompts(data, n: int) -> list[str]:
    """The built-in task's first ``n`` held-out chat prompts (the same for SFT and DPO, so a
    child's ``accuracy_before`` is its parent's ``accuracy_after``)."""
    from raystages.task.splits import sft_rows

    b = data.builtin
    return [r["messages"][0]["content"] for r in sft_rows("val", n, b.seed, min_len=b.min_len, max_len=b.max_len)]


def task_accuracy(checkpoint: str, tokenizer_dir: str, prompts: list[str], max_new_tokens: int):
    """(exact-match accuracy against the oracle, per-prompt samples) on the built-in task."""
    from raystages.generate import greedy_complete
    from raystages.task import is_correct, reward

    answers = greedy_complete(checkpoint, prompts, max_new_tokens, chat=True, tokenizer_dir=tokenizer_dir,
                              batch_size=64)
    samples = [{"prompt": p, "completion": a.strip(), "oracle_reward": reward(p, a)}
               for p, a in zip(prompts, answers)]
    return sum(is_correct(p, a) for p, a in zip(prompts, answers)) / len(prompts), samples


def run(spec) -> "StageResult":
    if spec.sft.task != "chat":  # a new output layer instead of the LM head
        from raystages.stages import task_heads

        return task_heads.run(spec)
    from raystages.data.chat import load_split, pack_examples, pad_examples, sft_converter, skip_reasons
    from raystages.data.tokenizer import prepare_tokenizer
    from raystages.models import load_tokenizer
    from raystages.task.splits import sft_rows
    from raystages.train.runner import EXPORT_DIR, connect_ray, finish_stage, run_training, save_run_spec

    started = time.time()
    parent = check_parent(spec)
    save_run_spec(spec)
    tokenizer_dir = prepare_tokenizer(spec, [])
    tok = load_tokenizer(tokenizer_dir)
    convert = sft_converter(spec.sft.fields, tok, spec.optim.seq_len, spec.sft.truncate)
    train_rows, val_rows, skipped = load_split(spec.data, convert, sft_rows)
    train = [e for row in train_rows for e in row]
    val = [e for row in val_rows for e in row]
    check_sizes(spec, len(train), len(val), "examples")
    if spec.sft.packing:
        train_arrays = pack_examples(train, spec.optim.seq_len, tok.pad_token_id)
        check_sizes(spec, len(train_arrays["input_ids"]), len(val), "packed blocks")
    else:
        train_arrays = pad_examples(train, tok.pad_token_id)
    builtin = spec.data.source == "builtin" and spec.sft.eval_prompts > 0
    if builtin:
        prompts = task_eval_prompts(spec.data, spec.sft.eval_prompts)
        acc_before, _ = task_accuracy(parent, tokenizer_dir, prompts, spec.sft.max_new_tokens)

    connect_ray()
    datasets = {"train": ray_dataset(train_arrays, spec.run.seed),
                "val": ray_dataset(pad_examples(val, tok.pad_token_id), None)}
    metrics = run_training(spec, SftStage(), datasets, tokenizer_dir)
    export = spec.run_dir() / EXPORT_DIR
    metrics.update(train_examples=len(train), val_examples=len(val), skipped_rows=len(skipped),
                   skipped_by_reason=skip_reasons(skipped),
                   train_tokens=sum(len(e["input_ids"]) for e in train),
                   train_supervised_tokens=sum(sum(t != IGNORE for t in e["labels"][1:]) for e in train))
    samples = []
    if builtin:
        acc_after, samples = task_accuracy(str(export), tokenizer_dir, prompts, spec.sft.max_new_tokens)
        metrics.update(accuracy_before=acc_before, accuracy_after=acc_after, eval_prompts=len(prompts))
    metrics["wall_s"] = round(time.time() - started, 1)
    return finish_stage(spec, export, metrics, parent, skipped, samples[: spec.run.samples])
