"""Typed job specs: the one source of every knob.

A spec is YAML (read with a safe loader) validated into these pydantic models; unknown keys
are errors. ``key.sub=value`` overrides on the command line are applied before validation,
values parsed as YAML scalars (``optim.lr=1e-3``, ``scaling.num_workers=1``). A bad spec
raises :class:`SpecError`, which the CLI turns into exit status 2 before Ray starts.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class SpecError(ValueError):
    """A spec that cannot run; the message names the field and what is allowed."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(Section):
    preset: str | None = Field("tiny", description="Built-in preset: Llama (nano, tiny, small, llama-1b, llama-7b) or BERT encoder (bert-nano, bert-tiny, bert-small); ignored when `path` is set.")
    path: str | None = Field(None, description="Hugging Face checkpoint dir or hub id to start from.")
    config_overrides: dict[str, Any] = Field(default_factory=dict, description="Fields set on the model config, e.g. {num_hidden_layers: 2}.")
    trust_remote_code: bool = Field(False, description="Allow code shipped with a checkpoint to run. Off: loading stays safe.")

    @model_validator(mode="after")
    def _preset_known(self):
        from raystages.models import PRESETS

        if self.path is None and self.preset not in PRESETS:
            raise ValueError(f"model.preset {self.preset!r} is not a preset; choose one of {sorted(PRESETS)} or set model.path")
        return self


class TokenizerSpec(Section):
    path: str | None = Field(None, description="Tokenizer dir or hub id. Default: the model's own, or one trained on the training text for presets.")
    vocab_size: int = Field(512, ge=300, le=1_000_000, description="Vocabulary size when training a tokenizer.")
    train_docs: int = Field(2000, ge=1, description="Documents of the training text used to train a tokenizer.")
    lowercase: bool = Field(True, description="WordPiece (bert-* presets) only: lower-case the text, as BERT uncased does; `false` keeps case (BERT cased), which named-entity recognition needs.")


class BuiltinTaskSpec(Section):
    seed: int = Field(0, description="Seed of the task generator; every split is a pure function of it.")
    num_train: int = Field(4000, ge=1, description="Training rows (documents for pretraining).")
    num_val: int = Field(200, ge=1, description="Held-out rows.")
    min_len: int = Field(3, ge=1, le=12, description="Fewest letters in a problem.")
    max_len: int = Field(6, ge=1, le=12, description="Most letters in a problem.")
    noise: float = Field(0.3, ge=0, le=1, description="Pretraining corpus: share of deliberately wrong answers.")

    @model_validator(mode="after")
    def _lengths(self):
        if self.min_len > self.max_len:
            raise ValueError("min_len must be <= max_len")
        return self


class DataSpec(Section):
    source: str = Field("builtin", description="`builtin`, a local .txt/.jsonl/.json/.parquet file or directory, or a hub dataset name.")
    val_source: str | None = Field(None, description="Held-out data; default: `val_fraction` of `source` (or the built-in val split).")
    val_fraction: float = Field(0.05, gt=0, lt=1, description="Share of `source` held out when `val_source` is unset.")
    text_field: str = Field("text", description="Column holding the text (jsonl/parquet/hub); a list of words (a tagging row's `tokens`) is joined by spaces.")
    hub_split: str = Field("train", description="Split name for hub datasets.")
    on_bad_row: Literal["error", "skip"] = Field("error", description="A row without usable text: fail naming file and row, or skip and count it.")
    max_rows: int | None = Field(None, ge=1, description="Read at most this many rows.")
    shuffle_buffer: int = Field(1024, ge=0, description="Pretraining: blocks in each worker's local shuffle buffer, reseeded every epoch (0: shard order only).")
    builtin: BuiltinTaskSpec = Field(default_factory=BuiltinTaskSpec)
    # Whether the files exist is checked where the job runs (raystages.preflight).


class OptimSpec(Section):
    lr: float = Field(3e-3, gt=0, description="Peak learning rate (AdamW).")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine floor as a fraction of `lr`.")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    warmup_steps: int = Field(20, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW (beta1, beta2).")
    max_steps: int = Field(300, ge=1, description="Optimizer steps in the run.")
    micro_batch_size: int = Field(16, ge=1, description="Sequences per worker per forward pass.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    grad_clip: float = Field(1.0, ge=0, description="Max gradient norm; 0 turns clipping off.")
    seq_len: int = Field(128, ge=1, description="Tokens per packed training block.")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16 on GPUs that support it; fp32 on CPU.")


class DeepSpeedSpec(Section):
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="ZeRO stage 0–3.")
    offload_optimizer: bool = Field(False, description="ZeRO optimizer state on CPU (compiles DeepSpeed's CPU Adam once).")
    offload_param: bool = Field(False, description="ZeRO-3 parameters on CPU.")
    bucket_mb: float = Field(32.0, gt=0, description="ZeRO's gradient buckets (reduce, and allgather for stages 1-2): the gradient memory a rank holds beyond its shard. Larger means fewer, bigger collectives: on GPUs DeepSpeed's own default is 5e8 elements. Under ZeRO-3 each layer's gathered parameters are also released right after use.")
    config: dict[str, Any] = Field(default_factory=dict, description="Raw DeepSpeed config merged over the generated one.")

    @model_validator(mode="after")
    def _offload(self):
        if self.offload_param and self.zero_stage != 3:
            raise ValueError("offload_param needs zero_stage 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3")
        return self


class ScalingSpec(Section):
    num_workers: int = Field(2, ge=1, description="Ray Train workers (data-parallel ranks).")
    use_gpu: bool = Field(False, description="One GPU per worker (NCCL); CPU workers use gloo.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs each worker reserves; also its torch thread count (rounded up).")
    gpus_per_worker: float = Field(1.0, ge=0, description="GPUs each worker reserves when use_gpu.")
    autoscaling: bool = Field(False, description="The cluster adds nodes on demand (an autoscaler): wait for the workers' resources instead of failing at once when the cluster is short of them now.")


class RunSpec(Section):
    name: str = Field("run", pattern=r"^[A-Za-z0-9_.-]+$", description="Run name: `storage_path/name` is the run dir; rerunning the same name resumes.")
    storage_path: str = Field("runs", description="Where runs live (shared storage on a cluster).")
    seed: int = Field(0, description="Seed for weights, data order and sampling.")
    checkpoint_every: int = Field(100, ge=1, description="Steps between Ray Train checkpoints (full DeepSpeed state).")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept (Ray Train num_to_keep).")
    max_failures: int = Field(1, ge=-1, description="Worker-group restarts from the last checkpoint (-1: unlimited).")
    eval_every: int = Field(50, ge=1, description="Steps between held-out evaluations.")
    eval_batches: int = Field(8, ge=1, description="Micro-batches per rank in each evaluation.")
    samples: int = Field(3, ge=0, description="Greedy samples printed at the end.")


class LoggingSpec(Section):
    log_every: int = Field(10, ge=1, description="Steps between progress lines (rank 0).")
    tensorboard: bool = Field(True, description="Write TensorBoard events to the run dir.")
    peak_tflops: float | None = Field(None, gt=0, description="Per-worker peak TFLOP/s for MFU; known GPUs are detected.")


class StageSpec(Section):
    stage: str
    model: ModelSpec = Field(default_factory=ModelSpec)
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    optim: OptimSpec = Field(default_factory=OptimSpec)
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec)
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    run: RunSpec = Field(default_factory=RunSpec)
    logging: LoggingSpec = Field(default_factory=LoggingSpec)

    @model_validator(mode="after")
    def _fits_context(self):
        from raystages.models import context_length

        # A preset's context is known here; a checkpoint's is read by the preflight.
        ctx = context_length(self.model.preset if not self.model.path else None, None,
                             self.model.config_overrides)
        if ctx is not None and self.optim.seq_len > ctx:
            raise ValueError(f"optim.seq_len {self.optim.seq_len} exceeds the model's context of {ctx} tokens")
        return self

    def run_dir(self) -> Path:
        return Path(self.run.storage_path).resolve() / self.run.name

    def digest(self) -> str:
        """A stable hash of the spec: the same spec gives the same hash on every machine."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


class MlmSpec(Section):
    mask_prob: float = Field(0.15, gt=0, lt=1, description="Share of each block's non-special tokens chosen for prediction (at least one per block).")
    mask_token_frac: float = Field(0.8, ge=0, le=1, description="Of the chosen tokens, the share replaced by [MASK].")
    random_token_frac: float = Field(0.1, ge=0, le=1, description="Of the chosen tokens, the share replaced by a random token; the rest stay as they are.")
    whole_word: bool = Field(False, description="Choose whole words: all WordPiece pieces (`##x`) of a chosen word are masked together.")

    @model_validator(mode="after")
    def _fractions(self):
        if self.mask_token_frac + self.random_token_frac > 1:
            raise ValueError("mask_token_frac + random_token_frac must be <= 1")
        return self


class PretrainSpec(StageSpec):
    """Pretraining: a causal LM, or a masked-LM encoder, on packed blocks of unlabelled text."""

    stage: Literal["pretrain"] = "pretrain"
    objective: Literal["causal", "mlm"] = Field("causal", description="`causal`: next-token prediction (Llama presets); `mlm`: masked-LM, BERT-style (bert-* presets or an encoder checkpoint).")
    mlm: MlmSpec = Field(default_factory=MlmSpec)

    @model_validator(mode="after")
    def _objective_fits_model(self):
        from raystages.models import is_encoder_preset

        if self.model.path:
            return self
        encoder = is_encoder_preset(self.model.preset)
        if encoder and self.objective == "causal":
            raise ValueError(f"model.preset {self.model.preset!r} is an encoder: set objective=mlm")
        if not encoder and self.objective == "mlm":
            raise ValueError(f"objective mlm needs an encoder: set model.preset to bert-nano, bert-tiny "
                             f"or bert-small (got {self.model.preset!r}), or model.path to an encoder checkpoint")
        return self


SPECS: dict[str, type[StageSpec]] = {"pretrain": PretrainSpec}


def register(name: str, spec_cls: type[StageSpec]) -> None:
    SPECS[name] = spec_cls


def spec_class(stage: str) -> type[StageSpec] | None:
    """The spec class of ``stage`` (importing the module that defines it), or None."""
    import importlib

    from raystages.registry import STAGES

    if stage not in SPECS and stage in STAGES:
        importlib.import_module(STAGES[stage].spec_module)
    return SPECS.get(stage)


def parse_assignment(item: str, what: str = "override") -> tuple[str, Any]:
    """``key.path=value`` -> ``(key.path, value)``, the value read as a YAML scalar
    (``1e-3``, ``true``, ``[a, b]``); an empty value is None. SpecError when malformed."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise SpecError(f"{what} {item!r}: expected {'key.path' if what == 'override' else 'key'}=value")
    try:
        return key, (yaml.safe_load(value) if value != "" else None)
    except yaml.YAMLError as e:
        raise SpecError(f"{what} {key!r}: value is not valid YAML: {e}") from None


def set_dotted(raw: dict, key: str, value: Any) -> None:
    """``raw[a][b][c] = value`` for ``key`` ``a.b.c``, creating sections on the way."""
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise SpecError(f"override {key!r}: {part!r} is not a section")
    node[parts[-1]] = value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides:
        set_dotted(raw, *parse_assignment(item))
    return raw


def parse_options(items: list[str], defaults: dict, what: str) -> dict:
    """Flat ``key=value`` options over ``defaults`` (``raystages bench`` options)."""
    opts = dict(defaults)
    for item in items:
        key, value = parse_assignment(item, what)
        if key not in opts:
            raise SpecError(f"{what}: unknown option {key!r}; known: {sorted(opts)}")
        opts[key] = value
    return opts


def validation_lines(error: ValidationError, prefix: str = "") -> str:
    """One ``  field.path: what is wrong (got value)`` line per pydantic error, fields
    named from ``prefix`` (e.g. ``tune.``), for SpecError messages."""
    lines = []
    for err in error.errors():
        loc = (prefix + ".".join(str(p) for p in err["loc"])).rstrip(".") or "(spec)"
        msg = err["msg"].removeprefix("Value error, ")
        shown = err["type"] != "missing" and not isinstance(err.get("input"), dict)
        lines.append(f"  {loc}: {msg}" + (f" (got {err['input']!r})" if shown else ""))
    return "\n".join(lines)


def parse_spec(raw: dict, stage: str | None = None, source: str = "<spec>") -> StageSpec:
    from raystages.registry import STAGES

    stage = stage or raw.get("stage")
    cls = spec_class(stage) if isinstance(stage, str) else None
    if cls is None:
        raise SpecError(f"{source}: stage: {stage!r} is not one of {sorted(STAGES)}")
    raw = {**raw, "stage": stage}
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        raise SpecError(f"{source}: invalid {stage} spec\n" + validation_lines(e)) from None


def read_yaml_mapping(path: str | Path) -> dict:
    """A YAML file that must hold a mapping, read with the safe loader; SpecError otherwise."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"spec file {str(p)!r} does not exist")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise SpecError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{p}: a spec is a mapping of sections, got {type(raw).__name__}")
    return raw


def load_spec(path: str | Path | None, overrides: list[str] = (), stage: str | None = None) -> StageSpec:
    """Read a YAML spec (or start from defaults when ``path`` is None), apply overrides, validate."""
    raw = read_yaml_mapping(path) if path is not None else {}
    raw = apply_overrides(raw, list(overrides))
    return parse_spec(raw, stage, source=str(path or "<defaults>"))


# --- SFT and reward-model specs -------------------------------------------------------------

class ChatFieldsSpec(Section):
    format: Literal["auto", "messages", "prompt_completion", "instruction"] = Field(
        "auto", description="Row schema; `auto` picks by which fields a row has.")
    messages_field: str = Field("messages", description="Conversational rows: list of {role, content}.")
    prompt_field: str = Field("prompt", description="Prompt/completion rows: the prompt (text or messages).")
    completion_field: str = Field("completion", description="Prompt/completion rows: the answer.")
    instruction_field: str = Field("instruction", description="Instruction rows: the task.")
    input_field: str = Field("input", description="Instruction rows: optional input appended to the task.")
    output_field: str = Field("output", description="Instruction rows: the answer (alpaca `instances` lists also work).")


class LoraSpec(Section):
    enabled: bool = Field(False, description="Train LoRA adapters (peft) instead of all weights; merged into the export.")
    r: int = Field(8, ge=1, description="Adapter rank.")
    alpha: float = Field(16.0, gt=0, description="Adapter scale numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
                                      description="Module names that get adapters.")


class HeadSpec(Section):
    text_field: str = Field("text", description="classification: the text of a row.")
    text_pair_field: str | None = Field(None, description="classification: an optional second text, encoded as a pair ([CLS] a [SEP] b [SEP]).")
    label_field: str = Field("label", description="classification: the label, a name or an int id.")
    tokens_field: str = Field("tokens", description="token_classification: the list of words.")
    tags_field: str = Field("tags", description="token_classification: one BIO tag (name or int id) per word.")
    labels: list[str] | None = Field(None, description="Label names in id order. Default: from the data (int ids: 0..max; names: sorted, `O` first).")
    num_labels: int | None = Field(None, ge=2, description="Expected number of labels: an error before training if the data has another number.")
    class_weights: Literal["none", "balanced"] | list[float] = Field("none", description="Loss weight per label: `balanced` = n / (num_labels * count), or one number per label.")

    @model_validator(mode="after")
    def _labels(self):
        if self.labels is not None:
            if len(set(self.labels)) != len(self.labels) or len(self.labels) < 2:
                raise ValueError("labels: need two or more distinct names")
            if self.num_labels is not None and self.num_labels != len(self.labels):
                raise ValueError(f"num_labels {self.num_labels} but {len(self.labels)} labels are named")
        if isinstance(self.class_weights, list):
            if any(w < 0 for w in self.class_weights) or not any(self.class_weights):
                raise ValueError("class_weights: non-negative numbers, not all 0")
            known = self.num_labels or (len(self.labels) if self.labels else None)
            if known is not None and len(self.class_weights) != known:
                raise ValueError(f"class_weights has {len(self.class_weights)} numbers for {known} labels")
        return self


class SftSection(Section):
    task: Literal["chat", "classification", "token_classification"] = Field(
        "chat", description="`chat`: loss on answer tokens; `classification` / `token_classification`: a new head on the body (see `sft.head`).")
    head: HeadSpec = Field(default_factory=HeadSpec, description="Task-head fields, labels and class weights.")
    fields: ChatFieldsSpec = Field(default_factory=ChatFieldsSpec)
    packing: bool = Field(False, description="Several examples per optim.seq_len block (no attention across them); off: one padded example per row.")
    truncate: bool = Field(False, description="Cut examples longer than optim.seq_len instead of skipping them (still skipped if no answer token is left).")
    eval_prompts: int = Field(100, ge=0, description="Built-in task: held-out prompts answered greedily before and after SFT for exact-match accuracy.")
    max_new_tokens: int = Field(24, ge=1, description="Token budget of those greedy answers.")
    lora: LoraSpec = Field(default_factory=LoraSpec)


class SftSpec(StageSpec):
    """Supervised fine-tuning: a checkpoint learns to answer, loss on assistant tokens only."""

    stage: Literal["sft"] = "sft"
    sft: SftSection = Field(default_factory=SftSection)

    @model_validator(mode="after")
    def _needs_checkpoint(self):
        if not self.model.path:
            raise ValueError("model.path: SFT starts from a checkpoint (e.g. runs/pretrain/model); set model.path")
        if self.sft.task != "chat" and (self.sft.lora.enabled or self.sft.packing):
            raise ValueError(f"sft.task {self.sft.task}: sft.lora and sft.packing are for chat SFT; turn them off")
        return self


class PreferenceFieldsSpec(Section):
    prompt_field: str = Field("prompt", description="Shared prompt (text or messages); rows without it give full conversations.")
    chosen_field: str = Field("chosen", description="The preferred response (or full conversation).")
    rejected_field: str = Field("rejected", description="The other response (or full conversation).")
    margin_field: str = Field("margin", description="Optional per-pair margin column.")


class RmSection(Section):
    fields: PreferenceFieldsSpec = Field(default_factory=PreferenceFieldsSpec)
    center_coef: float = Field(0.0, ge=0, description="Weight of the centring term coef * (r_chosen + r_rejected)^2.")
    lora: LoraSpec = Field(default_factory=LoraSpec, description="LoRA adapters on the body; the new score head trains whole. Merged into the export.")


class RmSpec(StageSpec):
    """Reward model: a checkpoint with a scalar head learns pairwise preferences."""

    stage: Literal["rm"] = "rm"
    rm: RmSection = Field(default_factory=RmSection)

    @model_validator(mode="after")
    def _needs_checkpoint(self):
        if not self.model.path:
            raise ValueError("model.path: the reward model starts from a checkpoint (e.g. runs/sft/model); set model.path")
        return self


register("sft", SftSpec)
register("rm", RmSpec)

