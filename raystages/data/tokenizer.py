"""Choosing the tokenizer of a run: the spec's, the starting checkpoint's, or one trained here."""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice
from pathlib import Path

TOKENIZER_DIR = "tokenizer"


def prepare_tokenizer(spec, training_texts: Iterable[str]) -> str:
    """Write the run's tokenizer to ``run_dir/tokenizer`` and return that path.

    Priority: ``tokenizer.path``, then ``model.path`` (a checkpoint carries its tokenizer),
    then one trained on the first ``tokenizer.train_docs`` training texts: WordPiece for
    the ``bert-*`` encoder presets (cased or not by ``tokenizer.lowercase``), byte-level
    BPE for the causal ones. ``training_texts`` may be a lazy iterator: only those first
    documents are read, and only when training.
    A rerun reuses the tokenizer already there, so a resumed run keeps its vocabulary.
    """
    from raystages import atomic
    from raystages.models import is_encoder_preset, load_tokenizer, train_tokenizer, train_wordpiece_tokenizer

    out = spec.run_dir() / TOKENIZER_DIR
    if (out / "tokenizer_config.json").is_file():
        return str(out)
    source = spec.tokenizer.path or spec.model.path
    if source:
        tok = load_tokenizer(source, spec.model.trust_remote_code)
        atomic.write_dir(tok.save_pretrained, out)  # a rerun reuses whatever is there
    else:
        texts = list(islice(training_texts, spec.tokenizer.train_docs))
        if is_encoder_preset(spec.model.preset):
            train_wordpiece_tokenizer(texts, spec.tokenizer.vocab_size, out, spec.tokenizer.lowercase)
        else:
            train_tokenizer(texts, spec.tokenizer.vocab_size, out)
    return str(Path(out))
