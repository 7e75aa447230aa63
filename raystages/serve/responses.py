"""Response bodies as OpenAI's schema has them, from what vLLM (through Ray Serve LLM) answers.

Pure, so it is tested without an engine; ``ingress`` applies it to every body and stream chunk.
"""

from __future__ import annotations

# Null-valued keys dropped from vLLM's bodies: the first group fails the OpenAI schema when
# null (it types them object/array), the second is vLLM-only noise. `refusal`, `audio`,
# `service_tier` stay: the schema requires or allows them as null.
_NOT_NULL = {"prompt_tokens_details", "completion_tokens_details", "function_call", "annotations", "tool_calls"}
_VLLM_EXTRAS = _NOT_NULL | {"stop_reason", "token_ids", "prompt_logprobs", "prompt_token_ids", "routed_experts",
                            "kv_transfer_params", "ec_transfer_params", "metrics", "prompt_text", "reasoning",
                            "reasoning_content"}


def drop_null_extras(obj):
    """Recursively remove vLLM-only keys whose value is null (the OpenAI schema types them
    as objects or leaves them out; ``null`` fails strict validation)."""
    if isinstance(obj, dict):
        return {k: drop_null_extras(v) for k, v in obj.items() if not (v is None and k in _VLLM_EXTRAS)}
    if isinstance(obj, list):
        return [drop_null_extras(v) for v in obj]
    return obj


def openai_shape(body: dict) -> dict:
    """A vLLM response body (or stream chunk) as OpenAI's schema has it: the null extras
    dropped, and chat ``logprobs`` objects with their required ``refusal`` (vLLM has only
    ``content``; this server never refuses, so it is null)."""
    body = drop_null_extras(body)
    if str(body.get("object", "")).startswith("chat.completion"):
        for choice in body.get("choices") or []:
            if isinstance(choice.get("logprobs"), dict):
                choice["logprobs"].setdefault("refusal", None)
    return body
