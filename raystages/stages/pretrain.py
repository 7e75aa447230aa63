"""Stage 1 — pretraining: a causal LM (or, with ``objective: mlm``, a BERT-style encoder;
see :mod:`raystages.stages.mlm`) learns from unlabelled text.

    raystages pretrain jobs/pretrain.yaml [optim.max_steps=500 scaling.num_workers=2 ...]

Text (the built-in corpus, local .txt/.jsonl/.parquet, or a hub dataset) is tokenised and
packed into ``optim.seq_len`` blocks once, by Ray Data tasks where the files are, into the
token cache (:mod:`raystages.data.token_cache`; ``raystages prepare`` fills it alone);
each Ray Train worker streams its share of the cached blocks (:mod:`raystages.data.order`),
and DeepSpeed ZeRO trains the model. The run ends with a Hugging Face export in
``run_dir/model`` that SFT, vLLM and the server load as is.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from itertools import islice

from raystages.data.sources import (DataError, _file_rows, check_source, iter_source, source_files,
                                    text_of)
from raystages.train.stage import Stage


class PretrainStage(Stage):
    name = "pretrain"

    def build_model(self, spec, tokenizer):
        from raystages.models import build_causal_lm

        return build_causal_lm(spec.model, tokenizer, spec.run.seed)

    def loss(self, model, batch):
        ids = batch["input_ids"]
        return model(input_ids=ids, labels=ids).loss, ids.numel()


def sample_docs(spec, source: str | None = None) -> Iterator[str]:
    """The source's usable documents in order, read lazily (the tokenizer takes the first
    ``tokenizer.train_docs``; the samples their first words). Bad rows are passed over
    here: the cache fill reports or counts them."""
    d = spec.data
    if d.source == "builtin":
        from raystages.task.splits import pretrain_texts

        b = d.builtin
        split, n = ("val", 1) if source == "val" else ("train", min(b.num_train, spec.tokenizer.train_docs))
        yield from pretrain_texts(split, n, b.seed, noise=b.noise, min_len=b.min_len, max_len=b.max_len)
        return
    convert = text_of(d.text_field)
    for where, row in iter_source(d.val_source if source == "val" and d.val_source else d.source, d.hub_split):
        try:
            if not isinstance(row, DataError):
                yield convert(row)
        except DataError:
            continue


HEAD_ROWS = 5


def preflight(spec, produced) -> list[str]:
    """The first rows of every file, read before Ray starts, so a wrong format or text
    field exits 2 at once rather than after the cache fill started: with
    ``on_bad_row=error`` any bad one among them is a problem, with ``skip`` only a file
    whose first rows are all bad."""
    d = spec.data
    out = []
    convert = text_of(d.text_field)
    for field in ("source", "val_source"):
        value = getattr(d, field)
        files = source_files(value) if value and value != "builtin" and not check_source(value) else None
        for f in files or []:
            bad, good = [], 0
            try:
                for where, row in islice(_file_rows(f), HEAD_ROWS):
                    try:
                        if isinstance(row, DataError):
                            raise row
                        convert(row)
                        good += 1
                    except DataError as e:
                        bad.append(f"{where}: {e}")
            except DataError as e:
                bad.append(str(e))
            if bad and (d.on_bad_row == "error" or not good):
                out.append(f"data.{field}: {bad[0]}")
    return out


def prepare(spec):
    """``(tokenizer dir, token cache)`` of a run: checks, the tokenizer (trained from a
    lazily read sample when needed), Ray, and the cache (filled now if missing).
    ``raystages prepare`` stops here; ``raystages pretrain`` goes on to train."""
    from raystages.data import token_cache
    from raystages.data.tokenizer import prepare_tokenizer
    from raystages.preflight import preflight
    from raystages.train.console import mark
    from raystages.train.runner import connect_ray, save_run_spec

    preflight(spec)
    save_run_spec(spec)
    tokenizer_dir = prepare_tokenizer(spec, sample_docs(spec))
    mark("tokenizer")
    connect_ray()
    cache = token_cache.ensure(spec, tokenizer_dir)
    mark("data")
    return tokenizer_dir, cache


def run(spec) -> "StageResult":
    from raystages.data.order import read_blocks, shard_order
    from raystages.train.runner import EXPORT_DIR, finish_stage, run_training

    started = time.time()
    tokenizer_dir, cache = prepare(spec)
    stage = PretrainStage()
    if spec.objective == "mlm":
        from raystages.models import load_tokenizer
        from raystages.stages.masking import masker_for
        from raystages.stages.mlm import MlmStage

        stage = MlmStage(masker_for(load_tokenizer(tokenizer_dir), spec.mlm), spec.run.seed)
    stage.shuffle_buffer = spec.data.shuffle_buffer
    need = spec.scaling.num_workers * spec.optim.micro_batch_size
    for name, split in (("data.source", "train"), ("held-out data", "val")):
        if cache.blocks[split] < spec.scaling.num_workers:
            raise DataError(f"{name}: only {cache.blocks[split]} blocks of {spec.optim.seq_len} tokens; "
                            f"need at least {spec.scaling.num_workers} (ideally {need}): add data or lower optim.seq_len")
    train_ds = read_blocks(shard_order(cache.files("train"), spec.run.seed))
    # Evaluation reads eval_batches micro-batches per rank: only those blocks are read.
    val_ds = read_blocks(cache.files("val")).limit(need * spec.run.eval_batches)
    baseline = {}
    if spec.objective == "mlm":
        from raystages.stages.mlm import masked_val_dataset

        val_ds, majority = masked_val_dataset(val_ds, stage.masker, spec.run.seed)
        baseline = {"val_masked_majority_baseline": majority}
    metrics = run_training(spec, stage, {"train": train_ds, "val": val_ds}, tokenizer_dir)
    metrics.update(baseline)
    metrics.update(token_cache="hit" if cache.hit else "miss", token_cache_blocks=cache.blocks["train"],
                   skipped_rows=cache.manifest["skipped"])
    metrics["wall_s"] = round(time.time() - started, 1)
    export = spec.run_dir() / EXPORT_DIR
    samples = sample_texts(export, spec, list(islice(sample_docs(spec, "val"), spec.run.samples)))
    return finish_stage(spec, export, metrics, spec.model.path, cache.manifest["skipped_notes"], samples,
                        extra={"skipped_by_reason": cache.manifest["skipped_by_reason"]})


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
