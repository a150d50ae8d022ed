"""`tok1d`: run the pipeline or one stage in-process, show what ran, list presets."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from flows.export import add_export, export_cli
from flows.import_titok import add_import_titok, import_titok_cli
from flows.mlflow_export import add_export_mlflow, export_mlflow_cli

DEFAULT_STORE = os.environ.get("TOK1D_STORE", "store")


def _prepare_environment(debug: bool = False) -> None:
    # Before Prefect is imported: no telemetry (its background writes also trip "database is
    # locked" in concurrent runs) and quiet logs unless the user asks for more. Without --debug a
    # failing stage ends in one line from tok1d, not in Prefect's logged traceback as well.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING" if debug else "CRITICAL")
    # Several runs starting at once on a busy machine need longer than Prefect's 20 s default.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _debug(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback (and Prefect's logs) when something fails")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="default", help="preset name in configs/ or a YAML path")
    parser.add_argument("--store", default=DEFAULT_STORE, help="artifact store: a directory, or object storage such as s3://bucket/prefix "
                             "(default: %(default)s)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set ingest.source.max_images=500 (repeatable)",
    )
    _debug(parser)
    parser.add_argument(
        "--flow", action="store_true",
        help="run the Prefect flow even when every stage is cached (by default such a run is answered "
             "from the store and recorded in lineage without starting Prefect)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tok1d", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the full-pipeline flow in-process (no server needed)")
    _common(run)
    stage = commands.add_parser("stage", help="run one stage (and what it reads, from the cache when possible)")
    stage.add_argument("name", help="stage name, e.g. ingest")
    _common(stage)
    status = commands.add_parser("status", help="what ran, what is cached, what failed")
    status.add_argument("--store", default=DEFAULT_STORE)
    verify = commands.add_parser("verify", help="hash every artifact file again; exit 1 if any is missing or altered")
    verify.add_argument("--store", default=DEFAULT_STORE)
    verify.add_argument("--stage", default=None, help="only this stage's artifacts, e.g. ingest")
    gc = commands.add_parser("gc", help="record dead runs as killed, quarantine damaged lineage files, remove "
                                        "stale temporary files and finished work dirs")
    gc.add_argument("--store", default=DEFAULT_STORE)
    gc.add_argument("--dry-run", action="store_true", help="only list what would be done")
    gc.add_argument("--resumable", action="store_true",
                    help="also remove work dirs of unfinished stage runs (a rerun then starts them over)")
    gc.add_argument("--artifacts", action="store_true", help="also remove artifacts no cache record names")
    commands.add_parser("presets", help="list the presets in configs/")
    add_import_titok(commands, DEFAULT_STORE, _debug)
    add_export(commands, DEFAULT_STORE, _debug)
    add_export_mlflow(commands, DEFAULT_STORE, _debug)
    sweep = commands.add_parser(
        "sweep", help="presets x axes (tokens, text on/off, any key) x seeds through the pipeline; "
                      "mean +- std per point, text on - off paired by seed")
    sweep.add_argument("--presets", required=True, help="comma-separated presets, e.g. fashion-mnist-titok,fashion-mnist-textok")
    sweep.add_argument("--tokens", default=None, metavar="N1,N2",
                       help="sweep train_tokenizer.model.num_latent_tokens, e.g. 16,32,64 (default: each preset's own)")
    sweep.add_argument("--text", default=None, metavar="on,off",
                       help="also sweep train_tokenizer.use_text (default: each preset's own setting)")
    sweep.add_argument("--seeds", default=None, metavar="S1,S2",
                       help="run every point once per seed (tokenizer, generator and sampling seeds), e.g. 0,1,2 "
                            "(default: each preset's own seeds, one run per point)")
    sweep.add_argument("--axis", dest="axes", action="append", default=[], metavar="KEY=V1,V2",
                       help="sweep any config key, values parsed like --set values, e.g. "
                            "--axis ingest.source.shapes.caption_level=class,short,detailed (repeatable)")
    sweep.add_argument("--until", default="evaluate", metavar="STAGE",
                       help="run each point up to this stage, e.g. pretokenize (default: %(default)s); "
                            "metrics of later stages are null")
    sweep.add_argument("--jobs", type=int, default=1, metavar="N",
                       help="run the points in N processes of cores/N torch threads each, then write the "
                            "tables in one pass that finds them cached (default: %(default)s); small models "
                            "on few cores finish about N times sooner")
    sweep.add_argument("--part", default=None, help=argparse.SUPPRESS)  # K/N: one --jobs child's points
    sweep.add_argument("--store", default=DEFAULT_STORE)
    sweep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    _debug(sweep)
    return parser


def _print_results(results: dict[str, dict], store: Path) -> None:
    print(f"\n{'stage':<18}{'result':<10}{'rows':>8}  artifact")
    for name, result in results.items():
        outcome = "cached" if result["cache_hit"] else "computed"
        print(f"{name:<18}{outcome:<10}{result['rows']:>8}  {store / result['artifact']}")
    pictures = [
        path
        for result in results.values()
        for path in sorted((store / result["artifact"]).glob("*.png"))
    ]
    if pictures:
        print("\nplots and samples:")
        for path in pictures:
            print(f"  {path}")
    from flows.status import print_run_headline
    from tasks.store import Store

    print_run_headline(Store(store), [Path(result["artifact"]).name for result in results.values()])
    print(f"\nlineage and metrics: .venv/bin/duckdb {store / 'experiments.duckdb'} -c \"select stage, name, value from metrics\"")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    _prepare_environment(debug)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("tok1d").setLevel(logging.INFO)

    # Each command imports what it needs, here rather than at the top: `presets` and `status` read
    # files only and must answer within 2 s (tests/flows/test_cli_fast.py keeps torch out), and
    # `status` has no use for the config sections, whose pydantic models take a while to build.
    if args.command in ("presets", "status", "verify", "gc"):
        try:
            code = _file_command(args)
            sys.stdout.flush()  # a pipe's buffer: the error surfaces here, not at interpreter exit
            return code
        except BrokenPipeError:
            # `tok1d presets | head`: the reader left. End quietly, like any Unix tool; the
            # interpreter's final flush must not meet the closed pipe again. (Not SIGPIPE's default
            # action: main() also runs inside other processes, e.g. the tests', which it would kill.)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1
    try:
        return _run_command(args)
    except Exception as error:
        if debug:
            raise
        print(f"tok1d: {args.command} failed: {_one_line(error)} (--debug shows the traceback)", file=sys.stderr)
        return 1


def _file_command(args: argparse.Namespace) -> int:
    """The commands that only read files: presets, status, verify, gc."""
    if args.command == "presets":
        from tasks.presets import available_presets

        for name, description in available_presets().items():
            print(f"{name:<24}{description}")
        return 0
    from tasks.store import local_root

    if args.command == "status":
        from flows.status import print_status

        return print_status(local_root(args.store))
    if args.command == "verify":
        from flows.verify import print_verification

        return print_verification(local_root(args.store), args.stage)
    from flows.gc import print_gc

    return print_gc(local_root(args.store), args.dry_run, args.resumable, args.artifacts)


def _one_line(error: Exception) -> str:
    """The error as one line: the message (which names the key or file), and the path of an OSError."""
    if isinstance(error, OSError) and error.strerror:
        where = f": {error.filename}" if error.filename else ""
        return f"{error.strerror}{where} ({type(error).__name__})"
    message = " ".join(str(error).split()) or type(error).__name__
    return f"{message} ({type(error).__name__})"


def _run_command(args: argparse.Namespace) -> int:
    if args.command == "import-titok":
        return import_titok_cli(args)
    if args.command == "export":
        return export_cli(args)
    if args.command == "export-mlflow":
        return export_mlflow_cli(args)
    if args.command == "sweep":
        from flows.sweep import run_sweep_cli

        return run_sweep_cli(args)

    from tasks.config import ConfigError
    from tasks.presets import load_config
    from tasks.registry import STAGE_ORDER

    until = args.name if args.command == "stage" else None
    if until is not None and until not in STAGE_ORDER:
        print(f"tok1d: unknown stage {until!r}; stages: {', '.join(STAGE_ORDER)}", file=sys.stderr)
        return 2
    try:
        config = load_config(args.preset, args.overrides)  # fail fast, before Prefect starts
    except ConfigError as error:
        print(f"tok1d: {error}", file=sys.stderr)
        return 2
    from tasks.store import local_root

    store = local_root(args.store)
    flow_name = "full-pipeline" if until is None else f"stage-{until}"
    if not args.flow and (store / "cache").is_dir():
        from flows.run_plan import plan_cached_run, record_cached_run, summaries
        from tasks.store import Store

        cached = plan_cached_run(config, Store(store), until)
        if cached is not None:
            results = record_cached_run(config, Store(store), cached, preset=args.preset, flow=flow_name,
                                        overrides=args.overrides)
            print(f"every stage of {flow_name} is cached: answered from the store without starting Prefect "
                  "(--flow starts the flow anyway)")
            _print_results(summaries(results), store)
            return 0
    from flows.full_pipeline import STAGE_FLOWS, full_pipeline

    if until is None:
        results = full_pipeline(preset=args.preset, store=str(store), overrides=args.overrides)
    else:
        results = STAGE_FLOWS[until](preset=args.preset, store=str(store), overrides=args.overrides)
    _print_results(results, store)
    return 0


if __name__ == "__main__":
    sys.exit(main())
