"""OpenAI-shaped errors: the body every refusal leaves as, and the mapping of an engine's
exceptions and error bodies to it without internals (stack traces, hosts, ids, paths).

    {"error": {"message": str, "type": str, "param": str | null, "code": str | null}}
"""

from __future__ import annotations

import logging
import re
from typing import Any

from pydantic import BaseModel
from starlette.responses import JSONResponse

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
