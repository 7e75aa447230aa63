"""The ``raystages`` command: one sub-command per verb, each a thin call into the package.

Exit status: 0 done, 1 the run failed, 2 bad spec or bad input (nothing started).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from raystages.bench import BENCHES
from raystages.registry import STAGES, stage_module
from raystages.train.console import finished_line, mark

TRAINING_STAGES = tuple(STAGES)


def _print_result(result) -> None:
    print(finished_line(result.stage, result.metrics, result.export_dir))
    for s in result.metrics.get("samples", []):
        print(f"  sample: {s['prompt']!r} -> {s['completion']!r}"
              + (f"  (oracle reward {s['oracle_reward']:.2f})" if "oracle_reward" in s else ""))


def _run_stage(args) -> int:
    from raystages.spec import load_spec

    spec = load_spec(args.spec, args.overrides, stage=args.command)
    mark("spec")  # imports and parsing
    _print_result(stage_module(args.command).run(spec))
    return 0


def _prepare(args) -> int:
    from raystages.spec import load_spec
    from raystages.stages import pretrain

    spec = load_spec(args.spec, args.overrides, stage="pretrain")
    mark("spec")
    _, cache = pretrain.prepare(spec)
    m = cache.manifest
    print(f"token cache {'hit' if cache.hit else 'filled'}: {cache.path}\n"
          f"  {m['blocks']['train']} train + {m['blocks']['val']} held-out blocks of {spec.optim.seq_len} tokens "
          f"from {m['rows']} rows ({m['skipped']} skipped)")
    return 0


def _show_spec(args) -> int:
    import yaml

    from raystages.spec import load_spec, spec_class

    if args.reference:
        from raystages.specdoc import markdown_reference

        print(markdown_reference(spec_class(args.stage)))
        return 0
    spec = load_spec(args.spec, args.overrides, stage=args.stage)
    print(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False), end="")
    return 0


def _bench(args) -> int:
    from raystages.bench import run_bench

    print(json.dumps(run_bench(args.what, args.overrides), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raystages", description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true", help="show the Python traceback of a failure")
    p.add_argument("--verbose", action="store_true",
                   help="stream Ray's, DeepSpeed's and vLLM's own output (default: runs/<name>/logs/)")
    sub = p.add_subparsers(dest="command", required=True)
    for stage in TRAINING_STAGES:
        sp = sub.add_parser(stage, help=STAGES[stage].help)
        sp.add_argument("spec", nargs="?", help="YAML job spec (default: the built-in defaults)")
        sp.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=1e-3")
        sp.set_defaults(func=_run_stage)
    sp = sub.add_parser("prepare", help="tokenise and pack a pretraining spec's data into the token cache")
    sp.add_argument("spec", nargs="?", help="YAML pretraining spec (default: the built-in defaults)")
    sp.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. data.source=corpus/")
    sp.set_defaults(func=_prepare)
    sp = sub.add_parser("spec", help="print a stage's full spec with defaults and overrides applied")
    sp.add_argument("stage", choices=TRAINING_STAGES)
    sp.add_argument("--reference", action="store_true", help="print the field reference as Markdown")
    sp.add_argument("spec", nargs="?")
    sp.add_argument("overrides", nargs="*")
    sp.set_defaults(func=_show_spec)
    sp = sub.add_parser("bench", help="side-by-side benchmarks that print their figures")
    sp.add_argument("what", choices=BENCHES)
    sp.add_argument("overrides", nargs="*")
    sp.set_defaults(func=_bench)
    from raystages.serve.cli import add_arguments as add_serve_arguments, serve_main

    sp = sub.add_parser("serve", help="serve trained stages over HTTP (OpenAI-compatible)")
    add_serve_arguments(sp)
    sp.set_defaults(func=serve_main)
    from raystages.jobs_cli import add_commands  # submit/status/logs/stop, tune, pipeline, lineage

    add_commands(sub)
    return p


def _split_spec_arg(args) -> None:
    # `raystages pretrain optim.lr=1e-3` (no spec file): the first positional is an override.
    if getattr(args, "spec", None) and "=" in args.spec and not args.spec.endswith((".yaml", ".yml")):
        args.overrides.insert(0, args.spec)
        args.spec = None


def _place_extras(parser: argparse.ArgumentParser, args, extra: list[str]) -> None:
    """Positionals that argparse left over because they came after an option
    (``submit SPEC --address URL key=value``): ``key=value`` overrides, or serve's sources."""
    if args.command == "serve":
        target = args.sources
    elif isinstance(getattr(args, "overrides", None), list):
        target = args.overrides
    else:
        target = None
    stray = [a for a in extra if target is None or a.startswith("-")
             or (args.command != "serve" and "=" not in a)]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        target.extend(extra)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line as the CLI reads it: options and ``key=value`` overrides in any order."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    _place_extras(parser, args, extra)
    _split_spec_arg(args)
    return args


def main(argv: list[str] | None = None) -> int:
    from raystages.data.sources import DataError
    from raystages.jobs import JobsError
    from raystages.spec import SpecError

    args = parse_args(argv)
    if args.verbose:
        from raystages.train.console import set_verbose

        set_verbose(True)
    else:
        from raystages.train.runner import QUIET_ENV

        # Before transformers and tqdm are imported: tqdm reads TQDM_DISABLE at import.
        os.environ.update({k: v for k, v in QUIET_ENV.items() if k not in os.environ})
    try:
        return args.func(args)
    except (SpecError, DataError) as e:
        print(f"raystages: {e}", file=sys.stderr)
        return 2
    except JobsError as e:
        print(f"raystages: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("raystages: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a failed run: one paragraph, the traceback only with --debug
        if args.debug:
            raise
        print(f"raystages: {args.command} failed: {type(e).__name__}: {_first_lines(str(e))}\n"
              "  (run again with --debug for the traceback)", file=sys.stderr)
        return 1


def _first_lines(text: str, n: int = 6) -> str:
    lines = text.strip().splitlines()
    return "\n".join(lines[:n]) + ("\n  ..." if len(lines) > n else "")


if __name__ == "__main__":
    sys.exit(main())
