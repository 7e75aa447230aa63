"""The OpenAI routes in front of the transformers engine (``hf_engine.HFEngine``).

With vLLM, Ray Serve LLM provides these routes; without it this module does, with the
same paths, the same strict request models (``requests``), the same response shapes and the
same errors, so clients cannot tell which engine answers.
"""

from __future__ import annotations

import time
import uuid
from fastapi import Request
from starlette.responses import JSONResponse, StreamingResponse

from raystages.serve.requests import ChatRequest, CompletionRequest
from raystages.serve.routes import ApiError, StagesRoutes, reject_invalid_text, sse

# Request fields valid for OpenAI (and vLLM) that this engine cannot honour: a 400 naming
# the field when sent with a value that would change the answer, never silently ignored.
_NOT_ON_THIS_ENGINE = ("logprobs", "top_logprobs", "echo", "presence_penalty", "frequency_penalty", "logit_bias")


def _refuse_unsupported(body) -> None:
    for name in _NOT_ON_THIS_ENGINE:
        if getattr(body, name, None):
            raise ApiError(400, f"Unsupported parameter: '{name}' is not supported by the transformers engine.",
                           name, "unsupported_parameter")


class HFIngress(StagesRoutes):
    def __init__(self, engines: dict, *, models_info: dict, scorers: dict):
        self._engines = {name: h.options(stream=True) for name, h in engines.items()}
        self._init_routes(models_info, scorers)

    async def completions(self, body: CompletionRequest, request: Request):
        return await self._run(body, request, {"prompts": body.prompts(), "max_tokens": body.max_tokens}, chat=False)

    async def chat(self, body: ChatRequest, request: Request):
        return await self._run(body, request, {"messages": body.template_messages(),
                                               "max_tokens": body.output_limit()}, chat=True)

    async def _probe_generation(self, name: str) -> bool:
        events = self._engines[name].generate.remote(
            {"prompts": ["a"], "max_tokens": 1, "temperature": 0.0, "top_p": 1.0, "n": 1, "stop": None,
             "seed": None, "stream": False})
        ok = "error" not in await events.__anext__()
        async for _ in events:  # drain: the engine finishes the request either way
            pass
        return ok

    async def _run(self, body: ChatRequest | CompletionRequest, request: Request, req: dict, chat: bool):
        name = request.state.model = self._generation_model(body)
        reject_invalid_text({k: getattr(body, k, None) for k in ("prompt", "messages", "stop")})
        _refuse_unsupported(body)
        stop = [body.stop] if isinstance(body.stop, str) else body.stop
        req.update(temperature=1.0 if body.temperature is None else body.temperature,
                   top_p=1.0 if body.top_p is None else body.top_p, n=body.n, stop=stop, seed=body.seed,
                   stream=body.stream, ignore_eos=body.ignore_eos)
        events = self._engines[name].generate.remote(req)
        first = await events.__anext__()
        if "error" in first:
            raise ApiError(400, first["error"], first.get("param"), first.get("code"))
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": name}
        prompt_tokens = sum(first["prompt_tokens"])
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._stream(head, events, chat, prompt_tokens, usage),
                                     media_type="text/event-stream")
        texts, finish, used = {}, {}, {}
        async for ev in events:
            i = ev["index"]
            texts[i] = texts.get(i, "") + ev["text"]
            used[i] = ev["completion_tokens"]
            if ev["finish_reason"]:
                finish[i] = ev["finish_reason"]
        choices = []
        for i in sorted(texts):
            if chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": texts[i], "refusal": None},
                                "logprobs": None, "finish_reason": finish.get(i, "length")})
            else:
                choices.append({"index": i, "text": texts[i], "logprobs": None, "finish_reason": finish.get(i, "length")})
        completion_tokens = sum(used.values())
        request.state.usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                               "total_tokens": prompt_tokens + completion_tokens}
        return JSONResponse({**head, "choices": choices, "usage": request.state.usage})

    async def _stream(self, head: dict, events, chat: bool, prompt_tokens: int, include_usage: bool):
        obj = "chat.completion.chunk" if chat else "text_completion"
        used: dict[int, int] = {}
        started: set[int] = set()
        async for ev in events:
            i = ev["index"]
            used[i] = ev["completion_tokens"]
            if not ev["text"] and not ev["finish_reason"] and i in started:
                continue
            if chat:
                delta = {} if i in started else {"role": "assistant"}
                if ev["text"] or i not in started:
                    delta["content"] = ev["text"]
                choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": ev["finish_reason"]}
            else:
                choice = {"index": i, "text": ev["text"], "logprobs": None, "finish_reason": ev["finish_reason"]}
            started.add(i)
            yield sse({**head, "object": obj, "choices": [choice]})
        if include_usage:
            done = sum(used.values())
            yield sse({**head, "object": obj, "choices": [], "usage": {
                "prompt_tokens": prompt_tokens, "completion_tokens": done, "total_tokens": prompt_tokens + done}})
        yield "data: [DONE]\n\n"

    models = StagesRoutes.models
    model_data = StagesRoutes.model_data
    score = StagesRoutes.score
    classify = StagesRoutes.classify
    fill_mask = StagesRoutes.fill_mask
    health = StagesRoutes.health

