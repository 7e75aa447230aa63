"""Stage 1 — pretraining: a causal LM (or, with ``objective: mlm``, a BERT-style encoder;
see :mod:`raystages.stages.mlm`) learns from unlabelled text.

    raystages pretrain jobs/pretrain.yaml [optim.max_steps=500 scaling.num_workers=2 ...]

Text (the built-in corpus, local .txt/.jsonl/.parquet, or a hub dataset) is tokenised and
packed into ``optim.seq_len`` blocks with Ray Data, each Ray Train worker reads its shard,
and DeepSpeed ZeRO trains the model. The run ends with a Hugging Face export in
``run_dir/model`` that SFT, vLLM and the server load as is.
"""

from __future__ import annotations

import json
import time

from raystages.data.sources import read_rows, text_of
from raystages.train.stage import Stage


class PretrainStage(Stage):
    name = "pretrain"

    def build_model(self, spec, tokenizer):
        from raystages.models import build_causal_lm

        return build_causal_lm(spec.model, tokenizer, spec.run.seed)

    def loss(self, model, batch):
        ids = batch["input_ids"]
        return model(input_ids=ids, labels=ids).loss, ids.numel()


def load_texts(spec) -> tuple[list[str], list[str], list[str]]:
    """(train texts, held-out texts, skipped-row notes), read before Ray starts."""
    d = spec.data
    if d.source == "builtin":
        from raystages.task.splits import pretrain_texts

        b = d.builtin
        lengths = {"min_len": b.min_len, "max_len": b.max_len}
        return (pretrain_texts("train", b.num_train, b.seed, noise=b.noise, **lengths),
                pretrain_texts("val", b.num_val, b.seed, noise=b.noise, **lengths), [])
    convert = text_of(d.text_field)
    train = read_rows(d.source, convert, d.on_bad_row, d.max_rows, d.hub_split)
    skipped = list(train.skipped)
    if d.val_source:
        val = read_rows(d.val_source, convert, d.on_bad_row, d.max_rows, d.hub_split)
        return train.rows, val.rows, skipped + val.skipped
    n_val = max(1, int(len(train.rows) * d.val_fraction))
    if len(train.rows) < 2:
        # One long document (a single .txt paragraph): hold out its tail by characters.
        text = train.rows[0]
        cut = int(len(text) * (1 - d.val_fraction))
        return [text[:cut]], [text[cut:]], skipped
    return train.rows[:-n_val], train.rows[-n_val:], skipped


def run(spec) -> "StageResult":
    from raystages.data.packing import packed_dataset
    from raystages.data.tokenizer import prepare_tokenizer
    from raystages.preflight import preflight
    from raystages.train.console import mark
    from raystages.train.runner import (EXPORT_DIR, StageResult, connect_ray, run_training,
                                        save_run_spec, write_lineage)

    started = time.time()
    preflight(spec)
    train_texts, val_texts, skipped = load_texts(spec)
    mark("data")
    save_run_spec(spec)
    tokenizer_dir = prepare_tokenizer(spec, train_texts)
    mark("tokenizer")
    stage = PretrainStage()
    if spec.objective == "mlm":
        from raystages.models import load_tokenizer
        from raystages.stages.masking import masker_for
        from raystages.stages.mlm import MlmStage

        stage = MlmStage(masker_for(load_tokenizer(tokenizer_dir), spec.mlm), spec.run.seed)
    connect_ray()
    train_ds = packed_dataset(train_texts, tokenizer_dir, spec.optim.seq_len, seed=spec.run.seed,
                              objective=spec.objective)
    val_ds = packed_dataset(val_texts, tokenizer_dir, spec.optim.seq_len, seed=None, objective=spec.objective)
    need = spec.scaling.num_workers * spec.optim.micro_batch_size
    for name, ds in (("data.source", train_ds), ("held-out data", val_ds)):
        if ds.count() < spec.scaling.num_workers:
            raise ValueError(f"{name}: only {ds.count()} blocks of {spec.optim.seq_len} tokens; "
                             f"need at least {spec.scaling.num_workers} (ideally {need}): add data or lower optim.seq_len")
    baseline = {}
    if spec.objective == "mlm":
        from raystages.stages.mlm import masked_val_dataset

        val_ds, majority = masked_val_dataset(val_ds, stage.masker, spec.run.seed)
        baseline = {"val_masked_majority_baseline": majority}
    metrics = run_training(spec, stage, {"train": train_ds, "val": val_ds}, tokenizer_dir)
    metrics.update(baseline)
    metrics["skipped_rows"] = len(skipped)
    metrics["wall_s"] = round(time.time() - started, 1)
    export = spec.run_dir() / EXPORT_DIR
    write_lineage(spec, export, metrics, parent=spec.model.path)
    samples = sample_texts(export, spec, val_texts)
    summary = {"stage": "pretrain", "export": str(export), "metrics": metrics,
               "skipped": skipped[:20], "samples": samples}
    (spec.run_dir() / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return StageResult("pretrain", spec.run_dir(), export, metrics | {"samples": samples})


def sample_texts(export_dir, spec, val_texts: list[str]) -> list[dict]:
    """Greedy continuations from the exported model, loaded as a user would load it
    (none for a masked LM: it does not continue text)."""
    if spec.run.samples == 0 or spec.objective == "mlm":
        return []
    from raystages.models import load_tokenizer
    from raystages.generate import greedy_complete

    if spec.data.source == "builtin":
        from raystages.task import reward

        prompts = [line.split(" = ")[0] for line in val_texts[0].split("\n")][: spec.run.samples]
        outs = greedy_complete(str(export_dir), [p + " =" for p in prompts], max_new_tokens=16)
        out = []
        for p, o in zip(prompts, outs):
            answer = o.split("\n")[0].strip()
            out.append({"prompt": p + " =", "completion": answer, "oracle_reward": reward(p, answer)})
        return out
    tok = load_tokenizer(str(export_dir))
    prompts = [tok.decode(tok(t)["input_ids"][:8]) for t in val_texts[: spec.run.samples]]
    return [{"prompt": p, "completion": o} for p, o in
            zip(prompts, greedy_complete(str(export_dir), prompts, max_new_tokens=32))]
