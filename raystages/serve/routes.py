"""What every engine's ingress shares: the FastAPI app (API-key check, OpenAI-shaped
errors), and the routes that do not generate: ``/v1/models``, ``/health``, ``/v1/score``.

Nothing here imports vLLM or ``ray.serve.llm``, so the transformers engine can use it on
machines without them. Errors always leave as

    {"error": {"message": str, "type": str, "param": str | null, "code": str | null}}

with a 4xx status for the client's mistakes, and the server keeps serving.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from raystages.serve.metrics import RequestTimer

HEALTH_PATHS = ("/health", "/ready", "/metrics")  # open without the API key: probes and scrapers
# How long a model's engine may take to answer the readiness probe (one token) before
# /ready calls it not ready: short, so a dead engine shows within seconds, not after
# the request timeout (a busy engine answers one token in far less).
READY_DEADLINE_S = 3.0
_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
                405: "invalid_request_error", 408: "timeout", 413: "invalid_request_error",
                422: "invalid_request_error", 429: "rate_limit_error"}


class ApiError(Exception):
    """A request the server refuses, with what the OpenAI error body says about it."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_response(err: ApiError) -> JSONResponse:
    body = {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(body, status_code=err.status, headers=headers)


# What marks an engine's message as carrying internals (a stack trace, colour codes, actor
# and process ids, file paths): such text goes to the server log, never to the client.
_INTERNALS = re.compile(r"Traceback|\x1b\[|File \"|site-packages|ray::|pid=|ActorId|\bip=|\n")
_LOG = logging.getLogger("raystages.serve")
REQUEST_ID_HEADER = "x-request-id"


def as_api_error(e: BaseException, request_id: str | None = None) -> ApiError:
    """Map an exception from an engine (vLLM, Ray Serve LLM, ours) to an :class:`ApiError`.

    A short one-line message from a request validator (vLLM's "maximum context length is
    ...") reaches the client as it is; anything longer or carrying internals is replaced by
    a fixed message for its class, and the detail is logged with the request id that the
    response also carries in ``x-request-id``."""
    if isinstance(e, ApiError):
        return e
    status = getattr(e, "status_code", None)
    message = getattr(e, "message", None) or getattr(e, "detail", None) or str(e)
    if status is None:
        # Request validators (pydantic's, vLLM's VLLMClientError family) blame the client.
        client = isinstance(e, (ValueError, TypeError)) or any(
            c.__name__ == "VLLMClientError" for c in type(e).__mro__)
        status = 400 if client else 500
    return engine_error(int(status), str(message), request_id, exc=e)


def engine_error(status: int, message: str, request_id: str | None = None, param: str | None = None,
                 code: str | None = None, exc: BaseException | None = None) -> ApiError:
    """The client's view of an engine's error (raised, or returned as an error body)."""
    if status >= 500:  # the details go to the replica's log, not to the client
        _LOG.error("request %s failed: %s", request_id or "-", message, exc_info=exc)
        return ApiError(status, "The server had an error while processing the request.", code="internal_error")
    message = re.sub(r"\s*\(Request ID: [^)]*\)", "", message.strip()).removeprefix(
        "vllm.exceptions.VLLMValidationError: ")
    if len(message) > 400 or _INTERNALS.search(message):
        _LOG.warning("request %s refused: %s", request_id or "-", message)
        return ApiError(status, "The request could not be processed: its input is invalid "
                        "(for example text that is not valid Unicode).", None, "invalid_request")
    named = re.search(r"\(parameter=(\w+)", message)
    if "context length" in message or "max_model_len" in message:
        code = "context_length_exceeded"
    return ApiError(status, message, param or (named.group(1) if named else None), code)


_SURROGATE = re.compile("[\ud800-\udfff]")


def reject_invalid_text(fields: dict[str, Any]) -> None:
    """400 naming the field when any text in ``fields`` (prompts, messages, stop strings)
    holds an unpaired UTF-16 surrogate: JSON allows ``"\\ud800"``, no tokenizer does."""
    def walk(node, where):
        if isinstance(node, str):
            if _SURROGATE.search(node):
                raise ApiError(400, f"{where}: not valid Unicode text (an unpaired surrogate)", where,
                               "invalid_value")
        elif isinstance(node, BaseModel):
            walk(node.model_dump(), where)
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{where}.{k}")
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, f"{where}.{i}")

    for name, value in fields.items():
        walk(value, name)


def request_id(request: Request) -> str | None:
    """The id ``_Guard`` gave this request (also in the response's ``x-request-id``)."""
    return request.scope.get("state", {}).get("request_id")


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request", "type": ""}
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    if err.get("type") == "json_invalid":
        return error_response(ApiError(400, "The request body is not valid JSON.", None, "invalid_json"))
    # Union members show up in the location ("prompt.str", "prompt.list[int]"): keep the field.
    member = re.compile(r"^(str|int|float|bool|function-.*|.*\[.*)$")
    param = ".".join(x for x in loc if not member.match(x)) or None
    what = "missing required parameter" if err.get("type") == "missing" else err.get("msg", "invalid value")
    code = "missing_required_parameter" if err.get("type") == "missing" else "invalid_value"
    return error_response(ApiError(400, f"{param or 'body'}: {what}", param, code))


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return error_response(ApiError(exc.status_code, str(exc.detail), None, code))


async def _on_api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc)


class _Guard:
    """Pure ASGI middleware (so streaming passes through untouched): checks the API key,
    and turns an exception that escaped a route before any byte was sent into an
    OpenAI-shaped error instead of a bare 500."""

    def __init__(self, app, api_key: str | None = None):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        # The client's id when it sent a sane one (a load balancer's), else a fresh one.
        given_id = headers.get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")
        rid = given_id if re.fullmatch(r"[\w.:-]{1,128}", given_id) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        started = False
        path, root = scope.get("path", ""), scope.get("root_path", "")
        path = path[len(root):] if root and path.startswith(root) else path
        timer = RequestTimer(path)

        async def tagged_send(message):
            nonlocal started
            timer.on_message(message)
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []),
                                                  (REQUEST_ID_HEADER.encode(), rid.encode())]}
            await send(message)

        try:
            if self.api_key and path not in HEALTH_PATHS:
                given = headers.get(b"authorization", b"").decode("latin-1")
                token = given[7:] if given.lower().startswith("bearer ") else ""
                if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                    msg = ("Missing API key: send `Authorization: Bearer <key>`." if not token
                           else "Incorrect API key provided.")
                    return await error_response(ApiError(401, msg, None, "invalid_api_key"))(
                        scope, receive, tagged_send)
            await self.app(scope, receive, tagged_send)
        except Exception as e:  # noqa: BLE001 - the last line of defence for one request
            if started:
                raise
            await error_response(as_api_error(e, rid))(scope, receive, tagged_send)
        finally:
            timer.done(state)


def make_api(api_key: str | None) -> FastAPI:
    """The FastAPI app every ingress is built on."""
    app = FastAPI(title="raystages", docs_url=None, redoc_url=None)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(ApiError, _on_api_error)
    app.add_middleware(_Guard, api_key=api_key)
    return app


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str


class ScoreBody(BaseModel):
    """``POST /v1/score``: score each response to ``prompt`` with a reward model."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, description="Scoring model id; default: the only one served.")
    prompt: str | None = Field(None, description="The user turn the responses answer.")
    responses: list[str | list[Message]] = Field(..., min_length=1, max_length=512,
                                                 description="Assistant replies, or whole conversations as message lists.")


class StagesRoutes:
    """Mixed into each engine's ingress. ``models_info`` maps model id -> {kind: generate |
    score, created, max_model_len, stage, root}; ``scorers`` maps scoring ids -> handles."""

    def _init_routes(self, models_info: dict[str, dict], scorers: dict[str, Any]):
        self._info = models_info
        self._scorers = scorers

    def _generation_model(self, name: str | None) -> str:
        gen = [m for m, i in self._info.items() if i["kind"] == "generate"]
        if name is None:
            if len(gen) == 1:
                return gen[0]
            raise ApiError(400, f"model: required when several models are served; one of {gen}", "model",
                           "missing_required_parameter")
        if name not in self._info:
            raise ApiError(404, f"The model `{name}` does not exist. Served: {sorted(self._info)}", "model",
                           "model_not_found")
        if self._info[name]["kind"] != "generate":
            raise ApiError(400, f"The model `{name}` is a scoring model: use POST /v1/score", "model",
                           "model_not_supported")
        return name

    def _card(self, name: str) -> dict:
        i = self._info[name]
        return {"id": name, "object": "model", "created": i["created"], "owned_by": "raystages",
                "root": i.get("root"), "parent": None, "max_model_len": i.get("max_model_len"),
                "stage": i.get("stage"), "task": i["kind"]}

    async def models(self):
        return JSONResponse({"object": "list", "data": [self._card(m) for m in self._info]})

    async def model_data(self, model: str):
        if model not in self._info:
            raise ApiError(404, f"The model `{model}` does not exist.", "model", "model_not_found")
        return JSONResponse(self._card(model))

    async def health(self):
        """Liveness: the ingress answers. Says nothing about the engines (see ``ready``)."""
        return JSONResponse({"status": "ok", "models": sorted(self._info)})

    async def metrics(self):
        """Prometheus text: this ingress's request metrics, Serve's and vLLM's (see serve.metrics)."""
        from starlette.responses import PlainTextResponse

        from raystages.serve.metrics import exposition

        return PlainTextResponse(await exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def ready(self):
        """Readiness: every model's engine answers a trivial request within the deadline;
        503 naming those that did not."""
        import asyncio

        async def probe(name: str) -> str | None:
            try:
                if self._info[name]["kind"] == "score":
                    out = await asyncio.wait_for(self._scorers[name].score.remote(None, ["a"]), READY_DEADLINE_S)
                    ok = "scores" in out
                else:
                    ok = await asyncio.wait_for(self._probe_generation(name), READY_DEADLINE_S)
                return None if ok else "its engine answered with an error"
            except asyncio.TimeoutError:
                return f"no answer within {READY_DEADLINE_S:g} s"
            except Exception as e:  # noqa: BLE001 - a dead replica, an engine restarting
                logging.getLogger("raystages.serve").warning("readiness probe of %s failed: %r", name, e)
                return f"its engine failed ({type(e).__name__})"

        names = sorted(self._info)
        problems = dict(zip(names, await asyncio.gather(*(probe(n) for n in names))))
        not_ready = {n: why for n, why in problems.items() if why}
        if not_ready:
            return JSONResponse({"status": "not ready", "not_ready": not_ready, "models": names}, status_code=503)
        return JSONResponse({"status": "ready", "models": names})

    async def _probe_generation(self, name: str) -> bool:
        """One greedy token from ``name``'s engine; True when it came back. Per engine."""
        raise NotImplementedError

    async def score(self, body: ScoreBody, request: Request):
        names = sorted(self._scorers)
        name = body.model or (names[0] if len(names) == 1 else None)
        if name is None:
            raise ApiError(400 if names else 404, f"model: name one of the scoring models {names}" if names
                           else "No scoring model is served.", "model", "model_not_found")
        if name not in self._scorers:
            raise ApiError(404, f"The model `{name}` is not a scoring model. Scoring: {names}", "model", "model_not_found")
        request.state.model = name
        responses = [r if isinstance(r, str) else [m.model_dump() for m in r] for r in body.responses]
        out = await self._scorers[name].score.remote(body.prompt, responses)
        if "error" in out:
            raise ApiError(400, out["error"], out.get("param"), out.get("code"))
        request.state.usage = {"prompt_tokens": out["tokens"]}
        return JSONResponse({
            "id": f"score-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": name,
            "data": [{"object": "score", "index": i, "score": s} for i, s in enumerate(out["scores"])],
            "usage": {"prompt_tokens": out["tokens"], "total_tokens": out["tokens"]}})


ROUTE_SPECS = {
    # method name -> (HTTP method, path); each ingress builds its endpoint map from it.
    "models": ("GET", "/v1/models"),
    "model_data": ("GET", "/v1/models/{model:path}"),
    "completions": ("POST", "/v1/completions"),
    "chat": ("POST", "/v1/chat/completions"),
    "score": ("POST", "/v1/score"),
    "health": ("GET", "/health"),
    "ready": ("GET", "/ready"),
    "metrics": ("GET", "/metrics"),
}


def ingress_class(cls: type, app: FastAPI) -> type:
    """``cls`` as a Ray Serve ingress: its methods named in ROUTE_SPECS become ``app``'s
    routes (what ``ray.serve.llm``'s ``make_fastapi_ingress`` does, with our route map)."""
    from ray import serve

    methods = {}
    for name, (method, path) in ROUTE_SPECS.items():
        # Every GET also answers HEAD (probes and `curl -I`), as HTTP servers are expected to.
        verbs = ["GET", "HEAD"] if method == "GET" else [method]
        methods[name] = app.api_route(path, methods=verbs)(getattr(cls, name))
    new_cls = type(cls.__name__, (cls,), methods)
    new_cls.__qualname__ = cls.__qualname__
    return serve.ingress(app)(new_cls)


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"
