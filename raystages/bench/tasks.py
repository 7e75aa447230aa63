"""Encoders on real data, in one invocation: sentiment (rotten_tomatoes) and NER (wnut17).

An encoder is pretrained with masked-LM on the unlabelled rotten_tomatoes training
sentences; the same sentiment head is then fine-tuned from that checkpoint and from the
same architecture with fresh weights (same tokenizer, same budget), and both are scored on
the test split beside a bag-of-words logistic regression. NER gets its own encoder
(``jobs/pretrain-mlm-ner.yaml``: a cased WordPiece and masked-LM on the wnut17 training
sentences, tags unused — the lower-cased movie-review encoder cannot see capitals, and
scored below memorisation). Its head is fine-tuned on wnut17 and scored on the test split
beside the memorisation baseline (each word's most frequent training tag, ``O`` for unseen
words). Dev splits are the held-out data during training; test is only scored at the end.

    raystages bench tasks [mlm_steps=1500 sentiment_steps=800 ner_mlm_steps=800 ner_steps=1500
                           model.preset=bert-tiny ...]

Other ``key=value`` overrides go to both masked-LM runs.

Reads ``../shared/data`` beside the checkout (or ``RAYSTAGES_SHARED_DATA``).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def shared_data() -> Path:
    path = Path(os.environ.get("RAYSTAGES_SHARED_DATA", ROOT.parent / "shared" / "data"))
    if not (path / "rotten_tomatoes").is_dir() or not (path / "wnut17").is_dir():
        raise FileNotFoundError(f"bench tasks reads rotten_tomatoes and wnut17 from {path}; "
                                "set RAYSTAGES_SHARED_DATA to the shared data folder")
    return path


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def bag_of_words_accuracy(train: list[dict], test: list[dict], l2: float = 1.0) -> float:
    """Test accuracy of an L2-regularised logistic regression on binary word features
    (whitespace words of the training texts), fitted with L-BFGS."""
    import torch

    vocab = {w: i for i, w in enumerate(sorted({w for r in train for w in r["text"].split()}))}

    def features(rows):
        x = torch.zeros(len(rows), len(vocab))
        for i, r in enumerate(rows):
            x[i, [vocab[w] for w in set(r["text"].split()) if w in vocab]] = 1.0
        return x, torch.tensor([float(r["label"]) for r in rows])

    (x, y), (xt, yt) = features(train), features(test)
    w = torch.zeros(len(vocab), requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + l2 / (2 * len(train)) * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return ((xt @ w + b > 0).float() == yt).float().mean().item()


def memorisation_f1(train: list[dict], test: list[dict]) -> float:
    """Entity F1 of tagging each test word with its most frequent training tag (``O`` if unseen)."""
    from raystages.stages.task_metrics import entity_counts, precision_recall_f1

    seen: dict[str, Counter] = defaultdict(Counter)
    for r in train:
        for word, tag in zip(r["tokens"], r["tags"]):
            seen[word][tag] += 1
    pred = [[seen[w].most_common(1)[0][0] if w in seen else "O" for w in r["tokens"]] for r in test]
    return precision_recall_f1(*entity_counts([r["tags"] for r in test], pred))["f1"]


def _options(overrides: list[str]) -> tuple[dict, list[str]]:
    steps = {"mlm_steps": 1500, "sentiment_steps": 800, "ner_mlm_steps": 800, "ner_steps": 1500}
    rest = []
    for o in overrides:
        key, _, value = o.partition("=")
        if key in steps:
            steps[key] = int(value)
        else:
            rest.append(o)
    return steps, rest


def _mlm_figures(result, steps: int, text: str, t0: float) -> dict:
    return {"val_masked_accuracy": result.metrics.get("val_masked_accuracy"),
            "val_masked_majority_baseline": result.metrics.get("val_masked_majority_baseline"),
            "params": result.metrics.get("params"), "steps": steps, "pretraining_text": text,
            "wall_s": round(time.perf_counter() - t0, 1)}


def run(overrides: list[str]) -> dict:
    from raystages.models import fresh_weights
    from raystages.spec import load_spec
    from raystages.stages import pretrain, sft
    from raystages.stages.task_heads import score_source

    data = shared_data()
    steps, model_overrides = _options(overrides)
    storage = Path(tempfile.mkdtemp(prefix="raystages-bench-tasks-"))
    rt, wnut = data / "rotten_tomatoes", data / "wnut17"
    common = [f"run.storage_path={storage}", "run.checkpoint_every=100000", "logging.tensorboard=false"]
    out: dict = {"storage": str(storage)}

    t0 = time.perf_counter()
    mlm = pretrain.run(load_spec(ROOT / "jobs" / "pretrain-mlm.yaml", [
        *common, f"data.source={rt / 'train.jsonl'}", f"data.val_source={rt / 'dev.jsonl'}",
        f"optim.max_steps={steps['mlm_steps']}", "run.name=mlm", *model_overrides]))
    out["mlm"] = _mlm_figures(mlm, steps["mlm_steps"], "rotten_tomatoes train sentences (labels unused)", t0)

    # The same architecture and tokenizer with fresh weights: the from-scratch arm.
    scratch = storage / "scratch"
    fresh_weights(mlm.export_dir, scratch, seed=0)

    sentiment = {}
    for arm, parent in (("scratch", scratch), ("pretrained", mlm.export_dir)):
        t0 = time.perf_counter()
        spec = load_spec(ROOT / "jobs" / "sft-sentiment.yaml", [
            *common, f"model.path={parent}", f"data.source={rt / 'train.jsonl'}",
            f"data.val_source={rt / 'dev.jsonl'}", f"optim.max_steps={steps['sentiment_steps']}",
            f"run.name=sentiment-{arm}"])
        result = sft.run(spec)
        test = score_source(str(result.export_dir), spec, str(rt / "test.jsonl"))
        sentiment[arm] = test["accuracy"]
        out[f"sentiment_{arm}"] = {"dev_accuracy": result.metrics["held_out_accuracy"],
                                   "test_macro_f1": test["macro_f1"],
                                   "wall_s": round(time.perf_counter() - t0, 1)}
    sentiment["bow"] = bag_of_words_accuracy(_jsonl(rt / "train.jsonl"), _jsonl(rt / "test.jsonl"))
    out["sentiment_test_accuracy"] = sentiment

    t0 = time.perf_counter()
    ner_mlm = pretrain.run(load_spec(ROOT / "jobs" / "pretrain-mlm-ner.yaml", [
        *common, f"data.source={wnut / 'train.jsonl'}", f"data.val_source={wnut / 'dev.jsonl'}",
        f"optim.max_steps={steps['ner_mlm_steps']}", "run.name=mlm-ner", *model_overrides]))
    out["mlm_ner"] = _mlm_figures(ner_mlm, steps["ner_mlm_steps"],
                                  "wnut17 train sentences (tags unused), cased WordPiece", t0)
    t0 = time.perf_counter()
    spec = load_spec(ROOT / "jobs" / "sft-ner.yaml", [
        *common, f"model.path={ner_mlm.export_dir}", f"data.source={wnut / 'train.jsonl'}",
        f"data.val_source={wnut / 'dev.jsonl'}", f"optim.max_steps={steps['ner_steps']}", "run.name=ner"])
    result = sft.run(spec)
    test = score_source(str(result.export_dir), spec, str(wnut / "test.jsonl"))
    out["ner_test_f1"] = {"model": test["entity_f1"],
                          "memorisation_baseline": memorisation_f1(_jsonl(wnut / "train.jsonl"),
                                                                   _jsonl(wnut / "test.jsonl"))}
    out["ner"] = {"dev_entity_f1": result.metrics["held_out_entity_f1"],
                  "test_precision": test["entity_precision"], "test_recall": test["entity_recall"],
                  "wall_s": round(time.perf_counter() - t0, 1)}
    return out
