"""``raystages serve``: start the OpenAI-compatible server for trained stages.

    raystages serve runs/pretrain runs/sft                # model ids from lineage.json
    raystages serve runs/                                 # every run dir in a runs folder
    raystages serve sft=runs/sft/model reward=runs/rm/model --port 8000 --api-key $KEY
    raystages serve --spec jobs/serve.yaml --set defaults.cpus=1 --engine transformers

Prints the base URL and serves until Ctrl-C (then stops the application) — or, with
``--detach``, leaves it running on the cluster (``RAY_ADDRESS``) and exits.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sources", nargs="*", metavar="RUN_DIR|CHECKPOINT|NAME=PATH",
                   help="run dirs, checkpoint dirs, a runs folder, or NAME=PATH (model id NAME)")
    p.add_argument("--spec", help="YAML job spec with a serve: block (or only that block)")
    p.add_argument("--host", help="address to bind (default 127.0.0.1; 0.0.0.0 for the network)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000)")
    p.add_argument("--api-key", help="require Authorization: Bearer KEY (default: $RAYSTAGES_API_KEY if set)")
    p.add_argument("--engine", choices=["auto", "vllm", "transformers"], help="generation engine (default auto)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a serve field, e.g. defaults.cpus=1 or models.sft.replicas=2")
    p.add_argument("--detach", action="store_true", help="deploy and exit, leaving the app on the cluster")


def _interrupt(*_):
    raise KeyboardInterrupt


def serve_main(args: argparse.Namespace) -> int:
    """Run ``raystages serve``; a bad spec or source raises ``SpecError`` before Ray starts."""
    from pydantic import ValidationError

    from raystages.serve.app import deploy, find_models, wait_ready
    from raystages.serve.spec import load_serve_spec
    from raystages.spec import SpecError

    spec = load_serve_spec(args.spec, args.overrides)
    flags = {"host": args.host, "port": args.port, "api_key": args.api_key, "engine": args.engine}
    try:
        for field, value in flags.items():
            if value is not None:
                setattr(spec, field, value)
    except ValidationError as e:
        raise SpecError(f"--{field.replace('_', '-')}: {e.errors()[0]['msg']} (got {value!r})") from None
    find_models(args.sources, spec)  # fail on bad paths before Ray starts

    from ray import serve

    from raystages.train.runner import connect_ray

    connect_ray()
    url, models = deploy(spec, args.sources)
    wait_ready(url)  # the banner means every model answers
    print(f"\n== serving {len(models)} model(s) at {url} ==")
    for m in models:
        route = "/v1/score" if m.kind == "score" else "/v1/completions, /v1/chat/completions"
        print(f"  {m.name:<10} {m.kind:<9} {route:<40} {m.spec.path}")
    auth = " -H 'Authorization: Bearer $KEY'" if spec.resolved_api_key() else ""
    print(f"  health: {url[:-3]}/health (live), {url[:-3]}/ready (every engine answers)\n  try:    curl -s {url}/models{auth}")
    sys.stdout.flush()
    if args.detach:
        print(f"  detached: stop with `serve delete {spec.app_name}` (or serve shutdown)")
        return 0
    # serve.run ignores SIGINT, so the driver waits here and stops the app itself.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)  # also when started from a shell that ignores it
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
    finally:
        serve.delete(spec.app_name)
        if not serve.status().applications:
            serve.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m raystages.serve.cli``), same exit codes as ``raystages``."""
    from raystages.spec import SpecError

    p = argparse.ArgumentParser(prog="raystages serve", description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return serve_main(args)
    except SpecError as e:
        print(f"raystages: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
