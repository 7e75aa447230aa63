"""The vLLM ingress: Ray Serve LLM's ``OpenAiIngress``, plus what it lacks for us.

Ray Serve LLM (``ray.serve.llm``) does the OpenAI work — request models, the chat
template, streaming, sampling parameters, usage — by handing requests to vLLM in
``LLMServer`` replicas. This subclass adds:

- ``/v1/models`` with ``created`` and ``owned_by`` (Ray's cards lack ``created``, which
  the ``openai`` client rejects in strict mode), and every served stage, scorers included;
- ``/v1/score`` on a reward-model scorer deployment, and ``/health`` for load balancers;
- the API-key check and OpenAI-shaped errors (``routes.make_api``); an unknown model is
  a 404 with code ``model_not_found`` before anything reaches an engine;
- OpenAI's strict request validation (``requests``: the bodies are validated there, then
  handed to Ray's own request models), and a 400 ``context_length_exceeded`` where the
  prompt plus ``max_tokens`` does not fit (vLLM would silently shorten the reply);
- response bodies as OpenAI's schema has them: without the ``null`` vLLM-only extras that
  it does not allow (e.g. ``usage.prompt_tokens_details: null``), with ``refusal`` in chat
  ``logprobs``.

Importing this module needs vLLM (``ray.serve.llm`` imports it).
"""

from __future__ import annotations

import json

from fastapi import Request
from ray.llm._internal.serve.core.configs import openai_api_models as ray_api
from ray.serve.llm.ingress import OpenAiIngress
from starlette.responses import JSONResponse, Response

from raystages.serve.requests import ChatRequest, CompletionRequest, context_error
from raystages.serve.responses import openai_shape
from raystages.serve.routes import StagesRoutes, as_api_error, engine_error, reject_invalid_text, request_id

async def _clean_stream(body_iterator):
    """Re-emit an SSE stream with each ``data:`` event's JSON cleaned."""
    async for chunk in body_iterator:
        text = chunk.decode() if isinstance(chunk, bytes) else chunk
        out = []
        for event in text.split("\n\n"):
            if event.startswith("data: {"):
                event = "data: " + json.dumps(openai_shape(json.loads(event[6:])), separators=(",", ":"))
            out.append(event)
        yield "\n\n".join(out)


class VLLMIngress(StagesRoutes, OpenAiIngress):
    def __init__(self, llm_deployments, model_cards, *, models_info, scorers, lora_paths=None):
        super().__init__(llm_deployments, model_cards, lora_paths=lora_paths)
        self._init_routes(models_info, scorers)
        self._tokenizers: dict = {}

    def _prompt_tokens(self, name: str, body: ChatRequest | CompletionRequest) -> list[int]:
        """Each prompt's length in tokens, counted as vLLM counts them (chat: the rendered
        template without special tokens added; completions: with them)."""
        tok = self._tokenizers.get(name)
        if tok is None:
            from raystages.models import load_tokenizer

            tok = self._tokenizers[name] = load_tokenizer(self._info[name]["root"])
        if isinstance(body, ChatRequest):
            text = tok.apply_chat_template(body.template_messages(), tokenize=False, add_generation_prompt=True)
            return [len(tok(text, add_special_tokens=False)["input_ids"])]
        return [len(p) if isinstance(p, list) else len(tok(p)["input_ids"]) for p in body.prompts()]

    async def _generate(self, body: ChatRequest | CompletionRequest, request: Request) -> Response:
        name = request.state.model = self._generation_model(body)
        reject_invalid_text({k: getattr(body, k, None) for k in ("prompt", "messages", "stop")})
        # vLLM refuses a prompt over the context but shortens a reply that would overrun it;
        # OpenAI refuses both. Only a request with an output limit can overrun.
        if body.output_limit() is not None:
            for n in self._prompt_tokens(name, body):
                err = context_error(n, body.output_limit(), self._info[name]["max_model_len"],
                                    "messages" if isinstance(body, ChatRequest) else "prompt")
                if err:
                    raise err
        fields = {**body.requested(), "model": name}
        if isinstance(body, ChatRequest):
            fields["messages"] = body.template_messages()
            ray_body, call = ray_api.ChatCompletionRequest.model_validate(fields), "chat"
        else:
            ray_body, call = ray_api.CompletionRequest.model_validate(fields), "completions"
        try:
            response = await self._process_llm_request(ray_body, call_method=call, raw_request=request)
        except Exception as e:  # noqa: BLE001 - becomes an OpenAI error body
            raise as_api_error(e, request_id(request)) from None
        if isinstance(response, JSONResponse) and response.status_code >= 400:
            err = json.loads(response.body).get("error") or {}
            raise engine_error(response.status_code, str(err.get("message", "")), request_id(request),
                               err.get("param"), err.get("code"))
        if isinstance(response, JSONResponse):
            answer = openai_shape(json.loads(response.body))
            request.state.usage = answer.get("usage")
            return JSONResponse(answer, status_code=response.status_code)
        response.body_iterator = _clean_stream(response.body_iterator)
        return response

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        return await self._generate(body, request)

    async def _probe_generation(self, name: str) -> bool:
        probe = ray_api.CompletionRequest(model=name, prompt="a", max_tokens=1, temperature=0.0)
        response = await self._process_llm_request(probe, call_method="completions")
        return getattr(response, "status_code", 200) == 200

    async def chat(self, body: ChatRequest, request: Request) -> Response:
        return await self._generate(body, request)

    # The mixin's routes win over OpenAiIngress' same-named methods (MRO); spelled out
    # so the route map finds them on this class.
    models = StagesRoutes.models
    model_data = StagesRoutes.model_data
    score = StagesRoutes.score
    classify = StagesRoutes.classify
    fill_mask = StagesRoutes.fill_mask
    health = StagesRoutes.health
