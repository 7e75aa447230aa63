"""Shared by the serve tests: the OpenAI OpenAPI validator, a reward checkpoint, the
bad-request cases, transformers' own answers to compare the server with."""

from __future__ import annotations

import copy
import functools
import json
import socket
from pathlib import Path



@functools.lru_cache(maxsize=1)
def _openapi() -> dict:
    import yaml

    from tests.conftest import shared_data

    doc = yaml.load(shared_data("openai_openapi", "openapi.yaml").read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    return _honour_nullable(doc)


def _honour_nullable(node):
    """The file says OpenAPI 3.1 (JSON Schema 2020-12) yet still marks some fields with the
    3.0 keyword ``nullable: true`` (e.g. streamed chat ``choices[].logprobs``), which JSON
    Schema ignores. Read it as its authors meant: the field may also be null."""
    if isinstance(node, dict):
        node = {k: _honour_nullable(v) for k, v in node.items()}
        if node.get("nullable") is True and isinstance(node.get("type"), str):
            node["type"] = [node["type"], "null"]
            if "enum" in node:
                node["enum"] = [*node["enum"], None]
        return node
    if isinstance(node, list):
        return [_honour_nullable(v) for v in node]
    return node


@functools.lru_cache(maxsize=None)
def _validator(schema: str, nullable_finish_reason: bool = False):
    from jsonschema import Draft202012Validator
    from referencing import Registry, Resource

    doc = _openapi()
    if nullable_finish_reason:
        # The OpenAI API streams completion chunks with `finish_reason: null` until the last
        # one, but both the OpenAPI schema and the `openai` client's type say it is a
        # non-null enum; only for streamed completion chunks do we allow null (the final
        # chunk is validated against the unmodified schema).
        doc = copy.deepcopy(doc)
        fr = doc["components"]["schemas"][schema]["properties"]["choices"]["items"]["properties"]["finish_reason"]
        fr["enum"] = [*fr["enum"], None]
        fr["type"] = ["string", "null"]
    registry = Registry().with_resource("openapi", Resource.opaque(doc))
    return Draft202012Validator({"$ref": f"openapi#/components/schemas/{schema}"}, registry=registry)


def validate(body: dict, schema: str, nullable_finish_reason: bool = False) -> None:
    """Fail, naming the first offending field, unless ``body`` matches the OpenAI schema."""
    from jsonschema.exceptions import best_match

    errors = list(_validator(schema, nullable_finish_reason).iter_errors(body))
    if errors:
        e = best_match(errors)
        raise AssertionError(f"{schema} at {list(e.absolute_path)}: {e.message[:300]}\n{dumps(body)}")


def openapi_request_fields(schema: str) -> set[str]:
    """The properties of an OpenAPI request schema, through its ``allOf`` parts."""
    schemas = _openapi()["components"]["schemas"]
    out: set[str] = set()
    for part in schemas[schema].get("allOf", [schemas[schema]]):
        out |= openapi_request_fields(part["$ref"].rsplit("/", 1)[1]) if "$ref" in part else set(part.get("properties", {}))
    return out


class RecordingTransport:
    """An ``httpx`` transport over the real one that keeps every response body (streams
    read to the end first), so a test can check each against the OpenAPI schema after the
    ``openai`` client has parsed it."""

    def __init__(self):
        import httpx

        self.inner, self.seen = httpx.HTTPTransport(), []

    def handle_request(self, request):
        import httpx

        r = self.inner.handle_request(request)
        body = r.read()
        r.close()
        self.seen.append((request.url.path, r.status_code, body))
        headers = [(k, v) for k, v in r.headers.items() if k.lower() not in ("content-length", "transfer-encoding")]
        return httpx.Response(r.status_code, headers=headers, content=body, request=request)

    def close(self):
        self.inner.close()


def check_recorded_bodies(seen: list[tuple[str, int, bytes]], score_schema: dict) -> list[str]:
    """Validate each recorded body against its OpenAPI schema (ours for ``/v1/score``);
    returns the schema names checked, one per body or stream chunk."""
    import jsonschema

    checked = []
    for path, status, raw in seen:
        text = raw.decode()
        if status >= 400:
            validate(json.loads(text), "ErrorResponse")
            checked.append("ErrorResponse")
        elif path.endswith("/score"):
            jsonschema.validate(json.loads(text), score_schema)
            checked.append("ScoreResponse")
        elif path.endswith("/models"):
            validate(json.loads(text), "ListModelsResponse")
            checked.append("ListModelsResponse")
        elif "/models/" in path:
            validate(json.loads(text), "Model")
            checked.append("Model")
        elif text.startswith("data:"):
            events = sse_events(text)
            assert events[-1] == "[DONE]", text[-200:]
            chat = path.endswith("/chat/completions")
            for e in events[:-1]:
                chunk = json.loads(e)
                # Completion chunks stream `finish_reason: null` until the last, as OpenAI's do
                # (its schema says non-null; see test_streams_end_in_done_and_match_non_streamed).
                final = not chunk["choices"] or chunk["choices"][0]["finish_reason"] is not None
                validate(chunk, "CreateChatCompletionStreamResponse" if chat else "CreateCompletionResponse",
                         nullable_finish_reason=not chat and not final)
                checked.append("CreateChatCompletionStreamResponse" if chat else "CreateCompletionResponse(chunk)")
        else:
            name = "CreateChatCompletionResponse" if path.endswith("/chat/completions") else "CreateCompletionResponse"
            validate(json.loads(text), name)
            checked.append(name)
    return checked


def sse_events(text: str) -> list[str]:
    """The ``data:`` payloads of a server-sent-events body, in order."""
    return [line[6:] for line in text.split("\n") if line.startswith("data: ")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_reward_checkpoint(base: Path, out: Path, seed: int = 1) -> Path:
    """A ``LlamaForSequenceClassification`` (one label) with ``base``'s config and tokenizer."""
    import torch
    from transformers import AutoConfig, LlamaForSequenceClassification

    from raystages.models import load_tokenizer

    tok = load_tokenizer(str(base))
    cfg = AutoConfig.from_pretrained(base)
    cfg.num_labels, cfg.pad_token_id, cfg.architectures = 1, tok.pad_token_id, None
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(cfg)
    with torch.no_grad():  # a visible spread of scores: random heads give near-equal logits
        model.score.weight.mul_(50)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def transformers_scores(ckpt: Path, texts: list[str]) -> list[float]:
    """Scores from the checkpoint loaded directly, one unpadded text at a time."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForSequenceClassification.from_pretrained(ckpt).eval()
    out = []
    with torch.no_grad():
        for t in texts:
            ids = tok(t, return_tensors="pt", add_special_tokens=False)["input_ids"]
            out.append(float(model(input_ids=ids).logits[0, 0]))
    return out


def task_prompts(n: int) -> list[str]:
    """Held-out prompts of the built-in task, in the pretraining corpus' "x = y" layout."""
    from raystages.task.splits import pretrain_texts

    lines = [line for text in pretrain_texts("val", 20) for line in text.split("\n") if " = " in line]
    return [line.split(" = ")[0] + " =" for line in lines[:n]]


LONG = "a " * 600  # over the served context of every test checkpoint

# (name, route, body or raw bytes, expected status, expected param or None[, expected code])
BAD_REQUESTS = [
    ("malformed json", "completions", b'{"model": "pretrain", "prompt": ', 400, None),
    ("body not an object", "completions", b'["pretrain"]', 400, None),
    ("missing prompt", "completions", {"model": "pretrain"}, 400, "prompt"),
    ("missing messages", "chat/completions", {"model": "pretrain"}, 400, "messages"),
    ("unknown model", "completions", {"model": "nope", "prompt": "a"}, 404, "model"),
    ("unknown model chat", "chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "a"}]}, 404, "model"),
    ("scoring model for generation", "completions", {"model": "reward", "prompt": "a"}, 404, "model", "model_not_supported"),
    ("scoring model for chat", "chat/completions", {"model": "reward", "messages": [{"role": "user", "content": "a"}]}, 404, "model", "model_not_supported"),
    ("max_tokens zero", "completions", {"model": "pretrain", "prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens negative", "chat/completions", {"model": "pretrain", "messages": [{"role": "user", "content": "a"}], "max_tokens": -5}, 400, "max_tokens"),
    ("max_tokens beyond context", "completions", {"model": "pretrain", "prompt": "a", "max_tokens": 100000}, 400, "max_tokens"),
    ("temperature negative", "completions", {"model": "pretrain", "prompt": "a", "temperature": -0.5}, 400, "temperature"),
    ("prompt longer than context", "completions", {"model": "pretrain", "prompt": LONG, "max_tokens": 1}, 400, None),
    ("chat longer than context", "chat/completions", {"model": "pretrain", "messages": [{"role": "user", "content": LONG}]}, 400, None),
    ("prompt wrong type", "completions", {"model": "pretrain", "prompt": {"text": "a"}}, 400, "prompt"),
    ("max_tokens wrong type", "completions", {"model": "pretrain", "prompt": "a", "max_tokens": "many"}, 400, "max_tokens"),
    ("temperature wrong type", "completions", {"model": "pretrain", "prompt": "a", "temperature": "hot"}, 400, "temperature"),
    ("messages wrong type", "chat/completions", {"model": "pretrain", "messages": "hello"}, 400, "messages"),
    ("score without responses", "score", {"model": "reward", "prompt": "a"}, 400, "responses"),
    ("score empty responses", "score", {"model": "reward", "prompt": "a", "responses": []}, 400, "responses"),
    ("score unknown model", "score", {"model": "nope", "prompt": "a", "responses": ["b"]}, 404, "model"),
    ("score generation model", "score", {"model": "pretrain", "prompt": "a", "responses": ["b"]}, 404, "model", "model_not_supported"),
    ("lone surrogate in prompt", "completions", b'{"model": "pretrain", "prompt": "a\\ud800b", "max_tokens": 1}', 400, "prompt"),
    ("lone surrogate in chat", "chat/completions",
     b'{"model": "pretrain", "messages": [{"role": "user", "content": "a\\ud800b"}]}', 400, "messages.0.content"),
    ("score response too long", "score", {"model": "reward", "prompt": "a", "responses": [LONG]}, 400, "responses"),
    # Strict validation, as OpenAI's (each rule's messages: tests/test_serve_requests.py).
    ("unknown role", "chat/completions", {"model": "pretrain", "messages": [{"role": "wizard", "content": "a"}]}, 400, "messages.0.role", "invalid_value"),
    ("tool role", "chat/completions", {"model": "pretrain", "messages": [{"role": "tool", "content": "a"}]}, 400, "messages.0.role", "invalid_value"),
    ("message without role", "chat/completions", {"model": "pretrain", "messages": [{"content": "a"}]}, 400, "messages.0.role", "missing_required_parameter"),
    ("max_tokens as a string", "chat/completions", {"model": "pretrain", "messages": [{"role": "user", "content": "a"}], "max_tokens": "16"}, 400, "max_tokens", "invalid_type"),
    ("unknown field", "completions", {"model": "pretrain", "prompt": "a", "top_k": 3}, 400, "top_k", "unknown_parameter"),
    ("unsupported field", "chat/completions", {"model": "pretrain", "messages": [{"role": "user", "content": "a"}], "tools": []}, 400, "tools", "unsupported_parameter"),
    ("five stop strings", "completions", {"model": "pretrain", "prompt": "a", "stop": ["1", "2", "3", "4", "5"]}, 400, "stop", "invalid_value"),
    ("n over the spec's max_n", "completions", {"model": "pretrain", "prompt": "a", "n": 17}, 400, "n", "invalid_value"),
    ("prompt plus max_tokens over context", "completions", {"model": "pretrain", "prompt": "ab = ba", "max_tokens": 511}, 400, "max_tokens", "context_length_exceeded"),
    ("chat plus max_tokens over context", "chat/completions", {"model": "pretrain", "messages": [{"role": "user", "content": "ab"}], "max_tokens": 510}, 400, "max_tokens", "context_length_exceeded"),
    ("score unknown field", "score", {"model": "reward", "responses": ["b"], "top_k": 1}, 400, "top_k", "unknown_parameter"),
]
BAD_REQUESTS = [(*case, None) if len(case) == 5 else case for case in BAD_REQUESTS]


def no_internals(message: str) -> bool:
    """What a client may see: one short line, no stack trace, colour codes, ids or paths."""
    return (len(message) <= 400 and "\n" not in message and "\x1b" not in message
            and not any(w in message for w in ("Traceback", "File \"", "site-packages", "pid=", "ray::", "Actor")))


def post(url: str, route: str, body, headers: dict | None = None):
    import httpx

    kw = {"content": body, "headers": {"content-type": "application/json", **(headers or {})}} \
        if isinstance(body, bytes) else {"json": body, "headers": headers or {}}
    return httpx.post(f"{url}/{route}", timeout=60, **kw)


def dumps(obj) -> str:
    return json.dumps(obj, indent=1)[:2000]
