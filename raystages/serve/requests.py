"""The request bodies the server accepts, validated as strictly as OpenAI's API does.

Both engines' routes take these models (FastAPI validates them), so a mistake gets the same
400 whichever engine answers:

- types are strict: ``"max_tokens": "16"`` or ``"stream": "true"`` is refused, not coerced;
- an unknown field is refused, naming it (``Unknown parameter: 'foo'.``, as OpenAI words
  it), and an OpenAI field this server does not implement (tools, response_format, ...)
  says so instead of being silently ignored;
- chat roles are OpenAI's text roles (``system``, ``developer``, ``user``, ``assistant``);
  ``tool``/``function`` messages answer tool calls, which this server never makes;
- ``stop`` is a string or 1-4 strings.

``validation_error`` turns pydantic's errors into the one OpenAI error the client sees,
naming the field as the client spelled it (``messages.0.role``, never a union member's
class name). Limits that depend on the served model (``n``, the context) are checked by
the routes after the model is known: ``context_error``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from raystages.serve.errors import ApiError


class _Strict(BaseModel):
    # strict: no "16" -> 16 or "true" -> True; forbid: an unknown field is the client's mistake.
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    """One part of a message's content given as a list (text only: no images or audio)."""

    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | Annotated[list[TextPart], Field(min_length=1)]
    name: str | None = None

    @field_validator("role", mode="before")
    @classmethod
    def _no_tools(cls, role):
        if role in ("tool", "function"):
            raise PydanticCustomError(
                "tool_message", "'{role}' messages answer an assistant message's tool calls, and this server "
                "serves no tools", {"role": role})
        return role

    def as_template_message(self) -> dict:
        """What the chat template renders: text content, and ``developer`` as ``system``
        (OpenAI's name for system instructions since o1; templates know only ``system``)."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(_Strict):
    include_usage: bool = False


Stop = str | Annotated[list[str], Field(min_length=1, max_length=4)] | None
Penalty = Annotated[float, Field(ge=-2, le=2)]


class _Sampling(_Strict):
    model: str | None = Field(None, description="Model id; may be left out when one model of the kind is served.")
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=128)] = 1  # the served model's own bound: ServedModelSpec.max_n
    stop: Stop = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[int, Field(ge=-100, le=100)]] | None = None
    user: str | None = None  # an end-user id for the caller's own tracking; accepted and not used
    # One of EXTENSIONS: generate to max_tokens past the end token, so a load test gets fixed
    # output lengths (vLLM's benchmark_serving sends it).
    ignore_eos: bool = False

    @field_validator("stream_options")
    @classmethod
    def _only_streaming(cls, v, info):
        if v is not None and not info.data.get("stream"):
            raise PydanticCustomError("stream_options", "only allowed when 'stream' is true")
        return v

    def requested(self) -> dict:
        """The fields the client sent (so an engine's own defaults apply to the rest)."""
        return self.model_dump(exclude_unset=True)


class ChatRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None

    def output_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def template_messages(self) -> list[dict]:
        return [m.as_template_message() for m in self.messages]


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(_Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = 16  # OpenAI's default for completions
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: bool | None = None

    def output_limit(self) -> int | None:
        return self.max_tokens

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: each a text or a list of token ids."""
        p = self.prompt
        return [p] if isinstance(p, str) or isinstance(p[0], int) else list(p)


class ScoreRequest(_Strict):
    """``POST /v1/score``: score each response to ``prompt`` with a reward model."""

    model: str | None = Field(None, description="Scoring model id; default: the only one served.")
    prompt: str | None = Field(None, description="The user turn the responses answer.")
    responses: Annotated[list[str | Annotated[list[ChatMessage], Field(min_length=1)]],
                         Field(min_length=1, max_length=512)] = Field(
        ..., description="Assistant replies, or whole conversations as message lists.")

    def layout(self) -> list[str | list[dict]]:
        return [r if isinstance(r, str) else [m.as_template_message() for m in r] for r in self.responses]


Texts = str | Annotated[list[str], Field(min_length=1, max_length=512)]


class _TextInputs(_Strict):
    input: Texts = Field(..., description="A text or a list of texts.")

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class ClassifyRequest(_TextInputs):
    """``POST /v1/classify``: label each text (or text pair) with a classification head, or
    find its entities with a token-classification head."""

    model: str | None = Field(None, description="Task-head model id; default: the only one served.")
    text_pair: Texts | None = Field(
        None, description="Sequence classification of text pairs: the second text of each input (a text for a "
                          "text, a list as long as `input` for a list), encoded as in training: [CLS] a [SEP] b [SEP].")

    @field_validator("text_pair")
    @classmethod
    def _one_per_input(cls, pair, info):
        given = info.data.get("input")
        if pair is None or given is None:  # no pairs, or `input` itself is invalid (reported as such)
            return pair
        n = 1 if isinstance(given, str) else len(given)
        if isinstance(pair, str) != isinstance(given, str) or (isinstance(pair, list) and len(pair) != n):
            raise PydanticCustomError("text_pair", "needs one second text per input ({n}), of the same shape as "
                                      "'input'", {"n": n})
        return pair

    def pairs(self) -> list[str] | None:
        if self.text_pair is None:
            return None
        return [self.text_pair] if isinstance(self.text_pair, str) else list(self.text_pair)


class FillMaskRequest(_TextInputs):
    """``POST /v1/fill-mask``: the likeliest tokens for each mask token of each text."""

    model: str | None = Field(None, description="Masked-LM model id; default: the only one served.")
    top_k: Annotated[int, Field(ge=1, le=100)] = 5


class ScoreItem(BaseModel):
    object: Literal["score"] = "score"
    index: int
    score: float


class ScoreUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class ScoreResponse(BaseModel):
    """What ``POST /v1/score`` answers (its schema is checked in the tests)."""

    model_config = ConfigDict(extra="forbid")
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ScoreItem]
    usage: ScoreUsage


# OpenAI request fields this server does not implement: named as such, not as unknown.
UNSUPPORTED = frozenset({
    "audio", "function_call", "functions", "metadata", "modalities", "moderation", "parallel_tool_calls",
    "prediction", "prompt_cache_key", "prompt_cache_options", "prompt_cache_retention", "reasoning_effort",
    "response_format", "safety_identifier", "service_tier", "store", "tool_choice", "tools", "verbosity",
    "web_search_options", "best_of", "suffix",
})
# Request fields outside OpenAI's that this server accepts: vLLM's, honoured by both engines.
EXTENSIONS = frozenset({"ignore_eos"})
# Pydantic error types that mean "not this type" (in a union: "not this member").
_TYPE_ERRORS = {"string_type": "a string", "int_type": "an integer", "float_type": "a number",
                "bool_type": "a boolean", "list_type": "an array", "dict_type": "an object",
                "model_type": "an object", "model_attributes_type": "an object", "none_required": "null"}
# How pydantic labels a union member in an error's location ("str", "list[str]",
# "function-after[...]"); no request field is spelled like one.
_MEMBER_LABEL = re.compile(r"^(str|int|float|bool|none|[\w-]+\[.*\]|function-.*|constrained-.*)$")


def _field(loc) -> list[str]:
    """The location as the client spelled it: without ``body`` and union member labels."""
    return [str(x) for x in loc if x != "body" and not (isinstance(x, str) and _MEMBER_LABEL.match(x))]


def validation_error(errors: list[dict]) -> ApiError:
    """The one 400 a client gets for pydantic's ``errors`` (FastAPI's or a model's own):
    the first field in error, named as the client spelled it, with a message that fits
    the mistake (a union whose members all failed on type reads "expected a string or an
    array", not the first member's complaint)."""
    if not errors:
        return ApiError(400, "The request is invalid.", None, "invalid_value")
    if any(e.get("type") == "json_invalid" for e in errors):
        return ApiError(400, "The request body is not valid JSON.", None, "invalid_json")
    # A constraint that failed (too long, out of range, unknown field) says more than a
    # union member's type mismatch, and a deeper mismatch (a list's item) more than a
    # shallower one (the list itself); among equals, the first (field order) wins.
    e = min(errors, key=lambda e: (e.get("type") in _TYPE_ERRORS, -len(_field(e.get("loc", ())))))
    field = _field(e.get("loc", ()))
    param = ".".join(field) or None
    kind = e.get("type")
    if param is None:
        return ApiError(400, "The request body must be a JSON object.", None, "invalid_type")
    if kind == "extra_forbidden":
        if len(field) == 1 and field[0] in UNSUPPORTED:
            return ApiError(400, f"Unsupported parameter: '{param}' is not supported by this server.", param,
                            "unsupported_parameter")
        return ApiError(400, f"Unknown parameter: '{param}'.", param, "unknown_parameter")
    if kind == "missing":
        return ApiError(400, f"{param}: missing required parameter", param, "missing_required_parameter")
    if kind in _TYPE_ERRORS:
        same = [x for x in errors if _field(x.get("loc", ())) == field and x.get("type") in _TYPE_ERRORS]
        wanted = list(dict.fromkeys(_TYPE_ERRORS[x["type"]] for x in same))
        return ApiError(400, f"{param}: expected {' or '.join(wanted)}, got {_json_type(e.get('input'))}", param,
                        "invalid_type")
    if kind in ("too_long", "too_short"):  # pydantic's "List should have at most 4 items after validation, not 5"
        ctx, most = e.get("ctx") or {}, kind == "too_long"
        bound = ctx.get("max_length" if most else "min_length")
        return ApiError(400, f"{param}: {'at most' if most else 'at least'} {bound} item{'s' * (bound != 1)} "
                        f"(got {ctx.get('actual_length')})", param, "invalid_value")
    got = e.get("input")
    shown = f" (got {got!r})" if kind in ("literal_error", "enum") and isinstance(got, str) and len(got) <= 40 else ""
    return ApiError(400, f"{param}: {e.get('msg', 'invalid value')}{shown}", param, "invalid_value")


def _json_type(value: Any) -> str:
    for t, name in ((bool, "a boolean"), (str, "a string"), (int, "an integer"), (float, "a number"),
                    (list, "an array"), (dict, "an object"), (type(None), "null")):
        if isinstance(value, t):
            return name
    return type(value).__name__


def check_n(n: int, max_n: int) -> None:
    if n > max_n:
        raise ApiError(400, f"n: at most {max_n} choices per request on this server (got {n})", "n", "invalid_value")


def context_error(prompt_tokens: int, max_tokens: int | None, max_model_len: int,
                  prompt_param: str = "prompt") -> ApiError | None:
    """The 400 for a prompt that, with the tokens asked for, does not fit the context
    (OpenAI's ``context_length_exceeded``); None when it fits. ``max_tokens`` None: the
    reply may take what the prompt leaves, so only the prompt must leave room for one."""
    if prompt_tokens >= max_model_len:
        return ApiError(400, f"This model's maximum context length is {max_model_len} tokens, but the prompt has "
                        f"{prompt_tokens} tokens. Please reduce the length of the prompt.", prompt_param,
                        "context_length_exceeded")
    if max_tokens is not None and prompt_tokens + max_tokens > max_model_len:
        return ApiError(400, f"This model's maximum context length is {max_model_len} tokens, but you requested "
                        f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} for the "
                        f"completion). Please reduce the prompt or max_tokens.", "max_tokens",
                        "context_length_exceeded")
    return None
