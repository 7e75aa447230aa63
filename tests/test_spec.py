"""Specs: defaults, overrides, and bad specs / bad data that exit 2 naming the problem
before any Ray process starts."""

import gzip
import json

import pytest

from raystages import cli
from raystages.spec import PretrainSpec, SpecError, load_spec
from tests.conftest import ROOT




def test_every_job_spec_in_jobs_validates():
    """Stage specs, pipelines (the GPU one included), tune and serve specs: each through the
    loader its command uses, so a spec in jobs/ never fails at submit time."""
    import yaml

    from raystages.pipeline import load_pipeline
    from raystages.serve.spec import load_serve_spec
    from raystages.registry import STAGES
    from raystages.tune import load_tune

    kinds = set()
    for path in sorted((ROOT / "jobs").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        if "stages" in raw:
            pipe = load_pipeline(path)
            kinds.add("pipeline")
            for stage in pipe.stages:
                assert pipe.stage_spec(stage).stage == stage
        elif "tune" in raw:
            load_tune(path)
            kinds.add("tune")
        elif "serve" in raw:
            load_serve_spec(path)
            kinds.add("serve")
        else:
            assert raw.get("stage") in STAGES, path
            kinds.add(load_spec(path).stage)
    assert kinds == {"pipeline", "tune", "serve", "pretrain", "sft", "rm", "dpo", "rl"}
    gpu = load_pipeline(ROOT / "jobs" / "gpu-llama1b.yaml")
    assert all(gpu.stage_spec(s).scaling.use_gpu for s in gpu.stages)
    assert gpu.stage_spec("rl").rollout.engine == "vllm" and gpu.stage_spec("pretrain").model.preset == "llama-1b"


def test_overrides_are_typed_and_dotted():
    spec = load_spec(ROOT / "jobs" / "pretrain.yaml",
                     ["optim.lr=1e-4", "scaling.num_workers=1", "deepspeed.zero_stage=3",
                      "model.config_overrides.num_hidden_layers=2"])
    assert isinstance(spec, PretrainSpec)
    assert spec.optim.lr == 1e-4 and spec.scaling.num_workers == 1 and spec.deepspeed.zero_stage == 3
    assert spec.model.config_overrides == {"num_hidden_layers": 2}
    assert spec.digest() == load_spec(ROOT / "jobs" / "pretrain.yaml", [
        "optim.lr=1e-4", "scaling.num_workers=1", "deepspeed.zero_stage=3",
        "model.config_overrides.num_hidden_layers=2"]).digest()


def test_frozen_models_get_the_trained_models_deepspeed_config_without_its_training_keys():
    """One config builder: a frozen reference or reward model is sharded and offloaded like the
    policy, with the user's raw ``deepspeed.config`` merged, but gets no optimizer to build."""
    from raystages.train.optim import deepspeed_config

    spec = load_spec(ROOT / "jobs" / "pretrain.yaml", [
        "deepspeed.zero_stage=3", "deepspeed.offload_param=true", "deepspeed.offload_optimizer=true",
        "deepspeed.bucket_mb=1", "deepspeed.config.zero_optimization.contiguous_gradients=false",
        "deepspeed.config.scheduler.type=WarmupLR"])
    trained, frozen = deepspeed_config(spec), deepspeed_config(spec, trainable=False)
    for key in ("optimizer", "scheduler", "gradient_accumulation_steps", "gradient_clipping"):
        assert key in trained and key not in frozen
    assert "offload_optimizer" in trained["zero_optimization"]
    assert trained["zero_optimization"] == frozen["zero_optimization"] | {
        "offload_optimizer": trained["zero_optimization"]["offload_optimizer"]}
    assert frozen["zero_optimization"]["reduce_bucket_size"] == 2**20 // 4
    assert frozen["zero_optimization"]["contiguous_gradients"] is False
    assert frozen["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert frozen["train_micro_batch_size_per_gpu"] == spec.optim.micro_batch_size


def _write(tmp_path, name, content, mode="w"):
    p = tmp_path / name
    if mode == "wb":
        p.write_bytes(content)
    else:
        p.write_text(content)
    return str(p)


BAD_SPECS = [
    (["optim.lr=-1"], "optim.lr"),
    (["deepspeed.zero_stage=5"], "deepspeed.zero_stage"),
    (["optim.seq_len=4096"], "context"),
    (["optim.seq_len=0"], "optim.seq_len"),
    (["optim.typo=1"], "optim.typo"),
    (["surprise=1"], "surprise"),
    (["scaling.num_workers=zero"], "scaling.num_workers"),
    (["model.preset=huge"], "preset"),
    (["data.source=/nope/missing.jsonl"], "does not exist"),
    (["deepspeed.offload_param=true", "deepspeed.zero_stage=2"], "offload_param"),
    (["run.name=has space"], "run.name"),
    (["data.builtin.min_len=9", "data.builtin.max_len=3"], "min_len"),
    (["optim"], "expected key.path=value"),
]


@pytest.mark.parametrize("overrides,needle", BAD_SPECS)
def test_bad_specs_exit_2_naming_the_field(overrides, needle, capsys, no_ray):
    code = cli.main(["pretrain", str(ROOT / "jobs" / "pretrain.yaml"), *overrides])
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err, err


def test_unsafe_yaml_is_refused(tmp_path, capsys, no_ray):
    spec = _write(tmp_path, "evil.yaml", "stage: pretrain\nrun: !!python/object/apply:os.system ['true']\n")
    assert cli.main(["pretrain", spec]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_missing_spec_file_and_non_mapping(tmp_path, capsys, no_ray):
    assert cli.main(["pretrain", str(tmp_path / "none.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["pretrain", _write(tmp_path, "list.yaml", "- 1\n- 2\n")]) == 2
    assert "mapping" in capsys.readouterr().err


BAD_DATA = [
    ("empty.jsonl", b"", "is empty"),
    ("latin1.txt", "caf\xe9 au lait\n".encode("latin-1"), "not UTF-8"),
    ("rows.jsonl", b'{"text": "fine"}\n{"body": "no text field"}\n', "line 2: missing text field 'text'"),
    ("broken.jsonl", b'{"text": "fine"}\n{"text": \n', "line 2: not valid JSON"),
    ("blank.jsonl", b'{"text": "   "}\n', "line 1: field 'text' is empty"),
    ("number.jsonl", b'{"text": 42}\n', "line 1: field 'text' is int"),
    ("table.csv", b"a,b\n", "unsupported file type"),
]


@pytest.mark.parametrize("name,content,needle", BAD_DATA)
def test_bad_data_exits_2_naming_file_and_row(tmp_path, name, content, needle, capsys, no_ray):
    path = _write(tmp_path, name, content, mode="wb")
    code = cli.main(["pretrain", str(ROOT / "jobs" / "pretrain.yaml"), f"data.source={path}",
                     f"run.storage_path={tmp_path}/runs"])
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err and name in err, err


def test_skip_mode_counts_bad_rows(tmp_path):
    from raystages.data.sources import read_rows, text_of

    path = _write(tmp_path, "mixed.jsonl.gz", b"", mode="wb")
    with gzip.open(path, "wt") as f:
        for i in range(5):
            f.write(json.dumps({"text": f"row {i}"} if i % 2 == 0 else {"other": i}) + "\n")
    rows = read_rows(path, text_of("text"), on_bad_row="skip")
    assert rows.rows == ["row 0", "row 2", "row 4"]
    assert len(rows.skipped) == 2 and "line 2" in rows.skipped[0]
    with pytest.raises(Exception, match="line 2"):
        read_rows(path, text_of("text"), on_bad_row="error")


def test_text_and_parquet_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raystages.data.sources import read_rows, text_of

    txt = _write(tmp_path, "doc.txt", "first para\nline two\n\n\nsecond para\n")
    assert read_rows(txt, text_of("text")).rows == ["first para\nline two", "second para\n"]
    pq.write_table(pa.table({"content": ["a", "b"]}), tmp_path / "t.parquet")
    assert read_rows(str(tmp_path / "t.parquet"), text_of("content")).rows == ["a", "b"]
    words = _write(tmp_path, "tagged.jsonl", '{"tokens": ["New", "York"]}\n{"tokens": ["a", 1]}\n')
    with pytest.raises(Exception, match="line 2.*not text"):
        read_rows(words, text_of("tokens"))
    assert read_rows(words, text_of("tokens"), on_bad_row="skip").rows == ["New York"]


def test_spec_error_is_a_value_error_with_all_problems():
    with pytest.raises(SpecError) as e:
        load_spec(None, ["optim.lr=-1", "optim.max_steps=0"], stage="pretrain")
    assert "optim.lr" in str(e.value) and "optim.max_steps" in str(e.value)


def test_specs_parse_without_touching_the_filesystem_the_job_checks_where_it_runs(capsys, no_ray):
    """A path that exists only on the cluster: the spec parses (so `submit` sends it), and the
    preflight, where the job runs, names the field (exit 2 before Ray starts)."""
    from raystages import jobs
    from raystages.preflight import preflight

    cluster_only = ["data.source=/cluster/only/corpus.txt", "model.path=/cluster/only/sft/model"]
    spec = load_spec(ROOT / "jobs" / "sft.yaml", cluster_only)
    assert jobs.plan("jobs/sft.yaml", cluster_only).resolved["data"]["source"] == "/cluster/only/corpus.txt"
    with pytest.raises(SpecError) as e:
        preflight(spec)
    assert "data.source: file '/cluster/only/corpus.txt' does not exist" in str(e.value)
    assert "model.path: '/cluster/only/sft/model' does not exist" in str(e.value)  # every problem at once
    assert cli.main(["sft", str(ROOT / "jobs" / "sft.yaml"), *cluster_only]) == 2
    assert "data.source" in capsys.readouterr().err
