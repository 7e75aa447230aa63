"""Sub-commands that act on clusters and whole runs: submit/status/logs/stop (Ray Jobs),
tune (Ray Tune), pipeline and lineage. ``add_commands`` registers them on the main parser."""

from __future__ import annotations

import argparse
import sys

from raystages.registry import STAGES

STAGE_CHOICES = tuple(STAGES)


def _env_pairs(items: list[str]) -> dict[str, str]:
    from raystages.jobs import JobsError

    out = {}
    for item in items:
        if "=" not in item:
            raise JobsError(f"--env {item!r}: expected KEY=VALUE", 2)
        k, v = item.split("=", 1)
        out[k] = v
    return out


def _jobs_errors(fn):
    """JobsError -> its message and exit status; Ctrl-C while following leaves the job running."""
    def wrapper(args) -> int:
        from raystages.jobs import JobsError

        try:
            return fn(args)
        except JobsError as e:
            print(f"raystages: {e}", file=sys.stderr)
            return e.code
        except KeyboardInterrupt:
            print("\nraystages: stopped following; the job keeps running "
                  "(`raystages stop ID` ends it)", file=sys.stderr)
            return 130
    return wrapper


@_jobs_errors
def _submit(args) -> int:
    from raystages import jobs

    sub = jobs.plan(args.spec, args.overrides, args.stage)  # SpecError -> exit 2, nothing sent
    env = _env_pairs(args.env)
    address = args.address
    client = jobs.connect(address)
    jobs.storage_override(sub, client.get_address())
    entrypoint, renv = jobs.runtime_env(sub, args.image_installed, env, args.pip, jobs.stage_dir())
    sid = jobs.submit(sub, client, entrypoint, renv, force=args.force)
    print(f"raystages: submitted {sid}\n  entrypoint: {entrypoint}", file=sys.stderr)
    if args.no_wait:
        print(sid)
        return 0
    status = jobs.follow(client, sid)
    info = jobs.call(client.get_job_info, sid)
    print(f"\n{jobs.describe(info)}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


@_jobs_errors
def _status(args) -> int:
    from raystages import jobs

    client = jobs.connect(args.address)
    if args.id:
        info = jobs._info(client, args.id)
        if info is None:
            raise jobs.JobsError(f"no job {args.id!r} on {client.get_address()}", 2)
        print(jobs.describe(info))
        return 0
    for info in sorted(jobs.call(client.list_jobs), key=lambda i: i.start_time or 0):
        if (info.submission_id or "").startswith("raystages-"):
            print(f"{info.submission_id}  {info.status.value}")
    return 0


@_jobs_errors
def _logs(args) -> int:
    from raystages import jobs

    client = jobs.connect(args.address)
    if jobs._info(client, args.id) is None:
        raise jobs.JobsError(f"no job {args.id!r} on {client.get_address()}", 2)
    if args.follow:
        return 0 if jobs.follow(client, args.id) == "SUCCEEDED" else 1
    print(jobs.call(client.get_job_logs, args.id), end="")
    return 0


@_jobs_errors
def _stop(args) -> int:
    import time

    from raystages import jobs

    client = jobs.connect(args.address)
    if jobs._info(client, args.id) is None:
        raise jobs.JobsError(f"no job {args.id!r} on {client.get_address()}", 2)
    jobs.call(client.stop_job, args.id)
    if args.no_wait:
        return 0
    for _ in range(120):
        status = jobs.call(client.get_job_status, args.id).value
        if status in jobs.TERMINAL:
            print(f"{args.id}  {status}")
            return 0
        time.sleep(1)
    raise jobs.JobsError(f"{args.id} did not stop within 120 s")


def _tune(args) -> int:
    from raystages.preflight import preflight
    from raystages.tune import load_tune, run_tune

    spec, tune = load_tune(args.spec, args.overrides, args.stage)  # SpecError -> exit 2
    preflight(spec)  # before any trial starts; every trial's stage checks again where it runs
    try:
        result = run_tune(spec, tune)
    except RuntimeError as e:
        print(f"raystages: {e}", file=sys.stderr)
        return 1
    print(f"\n== tune {spec.stage}: {len(result.rows)} trials ==\n{result.table}")
    print(f"  best           {tune.metric} = {result.best_metric:.4g}  "
          + " ".join(f"{k}={v}" for k, v in result.best_config.items()))
    print(f"  best spec      {result.best_spec}   (raystages {spec.stage} {result.best_spec})")
    print(f"  best checkpoint {result.best_checkpoint or '(none: the best trial was stopped before its export)'}")
    return 0


def _pipeline(args) -> int:
    from raystages.pipeline import load_pipeline, preflight_pipeline, run_pipeline
    from raystages.report import write_report

    pipe = load_pipeline(args.spec, args.overrides)  # SpecError -> exit 2
    preflight_pipeline(pipe)  # files, checkpoints, reward code: before any stage starts
    state = run_pipeline(pipe, say=lambda line: print(f"raystages: {line}", flush=True))
    report = write_report(pipe, state)
    print(f"\npipeline {pipe.name} finished; report: {report}")
    for stage, st in state["stages"].items():
        print(f"  {stage:<9} {st['status']:<8} {st['export']}")
    return 0


def _lineage(args) -> int:
    from pathlib import Path

    from raystages.pipeline import format_chain, lineage_chain

    p = Path(args.checkpoint)
    if not ((p / "lineage.json").is_file() or (p / "model" / "lineage.json").is_file()):
        print(f"raystages: {p}: no lineage.json (not a raystages checkpoint or run dir)", file=sys.stderr)
        return 2
    chain = lineage_chain(p)
    if args.json:
        import json

        print(json.dumps(chain, indent=2, default=str))
    else:
        print(format_chain(chain))
    return 0


def _address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None,
                   help="Ray dashboard address (default: $RAY_API_SERVER_ADDRESS or http://127.0.0.1:8265)")


def add_commands(sub) -> None:
    """Register the cluster sub-commands on the main parser's sub-parsers."""
    sp = sub.add_parser("submit", help="run a stage, pipeline or tune spec on a Ray cluster (Ray Jobs)")
    sp.add_argument("spec", help="YAML job spec: a stage spec, a pipeline (`stages:`) or a stage spec with `tune:`")
    sp.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    _address(sp)
    sp.add_argument("--stage", choices=STAGE_CHOICES, help="stage of a spec without a `stage:` key")
    sp.add_argument("--no-wait", action="store_true", help="print the submission id and return")
    sp.add_argument("--image-installed", action="store_true",
                    help="raystages is installed on the cluster (e.g. the Docker image): upload only the spec")
    sp.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment variable of the job")
    sp.add_argument("--pip", action="append", default=[], metavar="PKG", help="extra pip package for the job's runtime_env")
    sp.add_argument("--force", action="store_true", help="submit again a run that already finished")
    sp.set_defaults(func=_submit)
    sp = sub.add_parser("status", help="a submitted job's status (all raystages jobs without ID)")
    sp.add_argument("id", nargs="?")
    _address(sp)
    sp.set_defaults(func=_status)
    sp = sub.add_parser("logs", help="a submitted job's log")
    sp.add_argument("id")
    sp.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    _address(sp)
    sp.set_defaults(func=_logs)
    sp = sub.add_parser("stop", help="stop a submitted job")
    sp.add_argument("id")
    sp.add_argument("--no-wait", action="store_true", help="return without waiting for STOPPED")
    _address(sp)
    sp.set_defaults(func=_stop)
    sp = sub.add_parser("tune", help="Ray Tune over a stage spec's `tune:` block")
    sp.add_argument("spec", help="stage spec with a `tune:` block")
    sp.add_argument("overrides", nargs="*", help="dotted key=value overrides (tune.* too)")
    sp.add_argument("--stage", choices=STAGE_CHOICES, help="stage of a spec without a `stage:` key")
    sp.set_defaults(func=_tune)
    sp = sub.add_parser("pipeline", help="pretrain -> SFT -> RM -> RL from one spec, then a run report")
    sp.add_argument("spec", help="pipeline spec (`stages:` with a section per stage)")
    sp.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. stages.rl.algo.iterations=5")
    sp.set_defaults(func=_pipeline)
    sp = sub.add_parser("lineage", help="print a checkpoint's chain back to pretraining")
    sp.add_argument("checkpoint", help="checkpoint dir (or run dir) with lineage.json")
    sp.add_argument("--json", action="store_true", help="the full chain as JSON")
    sp.set_defaults(func=_lineage)
