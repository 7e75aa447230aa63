"""What every engine's ingress shares: the FastAPI app (API-key check, OpenAI-shaped
errors), and the routes that do not generate: ``/v1/models``, ``/health``, ``/ready``,
``/metrics``, ``/v1/score`` (reward models), ``/v1/classify`` (task heads) and
``/v1/fill-mask`` (masked LMs).

Nothing here imports vLLM or ``ray.serve.llm``, so the transformers engine can use it on
machines without them. Errors leave as OpenAI's error body (``errors``) with a 4xx status
for the client's mistakes, and the server keeps serving; request bodies are validated by the
strict models in ``requests``.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from ray.exceptions import TaskCancelledError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from raystages.serve.errors import (REQUEST_ID_HEADER, ApiError, as_api_error, engine_error,  # noqa: F401
                                    error_response, reject_invalid_text)
from raystages.serve.metrics import RequestTimer
from raystages.serve.requests import (ClassifyRequest, FillMaskRequest, ScoreRequest, ScoreResponse, check_n,
                                      validation_error)

HEALTH_PATHS = ("/health", "/ready", "/metrics")  # open without the API key: probes and scrapers
# How long a model's engine may take to answer the readiness probe (one token) before
# /ready calls it not ready: short, so a dead engine shows within seconds, not after
# the request timeout (a busy engine answers one token in far less).
READY_DEADLINE_S = 3.0
# Each model kind's routes, and the word an error uses for it.
ROUTES_OF_KIND = {"generate": "POST /v1/completions or /v1/chat/completions", "score": "POST /v1/score",
                  "classify": "POST /v1/classify", "fill-mask": "POST /v1/fill-mask"}
KIND_WORD = {"generate": "generation", "score": "scoring", "classify": "classification", "fill-mask": "fill-mask"}


def request_id(request: Request) -> str | None:
    """The id ``_Guard`` gave this request (also in the response's ``x-request-id``)."""
    return request.scope.get("state", {}).get("request_id")


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(validation_error(list(exc.errors())))


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return error_response(ApiError(exc.status_code, str(exc.detail), None, code))


async def _on_api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc)


def _disconnect_on_cancel(receive):
    """``receive``, with a client that went away reported as ASGI reports it: a disconnect
    message. Serve's receive proxy does that when the proxy has already forgotten the request,
    but when the proxy cancels its pending receive call (the client dropped a stream) it raises
    that call's ``TaskCancelledError`` into the app: the stream would end in an exception,
    Serve would log "Request failed." with a traceback and the request would count as a 500."""

    async def receive_or_disconnect():
        try:
            return await receive()
        except TaskCancelledError:
            return {"type": "http.disconnect"}

    return receive_or_disconnect


class _Guard:
    """Pure ASGI middleware (so streaming passes through untouched): checks the API key,
    and turns an exception that escaped a route before any byte was sent into an
    OpenAI-shaped error instead of a bare 500."""

    def __init__(self, app, api_key: str | None = None):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        receive = _disconnect_on_cancel(receive)
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
                timer.failed = True
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


class StagesRoutes:
    """Mixed into each engine's ingress. ``models_info`` maps model id -> {kind: generate |
    score | classify | fill-mask, created, max_model_len, stage, root}; ``scorers`` maps the
    ids of the models that do not generate to their deployments' handles."""

    def _init_routes(self, models_info: dict[str, dict], scorers: dict[str, Any]):
        self._info = models_info
        self._scorers = scorers

    def _resolve_model(self, name: str | None, kind: str) -> str:
        """The served model ``name`` names for a route serving ``kind`` (see ROUTES_OF_KIND).
        The same mistake gets the same answer on every route, as OpenAI answers it: an
        unknown model and a model of another kind are both 404 on ``model``."""
        of_kind = sorted(m for m, i in self._info.items() if i["kind"] == kind)
        what = KIND_WORD[kind]
        if name is None:
            if len(of_kind) == 1:
                return of_kind[0]
            if not of_kind:
                raise ApiError(404, f"No {what} model is served.", "model", "model_not_found")
            raise ApiError(400, f"model: required when several {what} models are served; one of {of_kind}",
                           "model", "missing_required_parameter")
        if name not in self._info:
            raise ApiError(404, f"The model `{name}` does not exist. Served: {sorted(self._info)}", "model",
                           "model_not_found")
        if self._info[name]["kind"] != kind:
            route = ROUTES_OF_KIND[self._info[name]["kind"]]
            raise ApiError(404, f"The model `{name}` is not a {what} model and is not supported on this route: "
                           f"use {route}.", "model", "model_not_supported")
        return name

    def _generation_model(self, body) -> str:
        """The generation model of a chat or completion request, with its per-model limits checked."""
        name = self._resolve_model(body.model, "generate")
        check_n(body.n, self._info[name]["max_n"])
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
                kind = self._info[name]["kind"]
                if kind == "score":
                    out = await asyncio.wait_for(self._scorers[name].score.remote(None, ["a"]), READY_DEADLINE_S)
                    ok = "scores" in out
                elif kind in ("classify", "fill-mask"):
                    ok = await asyncio.wait_for(self._scorers[name].probe.remote(), READY_DEADLINE_S)
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

    async def score(self, body: ScoreRequest, request: Request):
        name = request.state.model = self._resolve_model(body.model, "score")
        reject_invalid_text({"prompt": body.prompt, "responses": body.responses})
        out = await self._scorers[name].score.remote(body.prompt, body.layout())
        if "error" in out:
            raise ApiError(400, out["error"], out.get("param"), out.get("code"))
        request.state.usage = {"prompt_tokens": out["tokens"]}
        return JSONResponse(ScoreResponse(
            id=f"score-{uuid.uuid4().hex}", created=int(time.time()), model=name,
            data=[{"index": i, "score": s} for i, s in enumerate(out["scores"])],
            usage={"prompt_tokens": out["tokens"], "total_tokens": out["tokens"]}).model_dump())

    async def _task_head(self, request: Request, kind: str, call: str, body, *args) -> dict:
        name = request.state.model = self._resolve_model(body.model, kind)
        reject_invalid_text(body.model_dump(exclude={"model"}))  # every text the route reads
        out = await getattr(self._scorers[name], call).remote(body.texts(), *args)
        if "error" in out:
            raise ApiError(400, out["error"], out.get("param"), out.get("code"))
        request.state.usage = {"prompt_tokens": out["tokens"]}
        return {"id": f"{kind}-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": name,
                "usage": {"prompt_tokens": out["tokens"], "total_tokens": out["tokens"]}, "results": out["results"]}

    async def classify(self, body: ClassifyRequest, request: Request):
        """Labels with probabilities (classification, of texts or text pairs) or entities with
        character offsets (token classification), one item per input text."""
        out = await self._task_head(request, "classify", "classify", body, body.pairs())
        out["data"] = [{"object": "classification", "index": i, **r} for i, r in enumerate(out.pop("results"))]
        return JSONResponse(out)

    async def fill_mask(self, body: FillMaskRequest, request: Request):
        """The ``top_k`` likeliest tokens for each mask token, one item per input text."""
        out = await self._task_head(request, "fill-mask", "fill_mask", body, body.top_k)
        out["data"] = [{"object": "fill_mask", "index": i, "masks": r} for i, r in enumerate(out.pop("results"))]
        return JSONResponse(out)


ROUTE_SPECS = {
    # method name -> (HTTP method, path); each ingress builds its endpoint map from it.
    "models": ("GET", "/v1/models"),
    "model_data": ("GET", "/v1/models/{model:path}"),
    "completions": ("POST", "/v1/completions"),
    "chat": ("POST", "/v1/chat/completions"),
    "score": ("POST", "/v1/score"),
    "classify": ("POST", "/v1/classify"),
    "fill_mask": ("POST", "/v1/fill-mask"),
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
