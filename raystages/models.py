"""Model presets, tokenizers (trained locally or loaded), model building, HF export.

Everything here loads from local directories or builds from configs: nothing downloads
unless the spec names a hub id on a machine that can reach the hub. Weights load from
safetensors only, and ``trust_remote_code`` stays off unless the spec turns it on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from raystages import atomic

# Llama-architecture presets. Head sizes are 32/64/128 so the same checkpoints run in
# vLLM's CPU backend. The small ones tie embeddings (a big share of their parameters).
PRESETS: dict[str, dict[str, Any]] = {
    "nano": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                 tie_word_embeddings=True),
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                 tie_word_embeddings=True),
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                  num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024,
                  tie_word_embeddings=True),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8,
                     max_position_embeddings=4096, rope_theta=500000.0),
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32,
                     max_position_embeddings=4096),
}

# BERT encoder presets (BertConfig, not ModernBertConfig: absolute positions and plain
# attention work the same on CPU and GPU with no flash-attention path, and every
# AutoModelFor{MaskedLM,SequenceClassification,TokenClassification} head exists for it).
# bert-tiny and bert-small are Google's compact BERTs (Turc et al. 2019: L=2/H=128 and
# L=4/H=512); bert-nano halves bert-tiny's width for second-long tests. Head size 64.
ENCODER_PRESETS: dict[str, dict[str, Any]] = {
    "bert-nano": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=1, max_position_embeddings=256),
    "bert-tiny": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=2, max_position_embeddings=512),
    "bert-small": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                       num_attention_heads=8, max_position_embeddings=512),
}
PRESETS.update(ENCODER_PRESETS)

SPECIAL_TOKENS = {
    "eos": "<|endoftext|>",
    "pad": "<|pad|>",
    "extra": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
}
END_OF_TURN = "<|end|>"
# A turn is "<|role|>\ncontent<|end|>\n", except that the assistant's reply follows its header
# after a space (as in Llama-2's `[/INST] reply`): byte-level BPE then starts the reply with
# the space-prefixed tokens running text uses (" a", where a bare "a" starts no corpus line
# and stays untrained). The assistant's "<|end|>" is supervised so the model learns to stop,
# and generation treats it as an end-of-sequence token.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|> {{ message['content'] | trim }}<|end|>\n"
    "{% else %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def is_encoder_preset(name: str | None) -> bool:
    return name in ENCODER_PRESETS


def preset_config(name: str, vocab_size: int, overrides: dict | None = None):
    """A LlamaConfig, or a BertConfig for the ``bert-*`` presets."""
    from transformers import BertConfig, LlamaConfig

    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    kwargs = {**PRESETS[name], **(overrides or {})}
    config_cls = BertConfig if is_encoder_preset(name) else LlamaConfig
    return config_cls(vocab_size=vocab_size, **kwargs)


def context_length(preset: str | None, path: str | None, overrides: dict | None) -> int | None:
    """The model's context length as far as it can be known without loading weights."""
    overrides = overrides or {}
    if "max_position_embeddings" in overrides:
        return int(overrides["max_position_embeddings"])
    if preset:
        return PRESETS[preset]["max_position_embeddings"] if preset in PRESETS else None
    if path and (Path(path) / "config.json").is_file():
        return json.loads((Path(path) / "config.json").read_text()).get("max_position_embeddings")
    return None


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: str | os.PathLike):
    """Train a byte-level BPE on ``texts`` and save it as a Hugging Face tokenizer with the
    chat template. Deterministic for the same texts and vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [SPECIAL_TOKENS["eos"], SPECIAL_TOKENS["pad"], *SPECIAL_TOKENS["extra"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=SPECIAL_TOKENS["eos"], bos_token=None,
        pad_token=SPECIAL_TOKENS["pad"], additional_special_tokens=SPECIAL_TOKENS["extra"])
    hf.chat_template = CHAT_TEMPLATE
    atomic.write_dir(hf.save_pretrained, out_dir)
    return hf


ENCODER_SPECIALS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]",
                    "sep_token": "[SEP]", "mask_token": "[MASK]"}


def train_wordpiece_tokenizer(texts: list[str], vocab_size: int, out_dir: str | os.PathLike,
                              lowercase: bool = True):
    """Train a WordPiece (BERT's scheme; lower-casing unless ``lowercase`` is false, as in
    BERT cased) on ``texts`` and save it as a Hugging Face tokenizer: ``[CLS] text [SEP]``
    (pairs ``[CLS] a [SEP] b [SEP]``), continuation pieces prefixed ``##``. Deterministic
    for the same texts, vocab size and casing."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(ENCODER_SPECIALS.values())
    tok = Tokenizer(models.WordPiece(unk_token=ENCODER_SPECIALS["unk_token"]))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials,
                                        show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    # BERT's inputs: a pair's segment ids (1 on its second text) reach the model, in training
    # and in a user's `model(**tokenizer(a, b))` alike.
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, model_input_names=["input_ids", "token_type_ids", "attention_mask"],
                                 **ENCODER_SPECIALS)
    atomic.write_dir(hf.save_pretrained, out_dir)
    return hf


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """A tokenizer from a local dir or hub id; gets a pad token and chat template if absent.

    A directory holding only GPT-2's original ``encoder.json`` + ``vocab.bpe`` also works.
    """
    from transformers import AutoTokenizer

    d = Path(path)
    if (d / "encoder.json").is_file() and (d / "vocab.bpe").is_file() and not (d / "tokenizer.json").exists():
        return gpt2_tokenizer_from_files(d)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not getattr(tok, "chat_template", None):
        tok.chat_template = CHAT_TEMPLATE
    return tok


def gpt2_tokenizer_from_files(directory: str | os.PathLike):
    """GPT-2's byte-level BPE built from ``encoder.json`` + ``vocab.bpe`` (the same bytes
    as the hub's vocab.json/merges.txt), so a real GPT-2 tokenizer works offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    d = Path(directory)
    bpe = Tokenizer(models.BPE.from_file(str(d / "encoder.json"), str(d / "vocab.bpe")))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    tok.pad_token = tok.eos_token
    tok.chat_template = CHAT_TEMPLATE
    return tok


def end_token_ids(tokenizer) -> list[int]:
    """Token ids that end a generation: eos, and the end-of-turn marker when present."""
    ids = [tokenizer.eos_token_id]
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if isinstance(end, int) and end != tokenizer.unk_token_id and end not in ids:
        ids.append(end)
    return ids


def build_causal_lm(model_spec, tokenizer, seed: int):
    """A causal LM from a preset (fresh weights, seeded) or a checkpoint dir / hub id."""
    from transformers import AutoModelForCausalLM

    def configure(config):
        config.eos_token_id = end_token_ids(tokenizer)
        config.bos_token_id = None

    return _build_model(AutoModelForCausalLM, model_spec, tokenizer, seed, configure)


def build_masked_lm(model_spec, tokenizer, seed: int):
    """A masked LM from a ``bert-*`` preset (fresh weights, seeded) or an encoder checkpoint."""
    from transformers import AutoModelForMaskedLM

    return _build_model(AutoModelForMaskedLM, model_spec, tokenizer, seed, lambda config: None)


def _build_model(auto_cls, model_spec, tokenizer, seed: int, configure):
    """``auto_cls`` from ``model_spec.path``, or from its preset's config with fresh seeded
    weights (``configure`` sets the config's special-token ids); embeddings grown to the
    tokenizer."""
    import torch

    if model_spec.path:
        model = auto_cls.from_pretrained(
            model_spec.path, use_safetensors=True, dtype=torch.float32,
            trust_remote_code=model_spec.trust_remote_code, **model_spec.config_overrides)
    else:
        torch.manual_seed(seed)
        config = preset_config(model_spec.preset, len(tokenizer), model_spec.config_overrides)
        config.pad_token_id = tokenizer.pad_token_id
        configure(config)
        model = auto_cls.from_config(config, dtype=torch.float32)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    return model


def fresh_weights(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, seed: int) -> None:
    """Export ``checkpoint``'s architecture and tokenizer with new weights drawn at ``seed``:
    the from-scratch arm of a pretrained-versus-scratch comparison (same shapes, same vocabulary,
    none of the learning)."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(checkpoint)
    model_cls = getattr(transformers, config.architectures[0])
    torch.manual_seed(seed)
    export_hf(model_cls(config).float(), load_tokenizer(str(checkpoint)), out_dir)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def padded(seqs: list[list[int]], pad_id: int, left: bool = False):
    """``(ids, attention_mask)``, both ``(B, max_len)`` long tensors, of token-id lists
    padded with ``pad_id`` on the right (on the left with ``left``: every row's last
    token in the last column, as generation wants)."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(seqs):
        cols = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[row, cols] = torch.tensor(seq, dtype=torch.long)
        mask[row, cols] = 1
    return ids, mask


def with_lora(model, lora, task_type: str):
    """``model`` with peft LoRA adapters on ``lora.target_modules`` when ``lora.enabled``
    (``task_type`` ``CAUSAL_LM``, or ``SEQ_CLS``, which also trains the new score head
    whole), else ``model`` itself. Only the adapters (and that head) require grad."""
    if not lora.enabled:
        return model
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules), task_type=task_type))


def without_adapters(model):
    """A peft model with its LoRA adapters folded into the weights (a plain Hugging Face
    model, as every export is); any other model as it is."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def merged_weights_plan(model) -> list[tuple[str, Any, Any]]:
    """``(name, parameter, LoRA layer or None)`` for each parameter of the plain model that
    merging ``model``'s adapters would give, under that model's names (what vLLM and an
    export load: ``...q_proj.weight``, not ``...q_proj.base_layer.weight``); the adapter
    weights themselves are not listed. A model without adapters: its own named parameters,
    each with None. :func:`merged_weight` reads one, so a caller can go bucket by bucket
    instead of merging the whole model at once."""
    if not hasattr(model, "get_base_model"):
        return [(n, p, None) for n, p in model.named_parameters()]
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    adapted = {f"{n}.base_layer.weight": m for n, m in base.named_modules() if isinstance(m, LoraLayer)}
    return [(n.replace(".base_layer.", "."), p, adapted.get(n)) for n, p in base.named_parameters() if ".lora_" not in n]


def merged_weight(param, layer):
    """``param`` detached, plus the delta of ``layer``'s active adapters when it has one (the
    weight ``merge_and_unload`` would leave), without touching the model."""
    weight = param.detach()
    if layer is None:
        return weight
    return weight + sum(layer.get_delta_weight(a) for a in layer.active_adapters if a in layer.lora_A)


def export_hf(model, tokenizer, out_dir: str | os.PathLike, extra_files: dict[str, Any] | None = None):
    """Save model (safetensors) + tokenizer + generation config to ``out_dir`` atomically:
    written beside it and renamed into place, so a crash never leaves a half export."""
    from transformers import GenerationConfig

    def write(tmp: str):
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if getattr(model.config, "is_decoder", True) and hasattr(model, "generate"):
            GenerationConfig(eos_token_id=end_token_ids(tokenizer),
                             pad_token_id=tokenizer.pad_token_id).save_pretrained(tmp)
        for name, obj in (extra_files or {}).items():
            Path(tmp, name).write_text(json.dumps(obj, indent=2, default=str))

    atomic.write_dir(write, out_dir)


def tokenizer_digest(path: str | None) -> str | None:
    """A hash of a checkpoint's vocabulary (model + added tokens), or None when it cannot be
    read (yet). Parsed, not raw bytes: two saves of one tokenizer may order keys differently."""
    if not path or not Path(path).is_dir():
        return None
    d = Path(path)
    import hashlib

    h = hashlib.sha256()
    if (d / "tokenizer.json").is_file():
        tj = json.loads((d / "tokenizer.json").read_text())
        added = sorted((t["id"], t["content"]) for t in tj.get("added_tokens", []))
        h.update(json.dumps({"model": tj.get("model"), "added": added}, sort_keys=True).encode())
        return h.hexdigest()
    present = [d / n for n in ("vocab.json", "merges.txt", "tokenizer.model") if (d / n).is_file()]
    if not present:
        return None
    for f in present:
        h.update(f.read_bytes())
    return h.hexdigest()
