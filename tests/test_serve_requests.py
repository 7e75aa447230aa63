"""Strict request validation and schema-complete responses, without a server: the request
models every route validates with, the error each mistake gets, and vLLM's bodies reshaped
to OpenAI's schema. (Over HTTP on a real server: tests/test_serve.py.)"""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from serve_helpers import openapi_request_fields, validate

from raystages.serve.requests import (EXTENSIONS, UNSUPPORTED, ChatRequest, CompletionRequest, ScoreRequest, check_n,
                                      context_error, validation_error)
from raystages.serve.responses import openai_shape

MODELS = {"chat": ChatRequest, "completions": CompletionRequest, "score": ScoreRequest}
U = [{"role": "user", "content": "a"}]

# (route, body, param, code, message): the one 400 each mistake gets, on either engine.
GOLDEN = [
    ("chat", {"messages": [{"role": "wizard", "content": "a"}]}, "messages.0.role", "invalid_value",
     "messages.0.role: Input should be 'system', 'developer', 'user' or 'assistant' (got 'wizard')"),
    ("chat", {"messages": [{"role": "tool", "content": "a"}]}, "messages.0.role", "invalid_value",
     "messages.0.role: 'tool' messages answer an assistant message's tool calls, and this server serves no tools"),
    ("chat", {"messages": [{"content": "a"}]}, "messages.0.role", "missing_required_parameter",
     "messages.0.role: missing required parameter"),
    ("chat", {"messages": U, "max_tokens": "16"}, "max_tokens", "invalid_type",
     "max_tokens: expected an integer, got a string"),
    ("chat", {"messages": U, "stream": "true"}, "stream", "invalid_type", "stream: expected a boolean, got a string"),
    ("chat", {"messages": U, "temperature": True}, "temperature", "invalid_type",
     "temperature: expected a number, got a boolean"),
    ("chat", {"messages": U, "foo": 1}, "foo", "unknown_parameter", "Unknown parameter: 'foo'."),
    ("chat", {"messages": U, "top_k": 5}, "top_k", "unknown_parameter", "Unknown parameter: 'top_k'."),
    ("chat", {"messages": U, "tools": []}, "tools", "unsupported_parameter",
     "Unsupported parameter: 'tools' is not supported by this server."),
    ("chat", {"messages": U, "stop": ["a"] * 5}, "stop", "invalid_value", "stop: at most 4 items (got 5)"),
    ("chat", {"messages": U, "stop": []}, "stop", "invalid_value", "stop: at least 1 item (got 0)"),
    ("chat", {"messages": U, "stop": 5}, "stop", "invalid_type", "stop: expected a string or an array, got an integer"),
    ("chat", {"messages": U, "n": 1000}, "n", "invalid_value", "n: Input should be less than or equal to 128"),
    ("chat", {"messages": U, "n": 0}, "n", "invalid_value", "n: Input should be greater than or equal to 1"),
    ("chat", {"messages": U, "stream_options": {"include_usage": True}}, "stream_options", "invalid_value",
     "stream_options: only allowed when 'stream' is true"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages.0.content.0.type", "invalid_value", "messages.0.content.0.type: Input should be 'text' (got 'image_url')"),
    ("chat", {"messages": [{"role": "user", "content": "a", "foo": 1}]}, "messages.0.foo", "unknown_parameter",
     "Unknown parameter: 'messages.0.foo'."),
    ("chat", {"messages": "hello"}, "messages", "invalid_type", "messages: expected an array, got a string"),
    ("chat", {"messages": []}, "messages", "invalid_value", "messages: at least 1 item (got 0)"),
    ("chat", {"model": "m"}, "messages", "missing_required_parameter", "messages: missing required parameter"),
    ("chat", {"messages": U, "logprobs": 1}, "logprobs", "invalid_type", "logprobs: expected a boolean, got an integer"),
    ("chat", {"messages": U, "model": 7}, "model", "invalid_type", "model: expected a string, got an integer"),
    ("completions", {"prompt": {"text": "a"}}, "prompt", "invalid_type",
     "prompt: expected a string or an array, got an object"),
    ("completions", {"prompt": "a", "max_tokens": 0}, "max_tokens", "invalid_value",
     "max_tokens: Input should be greater than or equal to 1"),
    ("completions", {"prompt": "a", "best_of": 2}, "best_of", "unsupported_parameter",
     "Unsupported parameter: 'best_of' is not supported by this server."),
    ("completions", {"prompt": "a", "logprobs": True}, "logprobs", "invalid_type",
     "logprobs: expected an integer, got a boolean"),
    ("score", {"prompt": "a"}, "responses", "missing_required_parameter", "responses: missing required parameter"),
    ("score", {"responses": [[{"role": "wizard", "content": "a"}]]}, "responses.0.0.role", "invalid_value",
     "responses.0.0.role: Input should be 'system', 'developer', 'user' or 'assistant' (got 'wizard')"),
    ("score", {"responses": [5]}, "responses.0", "invalid_type",
     "responses.0: expected a string or an array, got an integer"),
    ("score", {"responses": ["a"], "extra": 1}, "extra", "unknown_parameter", "Unknown parameter: 'extra'."),
]


@pytest.mark.parametrize("route,body,param,code,message", GOLDEN, ids=[f"{g[0]}:{g[2]}:{g[3]}" for g in GOLDEN])
def test_each_mistake_gets_one_400_naming_the_field(route, body, param, code, message):
    with pytest.raises(ValidationError) as e:
        MODELS[route].model_validate(body)
    err = validation_error(e.value.errors())
    assert (err.status, err.param, err.code, err.message) == (400, param, code, message)


def test_valid_requests_pass_and_reach_the_engine_as_sent():
    chat = ChatRequest.model_validate({
        "model": "m", "messages": [{"role": "developer", "content": "be brief"},
                                   {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
        "max_completion_tokens": 4, "temperature": 0, "stop": "\n", "stream": True,
        "stream_options": {"include_usage": True}, "logprobs": True, "top_logprobs": 2, "user": "u1"})
    # developer -> system, content parts -> text: what a chat template renders.
    assert chat.template_messages() == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"}]
    assert chat.output_limit() == 4 and "top_p" not in chat.requested()  # unset: the engine's default applies
    comp = CompletionRequest.model_validate({"prompt": [[1, 2], [3]], "n": 2, "temperature": 1})
    assert comp.prompts() == [[1, 2], [3]] and comp.output_limit() == 16  # OpenAI's default
    assert CompletionRequest.model_validate({"prompt": [5, 6]}).prompts() == [[5, 6]]
    assert CompletionRequest.model_validate({"prompt": ["x", "y"]}).prompts() == ["x", "y"]
    score = ScoreRequest.model_validate({"responses": ["a", [{"role": "developer", "content": "c"}]]})
    assert score.layout() == ["a", [{"role": "system", "content": "c"}]]


def test_served_model_limits():
    check_n(16, 16)
    with pytest.raises(Exception) as e:
        check_n(17, 16)
    assert (e.value.status, e.value.param, e.value.message) == (400, "n", "n: at most 16 choices per request on this server (got 17)")
    assert context_error(10, 6, 16) is None and context_error(15, None, 16) is None
    over = context_error(10, 7, 16)
    assert (over.status, over.param, over.code) == (400, "max_tokens", "context_length_exceeded")
    assert over.message == ("This model's maximum context length is 16 tokens, but you requested 17 tokens "
                            "(10 in the prompt, 7 for the completion). Please reduce the prompt or max_tokens.")
    full = context_error(16, None, 16, "messages")
    assert (full.param, full.code) == ("messages", "context_length_exceeded")


def test_every_openai_request_field_is_accepted_or_refused_by_name():
    """The request models track OpenAI's: each of its fields is implemented or listed as
    unsupported (a 400 that says so), and none of ours is outside OpenAI's but the listed
    engine extensions (``ignore_eos``)."""
    for model, schema in ((ChatRequest, "CreateChatCompletionRequest"), (CompletionRequest, "CreateCompletionRequest")):
        theirs, ours = openapi_request_fields(schema), set(model.model_fields)
        assert ours - EXTENSIONS <= theirs, ours - EXTENSIONS - theirs
        assert EXTENSIONS <= ours and not EXTENSIONS & theirs
        assert theirs - ours <= UNSUPPORTED, (theirs - ours) - UNSUPPORTED


def test_strict_validation_holds_through_fastapi():
    """FastAPI validates the same models (strict mode included) and the app's handler turns
    its errors into the same body; malformed JSON and non-object bodies too."""
    from fastapi.testclient import TestClient

    from raystages.serve.routes import make_api

    app = make_api(None)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        return {"ok": body.output_limit()}

    client = TestClient(app)
    r = client.post("/v1/chat/completions", json={"messages": U, "max_tokens": "16"})
    assert r.status_code == 400 and r.json() == {"error": {
        "message": "max_tokens: expected an integer, got a string", "type": "invalid_request_error",
        "param": "max_tokens", "code": "invalid_type"}}
    assert client.post("/v1/chat/completions", json={"messages": U, "max_tokens": 16}).json() == {"ok": 16}
    for raw, message in ((b'{"messages": ', "The request body is not valid JSON."),
                         (b'["m"]', "The request body must be a JSON object.")):
        r = client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
        assert (r.status_code, r.json()["error"]["message"]) == (400, message)


def test_vllm_bodies_reshaped_to_openai_schema():
    token = {"token": "a", "logprob": -0.1, "bytes": [97], "top_logprobs": [{"token": "a", "logprob": -0.1, "bytes": [97]}]}
    body = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "a", "refusal": None,
                                                 "tool_calls": None, "reasoning": None},
                         "logprobs": {"content": [token]}, "finish_reason": "length", "stop_reason": None}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2, "prompt_tokens_details": None}}
    shaped = openai_shape(body)
    assert shaped["choices"][0]["logprobs"] == {"content": [token], "refusal": None}
    validate(shaped, "CreateChatCompletionResponse")
    chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [{"index": 0, "delta": {"content": "a"}, "logprobs": {"content": [token]}, "finish_reason": None}]}
    validate(openai_shape(chunk), "CreateChatCompletionStreamResponse")
