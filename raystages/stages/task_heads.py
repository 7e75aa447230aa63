"""Stage 2 with a task head: ``sft.task: classification | token_classification``.

    raystages sft jobs/sft-sentiment.yaml [model.path=runs/pretrain-mlm/model ...]
    raystages sft jobs/sft-ner.yaml

A new output layer on the pretrained body, as a Hugging Face ``Trainer`` user would build
it: ``AutoModelForSequenceClassification`` (one label per text; BERT reads [CLS], a causal
checkpoint its last non-pad token) or ``AutoModelForTokenClassification`` (a BIO tag per
word, learned on each word's first piece), from an encoder or a causal checkpoint, trained
with (optionally class-weighted) cross-entropy on Ray Train + DeepSpeed. Every evaluation
logs held-out accuracy and macro-F1, or entity-level precision/recall/F1 (exact spans); at
the end the driver scores the whole held-out split with the export, loaded as a user would
load it, and writes those figures to ``summary.json`` and the lineage. The export carries
``id2label``/``label2id``. The built-in data are the labelling tasks of
:mod:`raystages.task.labelling`, which have exact oracles.
"""

from __future__ import annotations

import time

from raystages.stages.label_losses import label_ce, label_hits
from raystages.stages.losses import IGNORE
from raystages.train.stage import Stage

CLASSIFICATION, TAGGING = "classification", "token_classification"


def head_model_class(task: str):
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    return AutoModelForSequenceClassification if task == CLASSIFICATION else AutoModelForTokenClassification


def load_head_model(model_spec, task: str, labels: list[str], tokenizer):
    """The checkpoint's body with a fresh ``len(labels)``-way head (any head it had is
    replaced). ``pad_token_id`` goes into the config: a causal body's sequence head finds
    each row's last real token by it."""
    import torch

    model = head_model_class(task).from_pretrained(
        model_spec.path, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)}, ignore_mismatched_sizes=True,
        use_safetensors=True, dtype=torch.float32, trust_remote_code=model_spec.trust_remote_code,
        **model_spec.config_overrides)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def head_logits(model, batch: dict):
    """``(logits, labels)`` of a padded batch, cut to its longest row."""
    width = int(batch["attention_mask"].sum(1).max())
    labels = batch["labels"][:, :width] if batch["labels"].dim() == 2 else batch["labels"]
    segments = {"token_type_ids": batch["token_type_ids"][:, :width]} if "token_type_ids" in batch else {}
    logits = model(input_ids=batch["input_ids"][:, :width],
                   attention_mask=batch["attention_mask"][:, :width], **segments).logits
    return logits, labels


def head_counts(task: str, logits, labels, names: list[str]):
    """Additive counts of one batch (summable over batches and ranks), float64:
    classification, the flattened confusion matrix; tagging, ``[entity true positives,
    predicted entities, gold entities, words right, words]``."""
    import torch

    from raystages.stages.task_metrics import confusion, entity_counts

    pred = logits.argmax(-1)
    if task == CLASSIFICATION:
        m = confusion(labels.tolist(), pred.tolist(), len(names))
        return torch.tensor(m, dtype=torch.float64).flatten()
    gold_tags, pred_tags = [], []
    for g_row, p_row in zip(labels.tolist(), pred.tolist()):
        keep = [(g, p) for g, p in zip(g_row, p_row) if g != IGNORE]
        gold_tags.append([names[g] for g, _ in keep])
        pred_tags.append([names[p] for _, p in keep])
    correct, words = label_hits(logits, labels)
    return torch.tensor([*entity_counts(gold_tags, pred_tags), correct.item(), words.item()],
                        dtype=torch.float64)


def zero_counts(task: str, names: list[str]):
    import torch

    return torch.zeros(len(names) ** 2 if task == CLASSIFICATION else 5, dtype=torch.float64)


def head_metrics(task: str, counts, names: list[str]) -> dict[str, float]:
    from raystages.stages.task_metrics import classification_metrics, precision_recall_f1

    if task == CLASSIFICATION:
        n = len(names)
        return classification_metrics(counts.reshape(n, n).tolist())
    tp, n_pred, n_gold, correct, words = counts.tolist()
    scores = precision_recall_f1(tp, n_pred, n_gold)
    return {f"entity_{k}": v for k, v in scores.items()} | {"word_accuracy": correct / max(words, 1)}


class HeadStage(Stage):
    name = "sft"
    throughput_unit = "example"

    def __init__(self, task: str, labels: list[str], weights: list[float] | None):
        self.task, self.labels, self.weights = task, labels, weights

    def build_model(self, spec, tokenizer):
        return load_head_model(spec.model, self.task, self.labels, tokenizer)

    def loss(self, model, batch):
        import torch

        logits, labels = head_logits(model, batch)
        weight = torch.tensor(self.weights) if self.weights is not None else None
        return label_ce(logits, labels, weight), int((labels != IGNORE).sum())

    def extra_eval(self, model, batches):
        """The held-out metrics over all ranks' batches (reduced here, so every rank returns
        the same exact figures)."""
        import torch.distributed as dist

        counts = zero_counts(self.task, self.labels)
        for batch in batches:
            counts += head_counts(self.task, *head_logits(model, batch), self.labels)
        dist.all_reduce(counts)
        return head_metrics(self.task, counts, self.labels)


def score_export(export_dir: str, arrays: dict, task: str, batch_size: int = 64) -> dict[str, float]:
    """The metrics of an exported head over padded rows ``arrays``, loaded as a user would."""
    import torch

    model = head_model_class(task).from_pretrained(export_dir, use_safetensors=True).eval()
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    counts = zero_counts(task, names)
    with torch.no_grad():
        for i in range(0, len(arrays["labels"]), batch_size):
            batch = {k: torch.from_numpy(v[i:i + batch_size]) for k, v in arrays.items()}
            counts += head_counts(task, *head_logits(model, batch), names)
    return head_metrics(task, counts, names)


def score_source(export_dir: str, spec, source: str) -> dict[str, float]:
    """The metrics of an exported head on another labelled file (a test split), its rows
    read with ``spec``'s fields and mapped to the export's own ``id2label``."""
    from transformers import AutoConfig

    from raystages.data.labelled import encode, label_ids, map_labels, pad_labelled, row_reader
    from raystages.data.sources import read_rows
    from raystages.models import load_tokenizer

    config = AutoConfig.from_pretrained(export_dir)
    to_id = label_ids([config.id2label[i] for i in range(config.num_labels)])
    read = row_reader(spec.sft.task, spec.sft.head)
    rows = read_rows(source, lambda row: map_labels(read(row), to_id), spec.data.on_bad_row).rows
    tok = load_tokenizer(export_dir)
    arrays = pad_labelled(encode(tok, rows, spec.sft.task, spec.optim.seq_len), tok.pad_token_id)
    return score_export(export_dir, arrays, spec.sft.task) | {"examples": len(rows)}


def run(spec) -> "StageResult":
    from raystages.data.chat import skip_reasons
    from raystages.data.labelled import class_weights, encode, load_labelled, pad_labelled
    from raystages.data.tokenizer import prepare_tokenizer
    from raystages.models import load_tokenizer
    from raystages.stages.sft import check_parent, check_sizes, ray_dataset
    from raystages.task.labelling import classification_rows, tagging_rows
    from raystages.train.runner import EXPORT_DIR, connect_ray, finish_stage, run_training, save_run_spec

    started = time.time()
    task, head = spec.sft.task, spec.sft.head
    parent = check_parent(spec)
    save_run_spec(spec)
    tokenizer_dir = prepare_tokenizer(spec, [])
    tok = load_tokenizer(tokenizer_dir)
    split = load_labelled(spec.data, head, task, classification_rows if task == CLASSIFICATION else tagging_rows)
    train = encode(tok, split.train, task, spec.optim.seq_len)
    val = encode(tok, split.val, task, spec.optim.seq_len)
    check_sizes(spec, len(train), len(val), "examples")
    weights = class_weights(head, split.train, len(split.labels))
    val_arrays = pad_labelled(val, tok.pad_token_id)

    connect_ray()
    datasets = {"train": ray_dataset(pad_labelled(train, tok.pad_token_id), spec.run.seed),
                "val": ray_dataset(val_arrays, None)}
    metrics = run_training(spec, HeadStage(task, split.labels, weights), datasets, tokenizer_dir)
    export = spec.run_dir() / EXPORT_DIR
    held_out = score_export(str(export), val_arrays, task)
    metrics.update({f"held_out_{k}": v for k, v in held_out.items()})
    metrics.update(task=task, labels=split.labels, class_weights=weights, train_examples=len(train),
                   val_examples=len(val), skipped_rows=len(split.skipped),
                   skipped_by_reason=skip_reasons(split.skipped), wall_s=round(time.time() - started, 1))
    return finish_stage(spec, export, metrics, parent, split.skipped, extra={"task": task})
