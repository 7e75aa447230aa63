"""Greedy generation with plain ``transformers`` from an exported checkpoint (no Ray, no vLLM):
what stages, reports and tests use to ask a model for its answers."""

from __future__ import annotations


def greedy_complete(checkpoint: str, prompts: list[str], max_new_tokens: int = 32, chat: bool = False,
                    tokenizer_dir: str | None = None, batch_size: int = 1) -> list[str]:
    """Greedy continuations of ``prompts``; with ``chat`` each is sent as one user turn
    through the chat template. Batches of ``batch_size`` are left-padded; the default of one
    prompt at a time gives exactly what a single unpadded request gives (the server tests
    compare with it)."""
    import torch
    from transformers import AutoModelForCausalLM

    from raystages.models import end_token_ids, load_tokenizer

    tok = load_tokenizer(tokenizer_dir or checkpoint)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(checkpoint, use_safetensors=True, dtype=torch.float32).eval()
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts] if chat else list(prompts)
    outs = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            enc = tok(texts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            gen = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                                 eos_token_id=end_token_ids(tok), pad_token_id=tok.pad_token_id)
            outs += tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return outs
