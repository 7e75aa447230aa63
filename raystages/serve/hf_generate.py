"""Plain ``transformers`` generation from an exported checkpoint (no Ray, no vLLM)."""

from __future__ import annotations


def greedy_complete(checkpoint: str, prompts: list[str], max_new_tokens: int = 32,
                    chat: bool = False) -> list[str]:
    """Greedy completions of ``prompts``; with ``chat`` each is sent as one user turn."""
    import torch
    from transformers import AutoModelForCausalLM

    from raystages.models import end_token_ids, load_tokenizer

    tok = load_tokenizer(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, use_safetensors=True).eval()
    outs = []
    with torch.no_grad():
        for prompt in prompts:
            if chat:
                ids = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                              add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
            else:
                ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=end_token_ids(tok),
                                 pad_token_id=tok.pad_token_id)
            outs.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    return outs
