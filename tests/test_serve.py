"""The real Serve application over real HTTP, once per engine (vLLM through Ray Serve LLM,
and the transformers engine forced by ``engine: transformers``), on the session's Ray.

Served: ``pretrain`` (the session's pretrained checkpoint, found from its run dir's
lineage), ``sft`` (the untrained checkpoint, given as name=path) and ``reward`` (a
sequence-classification head on the same config). The app requires an API key.
"""

from __future__ import annotations

import json

import pytest
from serve_helpers import (BAD_REQUESTS, make_reward_checkpoint, no_internals, post, sse_events, task_prompts,
                           transformers_scores, validate)

KEY = "test-key"
HDR = {"Authorization": f"Bearer {KEY}"}
ENGINES = ["vllm", "transformers"]


def _vllm_missing() -> bool:
    try:
        import ray.serve.llm  # noqa: F401
        return False
    except ImportError:
        return True


@pytest.fixture(scope="module")
def reward_checkpoint(random_checkpoint, tmp_path_factory):
    return make_reward_checkpoint(random_checkpoint, tmp_path_factory.mktemp("rm") / "reward")


@pytest.fixture(scope="module", params=ENGINES)
def app(request, ray_session, pretrained_checkpoint, random_checkpoint, reward_checkpoint):
    """(base URL, engine): the app started once per engine, shut down after its tests."""
    from ray import serve

    from raystages.serve.app import deploy
    from raystages.serve.spec import ServeSpec
    from serve_helpers import free_port

    if request.param == "vllm" and _vllm_missing():
        pytest.skip("vLLM / ray.serve.llm not installed")
    spec = ServeSpec(engine=request.param, port=free_port(), api_key=KEY, app_name=f"test-{request.param}",
                     defaults={"cpus": 0.5, "max_num_seqs": 32})
    sources = [str(pretrained_checkpoint.parent), f"sft={random_checkpoint}", f"reward={reward_checkpoint}"]
    url, models = deploy(spec, sources)
    assert {m.name: m.kind for m in models} == {"pretrain": "generate", "sft": "generate", "reward": "score"}
    yield url, request.param
    serve.shutdown()


@pytest.fixture
def client(app):
    import openai

    return openai.OpenAI(base_url=app[0], api_key=KEY, _strict_response_validation=True, max_retries=0)


def test_models_route_lists_every_stage(app, client):
    import httpx

    assert [m.id for m in client.models.list()] == ["pretrain", "sft", "reward"]
    body = httpx.get(f"{app[0]}/models", headers=HDR).json()
    validate(body, "ListModelsResponse")
    assert {m["id"]: m["task"] for m in body["data"]} == {"pretrain": "generate", "sft": "generate", "reward": "score"}
    assert body["data"][0]["stage"] == "pretrain" and body["data"][0]["max_model_len"] == 512
    card = client.models.retrieve("pretrain")
    assert card.id == "pretrain" and card.created > 1_600_000_000
    assert httpx.get(f"{app[0][:-3]}/health").json()["status"] == "ok"


def test_completions_equal_transformers_greedy(app, client, pretrained_checkpoint):
    import httpx

    from raystages.models import load_tokenizer
    from raystages.generate import greedy_complete

    prompts = task_prompts(5)
    expected = greedy_complete(str(pretrained_checkpoint), prompts, max_new_tokens=16)
    tok = load_tokenizer(str(pretrained_checkpoint))
    for prompt, want in zip(prompts, expected):
        r = client.completions.create(model="pretrain", prompt=prompt, max_tokens=16, temperature=0)
        assert r.choices[0].text == want, (prompt, r.choices[0].text, want)
        assert r.usage.prompt_tokens == len(tok(prompt, add_special_tokens=False)["input_ids"])
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        assert r.choices[0].finish_reason == ("length" if r.usage.completion_tokens == 16 else "stop")
    # The trained model answers its task; an untrained one would not produce "x = y" lines.
    assert sum("\n" in t for t in expected) >= 3
    body = httpx.post(f"{app[0]}/completions", headers=HDR, json={
        "model": "pretrain", "prompt": prompts[:2], "max_tokens": 16, "temperature": 0}).json()
    validate(body, "CreateCompletionResponse")
    assert [c["text"] for c in sorted(body["choices"], key=lambda c: c["index"])] == expected[:2]


def test_chat_equals_transformers_greedy(app, client, pretrained_checkpoint):
    import httpx

    from raystages.generate import greedy_complete

    questions = [p.removesuffix(" =") for p in task_prompts(3)]
    expected = greedy_complete(str(pretrained_checkpoint), questions, max_new_tokens=12, chat=True)
    for q, want in zip(questions, expected):
        r = client.chat.completions.create(model="pretrain", messages=[{"role": "user", "content": q}],
                                           max_tokens=12, temperature=0)
        assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    body = httpx.post(f"{app[0]}/chat/completions", headers=HDR, json={
        "model": "pretrain", "messages": [{"role": "user", "content": questions[0]}], "max_tokens": 12,
        "temperature": 0}).json()
    validate(body, "CreateChatCompletionResponse")


def test_streams_end_in_done_and_match_non_streamed(app, client):
    import httpx

    prompt = task_prompts(1)[0]
    whole = client.completions.create(model="pretrain", prompt=prompt, max_tokens=16, temperature=0)
    # Streamed completion chunks carry `finish_reason: null` until the last one, as the
    # real API does; the `openai` client's Completion type and the OpenAPI schema both
    # say non-null, so these chunks are checked against the OpenAPI schema with only that
    # field relaxed (the last chunk against the unmodified schema), not through the client.
    text = httpx.post(f"{app[0]}/completions", headers=HDR, json={
        "model": "pretrain", "prompt": prompt, "max_tokens": 16, "temperature": 0, "stream": True}).text
    events = sse_events(text)
    assert events[-1] == "[DONE]" and len(events) >= 3
    chunks = [json.loads(e) for e in events[:-1]]
    for c in chunks:
        validate(c, "CreateCompletionResponse", nullable_finish_reason=True)
    last = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]][-1]
    validate(last, "CreateCompletionResponse")
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == whole.choices[0].text

    msgs = [{"role": "user", "content": prompt.removesuffix(" =")}]
    whole = client.chat.completions.create(model="pretrain", messages=msgs, max_tokens=12, temperature=0)
    stream = client.chat.completions.create(model="pretrain", messages=msgs, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    parts, usage, finish = [], None, None
    for chunk in stream:
        usage = chunk.usage or usage
        for ch in chunk.choices:
            parts.append(ch.delta.content or "")
            finish = ch.finish_reason or finish
    assert "".join(parts) == whole.choices[0].message.content and finish == whole.choices[0].finish_reason
    assert usage.completion_tokens == whole.usage.completion_tokens
    text = httpx.post(f"{app[0]}/chat/completions", headers=HDR, json={
        "model": "pretrain", "messages": msgs, "max_tokens": 12, "temperature": 0, "stream": True}).text
    events = sse_events(text)
    assert events[-1] == "[DONE]"
    for e in events[:-1]:
        validate(json.loads(e), "CreateChatCompletionStreamResponse")


def test_sampling_parameters(app, client):
    import httpx

    prompt = task_prompts(1)[0]
    kw = dict(model="sft", prompt=prompt, max_tokens=12, temperature=1.0, n=3)
    a = client.completions.create(seed=7, **kw)
    b = client.completions.create(seed=7, **kw)
    c = client.completions.create(seed=8, **kw)
    texts = lambda r: [ch.text for ch in sorted(r.choices, key=lambda ch: ch.index)]  # noqa: E731
    assert sorted(ch.index for ch in a.choices) == [0, 1, 2]
    assert texts(a) == texts(b), "the same seed must give the same samples"
    assert texts(a) != texts(c) and len(set(texts(a))) >= 2, "an untrained model samples near-uniformly"
    greedy = client.completions.create(model="pretrain", prompt=prompt, max_tokens=16, temperature=0)
    nucleus = client.completions.create(model="pretrain", prompt=prompt, max_tokens=16, temperature=1.0,
                                        top_p=1e-6, seed=3)
    assert nucleus.choices[0].text == greedy.choices[0].text, "top_p ~ 0 keeps only the top token"
    full = greedy.choices[0].text
    assert "\n" in full
    stopped = client.completions.create(model="pretrain", prompt=prompt, max_tokens=16, temperature=0, stop=["\n"])
    assert stopped.choices[0].text == full.split("\n")[0] and stopped.choices[0].finish_reason == "stop"
    streamed = httpx.post(f"{app[0]}/completions", headers=HDR, json={
        "model": "pretrain", "prompt": prompt, "max_tokens": 16, "temperature": 0, "stop": ["\n"], "stream": True}).text
    chunks = [json.loads(e) for e in sse_events(streamed)[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == stopped.choices[0].text
    one = client.completions.create(model="pretrain", prompt=prompt, max_tokens=1, temperature=0)
    assert one.usage.completion_tokens == 1 and one.choices[0].finish_reason == "length"
    # The untrained model samples its end token within a few dozen tokens; ignore_eos
    # generates past it to max_tokens.
    kw = dict(model="sft", prompt=prompt, max_tokens=200, temperature=1.0, n=8, seed=0)
    ended = client.completions.create(**kw)
    assert "stop" in {ch.finish_reason for ch in ended.choices} and ended.usage.completion_tokens < 8 * 200
    past = client.completions.create(**kw, extra_body={"ignore_eos": True})
    assert {ch.finish_reason for ch in past.choices} == {"length"} and past.usage.completion_tokens == 8 * 200


def test_score_equals_transformers(app, reward_checkpoint):
    from concurrent.futures import ThreadPoolExecutor

    from raystages.data.preference import scoring_side
    from raystages.models import load_tokenizer

    tok = load_tokenizer(str(reward_checkpoint))
    prompt = "abc"
    responses = ["cba", "xyz", "a much longer reply than the others", [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]]
    assert tok.apply_chat_template(scoring_side(prompt, "cba"), tokenize=False) == \
        "<|user|>\nabc<|end|>\n<|assistant|> cba<|end|>\n"
    texts = [tok.apply_chat_template(scoring_side(prompt, r), tokenize=False) for r in responses]
    want = transformers_scores(reward_checkpoint, texts)
    r = post(app[0], "score", {"model": "reward", "prompt": prompt, "responses": responses}, HDR)
    assert r.status_code == 200, r.text
    body = r.json()
    got = [d["score"] for d in sorted(body["data"], key=lambda d: d["index"])]
    assert got == pytest.approx(want, abs=1e-4)
    assert max(want) - min(want) > 1e-2, "scores must differ between responses for this test to mean anything"
    assert body["model"] == "reward" and body["usage"]["prompt_tokens"] > 0
    # Without a prompt a string is scored as raw text (as the RM stage scores such rows).
    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    r = post(app[0], "score", {"responses": ["raw text = txet war", conv]}, HDR).json()
    want = transformers_scores(reward_checkpoint, ["raw text = txet war", tok.apply_chat_template(conv, tokenize=False)])
    assert [d["score"] for d in r["data"]] == pytest.approx(want, abs=1e-4)
    # Concurrent requests share batches (padded together): same scores as alone.
    singles = [[f"{chr(97 + i % 26)}" * (1 + i % 7)] for i in range(24)]
    want_each = transformers_scores(reward_checkpoint, [
        tok.apply_chat_template(scoring_side(prompt, s[0]), tokenize=False) for s in singles])
    with ThreadPoolExecutor(12) as pool:
        outs = list(pool.map(lambda s: post(app[0], "score", {"prompt": prompt, "responses": s}, HDR).json(), singles))
    assert [o["data"][0]["score"] for o in outs] == pytest.approx(want_each, abs=1e-4)


def test_api_key_required_everywhere_but_health(app):
    import httpx
    import openai

    url = app[0]
    for method, route in [("GET", "models"), ("GET", "models/pretrain"), ("POST", "completions"),
                          ("POST", "chat/completions"), ("POST", "score"), ("GET", "no-such-route")]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = httpx.request(method, f"{url}/{route}", headers=headers, json={"model": "pretrain", "prompt": "a"})
            assert r.status_code == 401, (route, headers, r.text)
            validate(r.json(), "ErrorResponse")
    assert httpx.get(f"{url[:-3]}/health").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()


@pytest.mark.parametrize("name,route,body,status,param,code", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_gets_openai_error_and_server_keeps_serving(app, name, route, body, status, param, code):
    r = post(app[0], route, body, HDR)
    assert r.status_code == status, r.text
    err = r.json()
    validate(err, "ErrorResponse")
    assert err["error"]["type"] == "invalid_request_error" and err["error"]["message"]
    assert no_internals(err["error"]["message"]), err
    assert r.headers["x-request-id"], r.headers  # the id the server logged the detail under
    if param is not None:
        assert err["error"]["param"] == param, err
    if code is not None:
        assert err["error"]["code"] == code, err
    ok = post(app[0], "completions", {"model": "pretrain", "prompt": "ab =", "max_tokens": 1}, HDR)
    assert ok.status_code == 200, ok.text


def test_official_client_in_strict_mode_on_every_route_and_every_body_in_openai_schema(app):
    """The `openai` client (strict response validation) on every route, each answer's raw
    body (every stream chunk, every error) checked against OpenAI's OpenAPI schema."""
    import httpx
    import openai

    from raystages.serve.requests import ScoreResponse
    from serve_helpers import RecordingTransport, check_recorded_bodies

    class Score(openai.BaseModel):  # what the client parses /v1/score into (the schema check is below)
        id: str
        model: str
        data: list[dict]

    rec = RecordingTransport()
    client = openai.OpenAI(base_url=app[0], api_key=KEY, _strict_response_validation=True, max_retries=0,
                           http_client=httpx.Client(transport=rec, timeout=120))
    msgs = [{"role": "developer", "content": "answer"}, {"role": "user", "content": task_prompts(1)[0]}]
    assert [m.id for m in client.models.list()] == ["pretrain", "sft", "reward"]
    assert client.models.retrieve("sft").id == "sft"
    r = client.chat.completions.create(model="pretrain", messages=msgs, max_tokens=6, n=2, seed=1, stop=["\n"],
                                       user="u1")
    assert sorted(c.index for c in r.choices) == [0, 1]
    for chunk in client.chat.completions.create(model="pretrain", messages=msgs, max_tokens=6, stream=True,
                                                stream_options={"include_usage": True}):
        pass
    assert chunk.usage is not None and chunk.usage.completion_tokens >= 1
    client.completions.create(model="pretrain", prompt=["ab =", "ba ="], max_tokens=4, temperature=0)
    # Streamed completions: the client's Completion type (like OpenAI's schema) wants a
    # non-null finish_reason that OpenAI's own chunks do not have until the last one, so
    # this stream is read without the client; its chunks are still checked below.
    raw = httpx.Client(transport=rec, timeout=120).post(f"{app[0]}/completions", headers=HDR, json={
        "model": "sft", "prompt": "ab =", "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}})
    assert raw.status_code == 200 and len(sse_events(raw.text)) >= 3
    if app[1] == "vllm":  # logprobs: vLLM computes them; chat's carry OpenAI's `refusal`
        r = client.chat.completions.create(model="pretrain", messages=msgs, max_tokens=3, logprobs=True, top_logprobs=2)
        assert r.choices[0].logprobs.refusal is None and len(r.choices[0].logprobs.content[0].top_logprobs) == 2
        for chunk in client.chat.completions.create(model="pretrain", messages=msgs, max_tokens=3, logprobs=True,
                                                    stream=True):
            pass
        r = client.completions.create(model="pretrain", prompt="ab =", max_tokens=3, logprobs=1)
        assert len(r.choices[0].logprobs.tokens) == r.usage.completion_tokens
    else:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="pretrain", messages=msgs, max_tokens=3, logprobs=True)
        assert e.value.body["code"] == "unsupported_parameter" and e.value.body["param"] == "logprobs"
    score = client.post("/score", cast_to=Score, body={"model": "reward", "prompt": "a", "responses": ["b", "c"]})
    assert [d["index"] for d in score.data] == [0, 1]
    # The same mistake, the same answer on every route: a model of the wrong kind is a 404.
    for call in (lambda: client.chat.completions.create(model="reward", messages=msgs),
                 lambda: client.completions.create(model="reward", prompt="a"),
                 lambda: client.post("/score", cast_to=Score, body={"model": "sft", "responses": ["b"]})):
        with pytest.raises(openai.NotFoundError) as e:
            call()
        assert (e.value.body["param"], e.value.body["code"]) == ("model", "model_not_supported")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="pretrain", messages=msgs, extra_body={"top_k": 2})
    assert e.value.body["param"] == "top_k" and e.value.body["message"] == "Unknown parameter: 'top_k'."
    checked = check_recorded_bodies(rec.seen, ScoreResponse.model_json_schema())
    assert {"ListModelsResponse", "Model", "CreateChatCompletionResponse", "CreateChatCompletionStreamResponse",
            "CreateCompletionResponse", "CreateCompletionResponse(chunk)", "ScoreResponse", "ErrorResponse"} <= set(checked)


def _samples(app) -> dict:
    """The /metrics exposition as {(name, sorted labels): value}."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{app[0].removesuffix('/v1')}/metrics", timeout=30).text  # open, like /health
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


DROPPED = ("raystages_requests_total", (("model", "sft"), ("route", "/v1/chat/completions"), ("status", "499")))


def test_a_dropped_stream_counts_499_and_logs_one_line_without_a_traceback(app, ray_session):
    """A client that goes away mid-stream is routine: the request counts as 499 (client closed),
    Serve's proxy logs one INFO line about it (the engine's call is cancelled), and nothing
    logs an ERROR or a traceback; the server keeps serving. (Serve's logs carry our
    x-request-id as the request id.)"""
    import time
    from pathlib import Path

    import httpx

    logs = Path(ray_session._private.worker._global_node.get_logs_dir_path()) / "serve"
    rid = f"drop-{app[1]}-{time.time_ns()}"
    before = _samples(app).get(DROPPED, 0)
    # ignore_eos, n=4: the streams cannot end before the client goes (without ignore_eos, this
    # seed's sample ends after 28 tokens, ~70 ms, sooner than the drop may reach the ingress).
    with httpx.stream("POST", f"{app[0]}/chat/completions", timeout=60, headers={**HDR, "x-request-id": rid}, json={
            "model": "sft", "messages": [{"role": "user", "content": "ab"}], "max_tokens": 200, "stream": True,
            "temperature": 1.0, "seed": 0, "n": 4, "ignore_eos": True}) as r:
        assert r.status_code == 200, r.read()
        lines = r.iter_lines()
        for _ in range(3):  # a few tokens in, then the client goes
            next(lines)
    mentions: list[str] = []
    counted = before
    for _ in range(120):  # bounded: until the ingress has counted the drop and the proxy logged it
        counted = _samples(app).get(DROPPED, 0)
        mentions = [ln for f in logs.glob("*.log") for ln in f.read_text(errors="replace").splitlines() if rid in ln]
        if counted > before and any("disconnect" in ln for ln in mentions):
            break
        time.sleep(0.5)
    # Not a 500: Serve raises the cancelled receive call into the app, which the guard turns
    # into the disconnect message ASGI specifies (routes._disconnect_on_cancel).
    assert counted == before + 1, {k: v for k, v in _samples(app).items() if k[0] == "raystages_requests_total"}
    about = [ln for ln in mentions if "disconnect" in ln]
    assert len(about) == 1 and about[0].startswith("INFO") and "proxy" in about[0], mentions
    assert not any(" ERROR " in ln or ln.startswith("ERROR") for ln in mentions), mentions
    for f in logs.glob("*.log"):  # no traceback after the drop, in any of Serve's logs
        text = f.read_text(errors="replace")
        if rid in text:
            assert "Traceback" not in text[text.index(rid):], (f, text[text.index(rid):][:3000])
    ok = post(app[0], "completions", {"model": "pretrain", "prompt": "ab =", "max_tokens": 1}, HDR)
    assert ok.status_code == 200, ok.text


def test_load_1000_requests_at_concurrency_32(app):
    from raystages.bench.serve import load, prompt_mix

    bodies = [{**b, "model": "pretrain"} for b in prompt_mix(1000, max_tokens=8)]
    # Bounded: `load` raises TimeoutError past timeout_s (generous: 2 shared cores).
    res = load(app[0], bodies, concurrency=32, api_key=KEY, timeout_s=420)
    assert res["errors"] == [] and len(res["latencies"]) == 1000
    assert res["completion_tokens"] == 8 * 1000  # each generated its max_tokens (ignore_eos)


def test_health_is_liveness_ready_probes_every_engine_and_head_is_allowed(app):
    import httpx

    from raystages.serve.app import wait_ready

    root = app[0].removesuffix("/v1")
    body = wait_ready(app[0], timeout_s=120)
    assert body == {"status": "ready", "models": ["pretrain", "reward", "sft"]}
    for route in ("health", "ready"):  # open to load balancers: no API key
        assert httpx.head(f"{root}/{route}").status_code == 200
        assert httpx.get(f"{root}/{route}").status_code == 200
    assert httpx.head(f"{app[0]}/models", headers=HDR).status_code == 200


def test_metrics_in_prometheus_format_on_the_api_port(app):
    """After the tests above: our request metrics at once, Serve's replica metrics (and vLLM's
    engine metrics) once Ray's agent has exported them (bounded wait)."""
    import time

    samples = {}
    for _ in range(40):  # bounded: Ray's agent exports every few seconds
        samples = _samples(app)
        names = {name for name, _ in samples}
        if any(n.startswith("ray_serve_") for n in names) and (app[1] != "vllm" or any("vllm" in n for n in names)):
            break
        time.sleep(1)
    ok = samples[("raystages_requests_total", (("model", "pretrain"), ("route", "/v1/completions"), ("status", "200")))]
    assert ok >= 750  # the load test alone sent 750 completions (and 250 chats)
    assert any(n == "raystages_requests_total" and dict(lb).get("status") == "400" for n, lb in samples)
    assert samples[("raystages_tokens_total", (("kind", "completion"), ("model", "pretrain")))] >= 1000
    assert ("raystages_request_seconds_bucket", (("le", "+Inf"), ("model", "pretrain"), ("route", "/v1/completions"))) in samples
    assert any(n.startswith("ray_serve_") for n, _ in samples), sorted({n for n, _ in samples})[:50]
    if app[1] == "vllm":
        assert any("vllm" in n for n, _ in samples), sorted({n for n, _ in samples})[:80]


def test_a_killed_engine_shows_in_ready_and_the_model_recovers(app, ray_session):
    """Runs last for each engine: the replica that holds `pretrain`'s engine is killed by PID."""
    import os
    import signal
    import time

    import httpx
    from ray.util.state import list_actors

    from raystages.serve.app import wait_ready

    root = app[0].removesuffix("/v1")
    engine = [a for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
              if "pretrain" in (a.name or "") and "Ingress" not in (a.name or "")]
    assert len(engine) == 1, [a.name for a in engine]
    os.kill(engine[0].pid, signal.SIGKILL)
    seen = None
    for _ in range(60):  # bounded: 60 probes, each answers within the readiness deadline
        r = httpx.get(f"{root}/ready", timeout=30)
        if r.status_code == 503:
            seen = r.json()
            break
        time.sleep(0.5)
    assert seen is not None and "pretrain" in seen["not_ready"], seen
    assert set(seen["not_ready"]) == {"pretrain"}  # the others stayed ready
    wait_ready(app[0], timeout_s=300)  # Serve replaced the replica
    ok = post(app[0], "completions", {"model": "pretrain", "prompt": "ab =", "max_tokens": 1}, HDR)
    assert ok.status_code == 200, ok.text
