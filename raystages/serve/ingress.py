"""The vLLM ingress: Ray Serve LLM's ``OpenAiIngress``, plus what it lacks for us.

Ray Serve LLM (``ray.serve.llm``) does the OpenAI work — request models, the chat
template, streaming, sampling parameters, usage — by handing requests to vLLM in
``LLMServer`` replicas. This subclass adds:

- ``/v1/models`` with ``created`` and ``owned_by`` (Ray's cards lack ``created``, which
  the ``openai`` client rejects in strict mode), and every served stage, scorers included;
- ``/v1/score`` on a reward-model scorer deployment, and ``/health`` for load balancers;
- the API-key check and OpenAI-shaped errors (``routes.make_api``); an unknown model is
  a 404 with code ``model_not_found`` before anything reaches an engine;
- response bodies without the ``null`` vLLM-only extras that the OpenAI schema does not
  allow (e.g. ``usage.prompt_tokens_details: null``).

Importing this module needs vLLM (``ray.serve.llm`` imports it).
"""

from __future__ import annotations

import json

from fastapi import Request
from ray.llm._internal.serve.core.configs.openai_api_models import (ChatCompletionRequest,
                                                                    CompletionRequest)
from ray.serve.llm.ingress import OpenAiIngress
from starlette.responses import JSONResponse, Response

from raystages.serve.routes import (ApiError, ScoreBody, StagesRoutes, as_api_error, engine_error,  # noqa: F401
                                    reject_invalid_text, request_id)

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


async def _clean_stream(body_iterator):
    """Re-emit an SSE stream with each ``data:`` event's JSON cleaned."""
    async for chunk in body_iterator:
        text = chunk.decode() if isinstance(chunk, bytes) else chunk
        out = []
        for event in text.split("\n\n"):
            if event.startswith("data: {"):
                event = "data: " + json.dumps(drop_null_extras(json.loads(event[6:])), separators=(",", ":"))
            out.append(event)
        yield "\n\n".join(out)


class VLLMIngress(StagesRoutes, OpenAiIngress):
    def __init__(self, llm_deployments, model_cards, *, models_info, scorers, lora_paths=None):
        super().__init__(llm_deployments, model_cards, lora_paths=lora_paths)
        self._init_routes(models_info, scorers)

    async def _generate(self, body, request: Request, call_method: str) -> Response:
        body.model = request.state.model = self._generation_model(body.model)
        reject_invalid_text({k: getattr(body, k, None) for k in ("prompt", "messages", "stop")})
        try:
            response = await self._process_llm_request(body, call_method=call_method, raw_request=request)
        except Exception as e:  # noqa: BLE001 - becomes an OpenAI error body
            raise as_api_error(e, request_id(request)) from None
        if isinstance(response, JSONResponse) and response.status_code >= 400:
            err = json.loads(response.body).get("error") or {}
            raise engine_error(response.status_code, str(err.get("message", "")), request_id(request),
                               err.get("param"), err.get("code"))
        if isinstance(response, JSONResponse):
            answer = drop_null_extras(json.loads(response.body))
            request.state.usage = answer.get("usage")
            return JSONResponse(answer, status_code=response.status_code)
        response.body_iterator = _clean_stream(response.body_iterator)
        return response

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        return await self._generate(body, request, "completions")

    async def _probe_generation(self, name: str) -> bool:
        probe = CompletionRequest(model=name, prompt="a", max_tokens=1, temperature=0.0)
        response = await self._process_llm_request(probe, call_method="completions")
        return getattr(response, "status_code", 200) == 200

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        return await self._generate(body, request, "chat")

    # The mixin's routes win over OpenAiIngress' same-named methods (MRO); spelled out
    # so the route map finds them on this class.
    models = StagesRoutes.models
    model_data = StagesRoutes.model_data
    score = StagesRoutes.score
    health = StagesRoutes.health
