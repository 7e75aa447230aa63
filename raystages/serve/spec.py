"""The serve block of a job spec: which checkpoints to serve, on what, and how.

    serve:
      models:
        sft: {path: runs/sft/model, replicas: 1, cpus: 0.5}
        reward: {path: runs/rm/model}
      host: 127.0.0.1
      port: 8000

A model whose checkpoint is a ``*ForSequenceClassification`` is served for scoring
(``POST /v1/score``); every other one for generation (``/v1/completions``,
``/v1/chat/completions``). Unknown keys are errors, as in every other spec.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from raystages.spec import Section, SpecError, apply_overrides, read_yaml_mapping, validation_lines

MODEL_NAME = r"^[A-Za-z0-9_.:-]+$"


class ServedModelSpec(Section):
    path: str | None = Field(None, description="Hugging Face checkpoint dir (a stage's `run_dir/model`). Without it the entry only tunes a model given on the command line; a CLI `name=path` overrides it.")
    replicas: int = Field(1, ge=1, description="Ray Serve replicas of this model.")
    cpus: float = Field(0.5, gt=0, description="CPUs each replica reserves (fractional is fine on small machines).")
    gpus: float = Field(0.0, ge=0, description="GPUs each replica reserves; > 0 runs the engine on GPU.")
    max_model_len: int | None = Field(None, ge=8, description="Context served; default: the checkpoint's max_position_embeddings.")
    max_num_seqs: int = Field(64, ge=1, description="Sequences the engine decodes together (vLLM) / batch size (transformers).")
    kv_cache_mb: int = Field(64, ge=1, description="KV cache on CPU, MiB (vLLM otherwise takes ~15 GiB). Ignored on GPU.")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="Share of GPU memory vLLM may take (GPU only).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights dtype; float32 keeps CPU outputs equal to transformers'.")
    max_n: int = Field(16, ge=1, le=128, description="Most choices (`n`) one chat or completion request may ask for; "
                       "more is a 400 (OpenAI's own ceiling is 128).")
    batch_wait_ms: float = Field(20.0, ge=0, description="transformers engine / scorer: how long a batch waits to fill "
                                 "(latency at low load for bigger batches under load; vLLM batches continuously).")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra vLLM engine arguments, passed as they are.")


class ServeSpec(Section):
    """Everything ``raystages serve`` needs; the CLI's sources and flags override it."""

    models: dict[str, ServedModelSpec] = Field(default_factory=dict, description="Model id -> what to serve under it (e.g. pretrain, sft, rl, reward).")
    defaults: dict[str, Any] = Field(default_factory=dict, description="ServedModelSpec fields applied to every model (and to those found from run dirs).")
    engine: Literal["auto", "vllm", "transformers"] = Field(
        "auto", description="Generation engine: vLLM through Ray Serve LLM when installed (auto), or the transformers engine.")
    host: str = Field("127.0.0.1", description="Address the HTTP proxy binds; 0.0.0.0 exposes it to the network.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    api_key: str | None = Field(None, description="If set, every route but the health route needs `Authorization: Bearer <key>`.")
    api_key_env: str = Field("RAYSTAGES_API_KEY", description="Environment variable read for the key when `api_key` is unset.")
    app_name: str = Field("raystages", pattern=r"^[A-Za-z0-9_-]+$", description="Ray Serve application name.")
    route_prefix: str = Field("/", pattern=r"^/", description="Route prefix of the application.")
    ingress_replicas: int = Field(1, ge=1, description="Replicas of the HTTP ingress (0 CPUs each).")
    request_timeout_s: float = Field(600, gt=0, description="Server-side timeout of one request.")

    @model_validator(mode="after")
    def _names(self):
        import re

        for name in self.models:
            if not re.match(MODEL_NAME, name):
                raise ValueError(f"models: {name!r} is not a valid model id (letters, digits, _ . : -)")
        ServedModelSpec.model_validate(self.defaults)  # unknown keys in `defaults` fail here
        return self

    def model_spec(self, name: str, path: str | None = None) -> ServedModelSpec:
        """The spec of ``name``: its own entry over the defaults; ``path`` (from the CLI) wins."""
        own = self.models[name].model_dump(exclude_unset=True) if name in self.models else {}
        merged = {**self.defaults, **own, **({"path": path} if path else {})}
        return ServedModelSpec.model_validate(merged)

    def resolved_api_key(self) -> str | None:
        import os

        return self.api_key or os.environ.get(self.api_key_env) or None


def load_serve_spec(path: str | Path | None, overrides: list[str] = ()) -> ServeSpec:
    """Read the ``serve:`` block of a job spec (or a file that is only that block)."""
    raw: Any = {}
    source = str(path or "<defaults>")
    if path is not None:
        p = Path(path)
        raw = read_yaml_mapping(p)
        raw = raw.get("serve", raw) or {}
        if not isinstance(raw, dict):
            raise SpecError(f"{p}: serve: must be a mapping")
    raw = apply_overrides(raw, list(overrides))
    try:
        return ServeSpec.model_validate(raw)
    except ValidationError as e:
        raise SpecError(f"{source}: invalid serve spec\n" + validation_lines(e, "serve.")) from None
