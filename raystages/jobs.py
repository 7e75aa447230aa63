"""Ray Jobs: run any stage, pipeline or tune spec on a Ray cluster from your laptop.

    raystages submit jobs/pretrain.yaml optim.max_steps=500 --address http://HEAD:8265
    raystages status [ID] | raystages logs ID [--follow] | raystages stop ID

The spec is validated here first (a bad one exits 2 before anything is sent). The job runs
``raystages <command> <spec> <overrides>`` on the head through ``JobSubmissionClient``,
with this checkout as its ``working_dir`` (``.venv``, ``runs``, ``.git`` left out), or with
``--image-installed`` only the spec file, for clusters whose image has raystages baked in.
Its submission id is a pure function of the command and the resolved spec, so submitting
the same run twice follows the first submission instead of starting a second one.

Ray 2.60 clusters use token auth: ``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH`` (or the
default ``~/.ray/auth_token``) are sent as the cluster expects.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse


from raystages.spec import apply_overrides, read_yaml_mapping

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
EXCLUDES = [".venv", "runs", ".git", "**/__pycache__", "*.egg-info", ".pytest_cache"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
AUTH_HELP = (
    "the cluster uses Ray token authentication and did not accept this request. Give the "
    "cluster's token: export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=<token> (or "
    "RAY_AUTH_TOKEN_PATH=<file with the token>); on the head node `ray get-auth-token` prints "
    "it; on KubeRay it is the `auth_token` key of the cluster's Secret")


class JobsError(Exception):
    """A job command that cannot proceed; ``code`` is the CLI exit status."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


@dataclass
class Submission:
    command: str              # the raystages sub-command run on the cluster
    spec_path: Path
    overrides: list[str]
    name: str                 # run (or pipeline) name, part of the id
    resolved: dict            # the validated spec, hashed into the id
    extra_overrides: list[str] = field(default_factory=list)

    @property
    def submission_id(self) -> str:
        blob = json.dumps({"command": self.command, "spec": self.resolved}, sort_keys=True, default=str)
        return f"raystages-{self.command}-{self.name}-{hashlib.sha256(blob.encode()).hexdigest()[:8]}"


def plan(spec_path: str, overrides: list[str], stage: str | None = None) -> Submission:
    """Validate the spec locally and decide what runs on the cluster: a pipeline (a spec with
    ``stages:``), a tune run (a stage spec with a ``tune:`` block) or one stage."""
    path = Path(spec_path)
    raw = apply_overrides(read_yaml_mapping(path), list(overrides))
    if "stages" in raw:
        from raystages.pipeline import load_pipeline

        pipe = load_pipeline(path, overrides)
        return Submission("pipeline", path, list(overrides), pipe.name, pipe.model_dump(mode="json"))
    if "tune" in raw:
        from raystages.tune import load_tune

        spec, tune = load_tune(path, overrides, stage)
        return Submission("tune", path, list(overrides), spec.run.name,
                          {"spec": spec.model_dump(mode="json"), "tune": tune.model_dump(mode="json")})
    from raystages.spec import load_spec

    spec = load_spec(path, overrides, stage=stage)
    return Submission(spec.stage, path, list(overrides), spec.run.name, spec.model_dump(mode="json"))


def storage_override(sub: Submission, address: str) -> None:
    """A relative storage path would land inside the job's unpacked working_dir on the head
    and vanish with it. On a local head, pin it to this checkout's path; elsewhere, say so."""
    storage = (sub.resolved.get("storage_path") if sub.command == "pipeline"
               else (sub.resolved.get("spec", sub.resolved))["run"]["storage_path"])
    if storage is None or os.path.isabs(storage) or "://" in storage:
        return
    key = "storage_path" if sub.command == "pipeline" else "run.storage_path"
    if urlparse(address).hostname in LOCAL_HOSTS:
        sub.extra_overrides.append(f"{key}={Path(storage).resolve()}")
    else:
        print(f"raystages: note: {key}={storage} is relative; on the cluster it resolves inside the "
              f"job's working dir. Pass {key}=/shared/path for checkpoints that outlive the job.",
              file=sys.stderr)


def project_root() -> Path | None:
    """This checkout (the editable install's source tree), or None for an installed wheel."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() and (root / "raystages").is_dir() else None


def runtime_env(sub: Submission, image_installed: bool, env: dict[str, str], pip: list[str],
                staging: Path) -> tuple[str, dict]:
    """(entrypoint, runtime_env) for ``sub``."""
    from raystages.train.runner import QUIET_ENV

    renv: dict = {"env_vars": {**QUIET_ENV, **env}}
    if pip:
        renv["pip"] = list(pip)
    if image_installed:
        # Ship only the spec: the cluster's image has raystages and its dependencies.
        shutil.copy(sub.spec_path, staging / sub.spec_path.name)
        renv["working_dir"] = str(staging)
        spec_arg, exe = sub.spec_path.name, ["raystages"]
    else:
        root = project_root()
        if root is None:
            raise JobsError("raystages is not installed from a checkout here, so there is no "
                            "project to upload: use --image-installed", 2)
        try:
            spec_arg = str(sub.spec_path.resolve().relative_to(root))
        except ValueError:
            raise JobsError(f"{sub.spec_path}: the spec must be inside the project ({root}) to be "
                            "uploaded with it; move it there or use --image-installed", 2) from None
        renv.update(working_dir=str(root), excludes=EXCLUDES)
        # `python -m` runs the uploaded code even where raystages is not installed.
        exe = ["python", "-m", "raystages.cli"]
    argv = [*exe, sub.command, spec_arg, *sub.overrides, *sub.extra_overrides]
    return " ".join(shlex.quote(a) for a in argv), renv


def enable_token_auth() -> None:
    """Send the token when the user gave one: Ray's client only does with RAY_AUTH_MODE=token."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    default = Path.home() / ".ray" / "auth_token"
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") or default.is_file():
        os.environ["RAY_AUTH_MODE"] = "token"
        try:  # make an already-imported Ray see the mode (same call Ray's own CLI makes)
            from ray._raylet import Config

            Config.initialize("")
        except Exception:
            pass


def connect(address: str | None):
    """A ``JobSubmissionClient`` for ``address``, failing fast with a message that says what
    to do (nothing listening, not a Ray dashboard, token refused)."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or DEFAULT_ADDRESS
    if "://" not in address:
        address = f"http://{address}"
    url = urlparse(address)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:  # a plain TCP probe first: an unreachable host otherwise hangs for minutes
        socket.create_connection((url.hostname, port), timeout=5).close()
    except OSError as e:
        raise JobsError(f"no Ray cluster at {address} ({e.strerror or e}): start one with "
                        "`ray start --head --dashboard-host=0.0.0.0` or pass --address "
                        "http://HEAD:8265 (the dashboard port)") from None
    enable_token_auth()
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except AuthenticationError:
        raise JobsError(f"{address}: {AUTH_HELP}") from None
    except (ConnectionError, RuntimeError) as e:
        raise JobsError(f"{address} does not answer as a Ray dashboard ({e}); pass the "
                        "dashboard's address, e.g. http://HEAD:8265") from None


def call(fn, *args, **kwargs):
    """One client call with the auth/lost-cluster errors turned into clear ones."""
    from ray.exceptions import AuthenticationError

    try:
        return fn(*args, **kwargs)
    except AuthenticationError:
        raise JobsError(AUTH_HELP) from None
    except OSError as e:  # requests' ConnectionError/Timeout are OSErrors, not ConnectionError
        raise JobsError(f"lost the Ray cluster ({type(e).__name__}: {e}); if it went away, "
                        "its jobs went with it: `raystages status ID` once it is back") from None


def submit(sub: Submission, client, entrypoint: str, renv: dict, force: bool = False) -> str:
    """Submit (or find the earlier submission of the same run) and return its id."""
    sid = sub.submission_id
    info = _info(client, sid)
    if info is not None:
        if info.status.value not in TERMINAL:
            print(f"raystages: {sid} is already {info.status.value}: following it", file=sys.stderr)
            return sid
        if not force:
            raise JobsError(f"{sid} already ran ({info.status.value}); `raystages logs {sid}` shows "
                            "it, --force submits it again", 2)
        call(client.delete_job, sid)
    for attempt in range(10):
        try:
            return call(client.submit_job, entrypoint=entrypoint, runtime_env=renv, submission_id=sid,
                        metadata={"raystages_command": sub.command, "raystages_run": sub.name})
        except RuntimeError as e:
            # A head that just started may not have its job agent yet.
            if "No available agent" not in str(e) or attempt == 9:
                raise JobsError(f"submission rejected: {e}") from None
            time.sleep(3)
    raise AssertionError("unreachable")


def _info(client, sid: str):
    try:
        return call(client.get_job_info, sid)
    except RuntimeError as e:
        if "404" in str(e) or "does not exist" in str(e):
            return None
        raise


def follow(client, sid: str, poll_s: float = 2.0, out=sys.stdout) -> str:
    """Print the job's log as it grows until it ends; returns the final status."""
    shown = 0
    while True:
        status = call(client.get_job_status, sid).value
        logs = call(client.get_job_logs, sid)
        if len(logs) > shown:
            out.write(logs[shown:])
            out.flush()
            shown = len(logs)
        if status in TERMINAL:
            return status
        time.sleep(poll_s)


def describe(info) -> str:
    lines = [f"{info.submission_id}  {info.status.value}"]
    if info.message:
        lines.append(f"  {info.message.strip()}")
    lines.append(f"  entrypoint: {info.entrypoint}")
    for key in ("start_time", "end_time"):
        ms = getattr(info, key)
        if ms:
            lines.append(f"  {key.replace('_', ' ')}: {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(ms / 1000))}")
    return "\n".join(lines)


def stage_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="raystages-submit-"))
