"""Presets, local tokenizers (trained here, or GPT-2's from files), exports that reload."""

import json

import pytest
import torch

from raystages.models import (CHAT_TEMPLATE, PRESETS, build_causal_lm, context_length, end_token_ids,
                              export_hf, gpt2_tokenizer_from_files, load_tokenizer, train_tokenizer)
from raystages.spec import ModelSpec
from tests.conftest import shared_data


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_have_head_sizes_vllm_cpu_accepts(name):
    p = PRESETS[name]
    assert p["hidden_size"] // p["num_attention_heads"] in (32, 64, 128)


def test_tokenizer_training_is_deterministic_and_keeps_letters_whole(tmp_path):
    from raystages.task.splits import pretrain_texts

    texts = pretrain_texts("train", 100)
    a = train_tokenizer(texts, 400, tmp_path / "a")
    b = train_tokenizer(texts, 400, tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()
    assert a.tokenize("sort: d a c") == ["sort", ":", "Ġd", "Ġa", "Ġc"]
    reloaded = load_tokenizer(str(tmp_path / "a"))
    chat = reloaded.apply_chat_template(
        [{"role": "user", "content": "sort: b a"}, {"role": "assistant", "content": "a b"}], tokenize=False)
    assert chat == "<|user|>\nsort: b a<|end|>\n<|assistant|> a b<|end|>\n"
    assert reloaded.convert_ids_to_tokens(end_token_ids(reloaded)) == ["<|endoftext|>", "<|end|>"]


def test_gpt2_tokenizer_builds_offline_from_shared_files():
    tok = gpt2_tokenizer_from_files(shared_data("gpt2_bpe"))
    assert len(tok) == 50257
    assert tok("Hello world")["input_ids"] == [15496, 995]  # GPT-2's published ids
    assert tok.chat_template == CHAT_TEMPLATE


def test_export_reloads_with_identical_logits_and_no_pickle(tmp_path, builtin_tokenizer_dir):
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(str(builtin_tokenizer_dir))
    model = build_causal_lm(ModelSpec(preset="nano"), tok, seed=0).eval()
    export_hf(model, tok, tmp_path / "m")
    files = {p.name for p in (tmp_path / "m").iterdir()}
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt")) for f in files)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m", use_safetensors=True).eval()
    ids = torch.tensor([tok("sort: d a c b = a b c d")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    gen = json.loads((tmp_path / "m" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == end_token_ids(tok)


def test_context_length_comes_from_preset_override_or_checkpoint(random_checkpoint):
    assert context_length("tiny", None, None) == 512
    assert context_length("tiny", None, {"max_position_embeddings": 64}) == 64
    assert context_length(None, str(random_checkpoint), None) == 256
    assert context_length(None, "some/hub-model", None) is None


def test_padded_right_and_left():
    from raystages.models import padded

    ids, mask = padded([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = padded([[5, 6, 7], [8]], pad_id=0, left=True)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_merged_weights_plan_reads_what_merge_and_unload_would_write(builtin_tokenizer_dir):
    """The RL sync's view of a LoRA policy: the plain model's names, each adapted weight with
    its delta added, the adapters themselves absent; the peft model is left as it was."""
    import copy

    from raystages.models import load_tokenizer, merged_weight, merged_weights_plan, with_lora
    from raystages.spec import LoraSpec

    plain = build_causal_lm(ModelSpec(preset="nano"), load_tokenizer(str(builtin_tokenizer_dir)), seed=0)
    peft_model = with_lora(copy.deepcopy(plain), LoraSpec(enabled=True), "CAUSAL_LM")
    torch.manual_seed(0)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # B starts at 0: give the adapters a delta to merge
            torch.nn.init.normal_(p)
    before = {n: p.clone() for n, p in peft_model.named_parameters()}
    plan = merged_weights_plan(peft_model)
    assert [n for n, _, _ in plan] == [n for n, _ in plain.named_parameters()]
    assert sum(layer is not None for _, _, layer in plan) == 4 * plain.config.num_hidden_layers  # q, k, v, o
    merged = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    for name, param, layer in plan:
        assert torch.equal(merged_weight(param, layer), merged[name]), name
    assert all(torch.equal(before[n], p) for n, p in peft_model.named_parameters())
    # Without adapters: the model's own parameters, untouched.
    assert [(n, layer) for n, _, layer in merged_weights_plan(plain)] == [(n, None) for n, _ in plain.named_parameters()]
