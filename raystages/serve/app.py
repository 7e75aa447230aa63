"""The Ray Serve application: every stage's model under its own model id, one HTTP app.

    raystages serve runs/pretrain runs/sft rm=runs/rm/model [--spec jobs/serve.yaml]

``build_app`` is also a Ray Serve application builder, so a KubeRay RayService (or
``serve run``) can point at it with an import path and args (the ``serve:`` block):

    import_path: raystages.serve.app:build_app
    args: {models: {sft: {path: /data/runs/sft/model}}, engine: vllm}

Generation models run on vLLM through Ray Serve LLM (``LLMServer`` deployments behind our
subclass of its ``OpenAiIngress``) when vLLM is installed, else on the transformers engine;
reward models run on a batched scorer. Model ids come from each checkpoint's
``lineage.json`` (``pretrain``, ``sft``, ``dpo``, ``rl``; the ``rm`` stage is served as ``reward``)
or from ``name=path`` arguments.
"""

from __future__ import annotations

import calendar
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

from raystages.registry import STAGES
from raystages.serve.spec import MODEL_NAME, ServedModelSpec, ServeSpec
from raystages.spec import SpecError

STAGE_MODEL_IDS = {name: s.served_as for name, s in STAGES.items()} | {"reward": "reward"}
# vLLM inside a Ray actor: keep the engine core in-process (its own subprocess would not
# inherit the actor's resources), and do not pin OpenMP threads to cores other replicas share.
CPU_ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}


CLASSIFY, FILL_MASK = "classify", "fill-mask"


def head_kind(architecture: str, num_labels: int) -> str | None:
    """The kind of an encoder task-head checkpoint (``classify`` for a sequence classifier
    with two or more labels or a token classifier, ``fill-mask`` for a masked LM); None
    for the others (a one-label sequence classifier is a reward model)."""
    if architecture.endswith("ForTokenClassification"):
        return CLASSIFY
    if architecture.endswith("ForSequenceClassification") and num_labels > 1:
        return CLASSIFY
    if architecture.endswith("ForMaskedLM"):
        return FILL_MASK
    return None


@dataclass
class ServedModel:
    name: str
    kind: str  # "generate" | "score" | "classify" | "fill-mask" (routes.ROUTES_OF_KIND)
    spec: ServedModelSpec
    stage: str | None
    created: int
    max_model_len: int

    def info(self) -> dict:
        return {"kind": self.kind, "created": self.created, "max_model_len": self.max_model_len, "max_n": self.spec.max_n,
                "stage": self.stage, "root": self.spec.path}


def _lineage(ckpt: Path) -> dict:
    f = ckpt / "lineage.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def _discover(src: Path) -> list[tuple[str, Path]]:
    """(model id, checkpoint) pairs in a checkpoint dir, a run dir, or a folder of run dirs."""
    if (src / "config.json").is_file():
        ckpts = [src]
    elif (src / "model" / "config.json").is_file():
        ckpts = [src / "model"]
    elif src.is_dir():
        ckpts = sorted(c / "model" for c in src.iterdir() if (c / "model" / "config.json").is_file())
        if not ckpts:
            raise SpecError(f"{src}: no checkpoint here (no config.json, no model/config.json, no run dirs)")
    else:
        raise SpecError(f"{src}: not a checkpoint, run dir or runs folder (or name=path)")
    out = []
    for ckpt in ckpts:
        stage = _lineage(ckpt).get("stage")
        if not stage:
            raise SpecError(f"{ckpt}: no lineage.json says which stage made it; name it: NAME={ckpt}")
        out.append((STAGE_MODEL_IDS.get(stage, stage), ckpt))
    return out


def find_models(sources: list[str], spec: ServeSpec) -> list[ServedModel]:
    """Resolve CLI sources (run dirs, checkpoints, ``name=path``) and ``spec.models``."""
    import re

    paths: dict[str, Path] = {}
    for src in sources:
        if "=" in src and not Path(src).exists():
            name, path = src.split("=", 1)
            if not re.match(MODEL_NAME, name):
                raise SpecError(f"{src!r}: {name!r} is not a valid model id")
            found = [(name, Path(path))]
        else:
            found = _discover(Path(src))
        for name, path in found:
            if name in paths and paths[name].resolve() != path.resolve():
                raise SpecError(f"two checkpoints for model `{name}`: {paths[name]} and {path}; "
                                f"name one of them: OTHER_NAME={path}")
            paths[name] = path
    for name, m in spec.models.items():
        if name not in paths and m.path is not None:  # an entry without path only tunes a CLI model
            paths[name] = Path(m.path)
    if not paths:
        raise SpecError("nothing to serve: give run dirs, checkpoints (NAME=PATH) or serve.models in --spec")
    return [_served(name, path, spec) for name, path in paths.items()]


def _served(name: str, path: Path, spec: ServeSpec) -> ServedModel:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise SpecError(f"model `{name}`: {path} is not a Hugging Face checkpoint (no config.json)")
    cfg = json.loads(cfg_file.read_text())
    arch = (cfg.get("architectures") or [""])[0]
    m = spec.model_spec(name, str(path.resolve()))
    ctx = cfg.get("max_position_embeddings") or 2048
    if m.max_model_len and m.max_model_len > ctx:
        raise SpecError(f"serve.models.{name}.max_model_len: {m.max_model_len} exceeds the checkpoint's context of {ctx}")
    lineage = _lineage(path)
    try:
        created = calendar.timegm(time.strptime(lineage["created"], "%Y-%m-%dT%H:%M:%SZ"))
    except (KeyError, ValueError):
        created = int(cfg_file.stat().st_mtime)
    # A saved config holds id2label, not num_labels (a reward model's has one label).
    kind = head_kind(arch, len(cfg.get("id2label") or {}) or 2)
    if kind is None:
        kind = "score" if arch.endswith("ForSequenceClassification") else "generate"
    return ServedModel(name, kind, m, lineage.get("stage"), created, m.max_model_len or ctx)


def resolve_engine(engine: str) -> str:
    """``auto`` -> ``vllm`` where vLLM and Ray Serve LLM import, else ``transformers``."""
    if engine == "transformers":
        return engine
    try:
        import ray.serve.llm  # noqa: F401 - imports vLLM too
        return "vllm"
    except ImportError as e:
        if engine == "vllm":
            raise SpecError(f"serve.engine: vllm, but Ray Serve LLM cannot import: {e}") from None
        return "transformers"


def llm_config(m: ServedModel):
    """The ``ray.serve.llm.LLMConfig`` of one generation model, CPU or GPU per its spec."""
    from ray.serve.llm import LLMConfig

    s, gpu = m.spec, m.spec.gpus > 0
    bundle = {"CPU": s.cpus, **({"GPU": s.gpus} if gpu else {})}
    kwargs = {"max_model_len": m.max_model_len, "max_num_seqs": s.max_num_seqs, "dtype": s.dtype}
    if gpu:
        kwargs["gpu_memory_utilization"] = s.gpu_memory_utilization
    else:
        # Without a cap vLLM's CPU backend reserves a share of all RAM (~15 GiB here); eager
        # mode skips torch.compile and the warm-up that sizing would need.
        kwargs.update(kv_cache_memory_bytes=s.kv_cache_mb << 20, enforce_eager=True)
    kwargs.update(s.engine_kwargs)
    return LLMConfig(
        model_loading_config={"model_id": m.name, "model_source": s.path},
        accelerator_config={"kind": "gpu" if gpu else "cpu"},  # Ray Serve LLM defaults to GPU
        placement_group_config={"bundles": [bundle]},
        # The replica actor itself needs no CPU: the engine's bundle holds it.
        deployment_config={"num_replicas": s.replicas, "ray_actor_options": {"num_cpus": 0}},
        runtime_env=None if gpu else {"env_vars": dict(CPU_ENGINE_ENV)},
        engine_kwargs=kwargs,
        # vLLM's engine metrics (TTFT, queue, KV-cache use) through ray.util.metrics: GET /metrics.
        log_engine_metrics=True,
    )


def _options(name: str, s: ServedModelSpec) -> dict:
    return {"name": name, "num_replicas": s.replicas, "max_ongoing_requests": 1024,
            "ray_actor_options": {"num_cpus": s.cpus, "num_gpus": s.gpus}}


def _bind_kwargs(m: ServedModel) -> dict:
    return {"path": m.spec.path, "max_batch_size": m.spec.max_num_seqs, "batch_wait_ms": m.spec.batch_wait_ms,
            "threads": max(1, math.ceil(m.spec.cpus)), "max_model_len": m.max_model_len}


def build(models: list[ServedModel], spec: ServeSpec):
    """The bound application for already resolved models."""
    from ray import serve

    from raystages.serve.routes import ingress_class, make_api
    from raystages.serve.scorer import RewardScorer
    from raystages.serve.task_heads import TaskHeadServer

    info = {m.name: m.info() for m in models}
    # Every model that does not generate runs on transformers, whichever the engine.
    scorers = {m.name: serve.deployment(RewardScorer, **_options(f"Scorer:{m.name}", m.spec)).bind(**_bind_kwargs(m))
               for m in models if m.kind == "score"}
    scorers |= {m.name: serve.deployment(TaskHeadServer, **_options(f"TaskHead:{m.name}", m.spec)).bind(
                    **_bind_kwargs(m)) for m in models if m.kind in (CLASSIFY, FILL_MASK)}
    gen = [m for m in models if m.kind == "generate"]
    ingress_opts = {"name": "Ingress", "num_replicas": spec.ingress_replicas, "max_ongoing_requests": 4096,
                    "ray_actor_options": {"num_cpus": 0}}
    api = make_api(spec.resolved_api_key())
    if resolve_engine(spec.engine) == "vllm":
        from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
        from ray.llm._internal.serve.core.server import builder
        from ray.serve.llm import build_llm_deployment

        from raystages.serve.ingress import VLLMIngress
        from raystages.train.console import verbose

        if not verbose():  # its INFO is each deployment's whole options dict, pretty-printed
            logging.getLogger(f"ray.serve.{builder.__name__}").setLevel(logging.WARNING)

        configs = {m.name: llm_config(m) for m in gen}
        return serve.deployment(ingress_class(VLLMIngress, api), **ingress_opts).bind(
            llm_deployments={n: build_llm_deployment(c) for n, c in configs.items()},
            model_cards={n: to_model_metadata(n, c) for n, c in configs.items()},
            models_info=info, scorers=scorers)
    from raystages.serve.hf_engine import HFEngine
    from raystages.serve.hf_ingress import HFIngress

    engines = {m.name: serve.deployment(HFEngine, **_options(f"HFEngine:{m.name}", m.spec)).bind(**_bind_kwargs(m))
               for m in gen}
    return serve.deployment(ingress_class(HFIngress, api), **ingress_opts).bind(
        engines=engines, models_info=info, scorers=scorers)


def build_app(args: dict | None = None):
    """Ray Serve application builder: ``args`` is a ``serve:`` block, plus optional
    ``sources`` (run dirs, checkpoints, ``name=path``) as on the command line."""
    from pydantic import ValidationError

    args = dict(args or {})
    sources = list(args.pop("sources", []) or [])
    try:
        spec = ServeSpec.model_validate(args)
    except ValidationError as e:
        raise SpecError(f"invalid serve args: {e}") from None
    return build(find_models(sources, spec), spec)


def wait_ready(base_url: str, timeout_s: float = 600.0, poll_s: float = 1.0) -> dict:
    """Poll ``GET /ready`` (``base_url`` ends in ``/v1``) until every model's engine answers;
    returns its body. RuntimeError naming the models still not ready at ``timeout_s``."""
    import httpx

    ready_url = base_url.removesuffix("/v1") + "/ready"
    deadline, last = time.time() + timeout_s, {}
    while time.time() < deadline:
        try:
            r = httpx.get(ready_url, timeout=30)
            last = r.json()
            if r.status_code == 200:
                return last
        except (httpx.HTTPError, ValueError) as e:
            last = {"error": repr(e)}
        time.sleep(poll_s)
    raise RuntimeError(f"the served models are not ready after {timeout_s:g} s: {last}")


def deploy(spec: ServeSpec, sources: list[str] = ()) -> tuple[str, list[ServedModel]]:
    """Start Serve's HTTP proxy on ``spec.host:port`` and run the app on the connected
    Ray; returns (base URL, models) once every deployment is ready."""
    from ray import serve

    models = find_models(list(sources), spec)
    app = build(models, spec)
    serve.start(http_options={"host": spec.host, "port": spec.port,
                              "request_timeout_s": spec.request_timeout_s})
    serve.run(app, name=spec.app_name, route_prefix=spec.route_prefix, blocking=False)
    prefix = spec.route_prefix.rstrip("/")
    host = "127.0.0.1" if spec.host in ("0.0.0.0", "::") else spec.host
    return f"http://{host}:{spec.port}{prefix}/v1", models
