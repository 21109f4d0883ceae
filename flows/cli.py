"""The `segflow` command line: each stage alone, the whole pipeline, scheduled serving, a demo.

    segflow ingest SLIDES_OR_FOLDERS... [--config ingest.yaml] [key=value ...]
    segflow ingest IMAGE --labels LABELS | --manifest pairs.csv   explicit image/label pairs
    segflow bootstrap [STORES_OR_FOLDERS...] [--scribbles FOLDER] [--config bootstrap.yaml]
                      [nucleus=3,7 ...]
    segflow weights [STORES_OR_FOLDERS...] [--config weights.yaml] [key=value ...]
    segflow train [STORES_OR_FOLDERS...] [--config train.yaml] [key=value ...]
    segflow infer [STORES_OR_FOLDERS...] [--model URI] [--archive DIR] [--config infer.yaml] ...
    segflow run [ARCHIVE | --manifest pairs.csv] [--config pipeline.yaml] [key=value ...]
    segflow serve [ARCHIVE] [--config pipeline.yaml] [--cron "0 2 * * *"] [key=value ...]
    segflow export [STORES_OR_FOLDERS...] [--format geojson|table|both] [--out DIR]
    segflow demo
    segflow config [STAGE]      every configuration key of a command: type, default, meaning

Every command but `export` (a plain library call, pipelines.export) runs as a Prefect flow
(flows.pipeline); every command reads the environment only here:
PREFECT_API_URL, MLFLOW_TRACKING_URI and DASK_SCHEDULER_ADDRESS (or --tracking-uri,
--scheduler) move it onto real servers; with none set it runs on embedded defaults under
--workdir, a local folder or an object-storage prefix (`--workdir s3://lab/work`: stores,
checkpoints and outputs there, reached with AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...; such a
run needs a tracking URI to train or segment). Bad input ends with
`segflow: error: <file>: <problem>` and a non-zero exit; --debug shows tracebacks.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from flows.config_help import COMMAND_STAGES, EXAMPLES
from flows.configs import UsageError, existing, load
from flows.interrupt import handling as handling_interrupts
from pipelines.redaction import redact_text, redact_uri
from segcore.errors import one_line

EXIT_FAILED_SLIDES = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3
#: The flows that talk to MLflow (train, register, pin the model to segment with).
TRACKED_FLOWS = frozenset({"segflow-train", "segflow-infer", "segflow-pipeline"})
MANIFEST_HELP = (
    "CSV of image/label pairs (columns image,labels[,page]; paths relative to its folder)"
)


def _common(parser: argparse.ArgumentParser, config_help: str | None) -> None:
    if config_help is not None:
        parser.add_argument("--config", type=Path, help=config_help)
    parser.add_argument(
        "--workdir",
        default="segflow-work",
        help="where stores, the embedded MLflow and Prefect databases live: a folder, or an "
        "object-storage prefix such as s3://lab/work (default: %(default)s)",
    )
    parser.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else embedded)"
    )
    parser.add_argument(
        "--scheduler", help="Dask scheduler address (default: DASK_SCHEDULER_ADDRESS, else local)"
    )
    parser.add_argument("--verbose", action="store_true", help="show Prefect and library logs")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def _kv(command: str) -> str:
    return (
        "key=value overrides of the configuration (dotted, YAML values; "
        f"`segflow config {command}` lists them), e.g. {EXAMPLES[command]}"
    )


def _stores_command(
    commands: argparse._SubParsersAction, name: str, summary: str, stores: str, config_help: str
) -> argparse.ArgumentParser:
    """A command over stores, or folders of stores, and key=value overrides."""
    parser = commands.add_parser(name, help=summary)
    parser.add_argument(
        "items", nargs="*", metavar="STORE|FOLDER|key=value", help=f"{stores}; " + _kv(name)
    )
    _common(parser, config_help)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    parser = argparse.ArgumentParser(
        prog="segflow",
        description="Train U-Nets and segment whole-slide images at scale.",
        epilog="Run `segflow <command> --help` for a command's options.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")

    ingest = commands.add_parser("ingest", help="slides -> OME-Zarr stores (stage 1)")
    ingest.add_argument(
        "items",
        nargs="*",
        metavar="SLIDE|FOLDER|MANIFEST|key=value",
        help="slides, folders of slides, .csv manifests; " + _kv("ingest"),
    )
    ingest.add_argument(
        "--labels", help="the label image of the one SLIDE named (an explicit pair)"
    )
    ingest.add_argument("--manifest", type=Path, help=MANIFEST_HELP)
    _common(ingest, "YAML file of IngestConfig fields")

    bootstrap = _stores_command(
        commands,
        "bootstrap",
        "training labels for unlabelled stores by unsupervised clustering",
        "stores, or folders of stores of which the unlabelled ones (default: <workdir>/stores)",
        "YAML file of BootstrapConfig fields",
    )
    bootstrap.add_argument(
        "--scribbles",
        type=Path,
        metavar="FOLDER",
        help="stroke images (PNG/TIFF) named after their stores (a.png for a.zarr): 0 = no "
        "stroke, k pins the stroked pixels to cluster k (e.g. 1 on nuclei with nucleus=1)",
    )
    _stores_command(
        commands,
        "weights",
        "weight maps of labelled stores (stage 2)",
        "stores or folders of stores (default: <workdir>/stores)",
        "YAML file of WeightsConfig fields",
    )
    _stores_command(
        commands,
        "train",
        "train, track and register a U-Net (stage 3)",
        "stores, or folders of stores of which those with weight maps are trained on "
        "(default: <workdir>/stores)",
        "YAML file of TrainConfig fields",
    )

    infer = commands.add_parser("infer", help="segment stores with a model (stage 4)")
    infer.add_argument(
        "items",
        nargs="*",
        metavar="STORE|FOLDER|key=value",
        help="stores or folders of stores (default: <workdir>/stores); " + _kv("infer"),
    )
    infer.add_argument(
        "--model", default=None, help="model URI or file (default: models:/segflow-unet@champion)"
    )
    infer.add_argument(
        "--archive",
        help="also ingest and segment the slides here (a folder, or a .csv manifest of pairs)",
    )
    _common(infer, "YAML file of InferConfig fields")

    for name, text in (
        ("run", "the whole pipeline on an archive, as one Prefect flow run"),
        ("serve", "serve the flows as Prefect deployments, with a nightly segmentation run"),
    ):
        command = commands.add_parser(name, help=text)
        command.add_argument(
            "items",
            nargs="*",
            metavar="ARCHIVE|key=value",
            help="folder of slides (or `archive:` in the configuration); " + _kv(name),
        )
        _common(command, "YAML file of PipelineConfig fields (sections ingest, weights, ...)")
        command.add_argument("--manifest", type=Path, help=MANIFEST_HELP + "; the archive")
        if name == "serve":
            command.add_argument(
                "--cron", default="0 2 * * *", help="nightly schedule (default: %(default)s)"
            )

    export = commands.add_parser(
        "export", help="instances -> QuPath GeoJSON and a per-object measurement table"
    )
    export.add_argument(
        "items",
        nargs="*",
        metavar="STORE|FOLDER",
        help="segmented stores, or folders of stores (default: <workdir>/stores)",
    )
    export.add_argument(
        "--format",
        choices=["geojson", "table", "both"],
        default="both",
        help="GeoJSON FeatureCollection, measurement table (Parquet), or both "
        "(default: %(default)s)",
    )
    export.add_argument(
        "--out", type=Path, help="folder of the exported files (default: each store's folder)"
    )
    _common(export, None)

    demo = commands.add_parser("demo", help="synthetic archive -> whole pipeline -> overlays")
    _common(demo, "YAML file of PipelineConfig fields to use instead of the demo's")
    demo.add_argument("items", nargs="*", metavar="key=value", help=_kv("demo"))

    config = commands.add_parser(
        "config", help="list a command's configuration keys: type, default, meaning"
    )
    config.add_argument(
        "stage",
        nargs="?",
        choices=list(COMMAND_STAGES),
        metavar="STAGE",
        help=f"one of {', '.join(COMMAND_STAGES)} (default: all stages)",
    )
    config.set_defaults(debug=False)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command's arguments, with paths and `key=value` overrides allowed anywhere on the
    line (argparse alone takes positionals only before the first option)."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    stray = [word for word in unknown if word.startswith("-")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if args.command == "config" and unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.items = [*getattr(args, "items", []), *unknown]
    return args


def split_items(items: Sequence[str]) -> tuple[list[str], list[str]]:
    """Positional words: `key=value` overrides, everything else a path or URL (its text)."""
    overrides = [item for item in items if "=" in item]
    paths = [item for item in items if "=" not in item]
    return paths, overrides


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status."""
    args = parse_args(argv)
    # The first SIGINT or SIGTERM ends the command within seconds, exit 130 or 143 (see there).
    with handling_interrupts(sys.stderr):
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    try:
        return _dispatch(args)
    except ValueError as exc:  # the stages' and the configuration's errors for bad input
        if args.debug:
            traceback.print_exc()
        print(f"segflow: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as exc:
        if args.debug:
            traceback.print_exc()
        else:
            print(
                f"segflow: internal error: {type(exc).__name__}: {_one_line(exc)}", file=sys.stderr
            )
            print("segflow: run again with --debug for the traceback", file=sys.stderr)
        return EXIT_INTERNAL


def _one_line(exc: BaseException) -> str:
    return redact_text(one_line(exc))


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "config":  # reads no input, starts nothing
        return _config(args.stage)
    from flows.console import quiet_logging
    from pipelines.location import parse_location
    from pipelines.runtime import Runtime

    runtime = Runtime.from_environment(
        workdir=args.workdir, tracking_uri=args.tracking_uri, scheduler_address=args.scheduler
    )
    words, overrides = split_items(args.items)
    # Stores and archives on object storage are reached like the workdir; ingest reaches its
    # slides with its configuration's settings too, once it has read them.
    storage = runtime.object_storage
    paths = words if args.command == "ingest" else [parse_location(w, storage) for w in words]
    if args.command == "train" and os.environ.get("LOCAL_RANK", "0") != "0":
        # Lightning's DDP launcher re-runs this command once per extra device; those ranks
        # join the rank-0 training run directly, outside Prefect.
        return _train_rank(args, runtime, paths, overrides)
    command: Callable[..., int] = COMMANDS[args.command]
    # Checking input reads files too (a TIFF's pages): their libraries' warnings stay off the
    # terminal like the stages' do, so a bad file still ends in one line.
    with quiet_logging(args.verbose):
        return command(args, runtime, paths, overrides)


def _train_rank(args, runtime, paths, overrides) -> int:
    from pipelines.train import train

    train(_train_config(args, runtime, paths, overrides))
    return 0


def _train_config(args, runtime, paths, overrides):
    from pipelines.training.config import TrainConfig
    from pipelines.training.stores import training_stores

    config = load(TrainConfig, args.config, overrides)
    if paths:
        config = config.model_copy(update={"stores": existing(paths)})
    config = runtime.configure(config).with_storage(runtime.object_storage)
    # Folders (and the default <workdir>/stores) expanded before the flow starts: a missing or
    # empty one fails in one line, and the flow's parameters name every store trained on.
    return config.model_copy(update={"stores": training_stores(config)})


def _ingest(args, runtime, paths, overrides) -> int:
    from flows.pipeline import ingest_flow
    from pipelines.ingest import IngestConfig
    from pipelines.location import local_path, parse_location
    from pipelines.sources import SlideSource, as_manifest, find_slides

    config = load(IngestConfig, args.config, overrides)
    storage = config.object_storage.merged(runtime.object_storage)
    paths = [parse_location(path, storage) for path in paths]  # s3://... as URLs
    sources: list = list(paths)
    if args.labels is not None:
        if len(paths) != 1:
            raise UsageError(
                f"--labels {args.labels}: name exactly one slide with it (got {len(paths)}); "
                "pair several in a manifest (--manifest pairs.csv)"
            )
        sources = [SlideSource(image=paths[0], labels=parse_location(args.labels, storage))]
    if args.manifest is not None:
        sources.append(as_manifest(local_path(args.manifest, "manifests")))
    find_slides(sources)  # no such path, no slide in a folder, a bad manifest: fail before a flow
    return _run(args, runtime, ingest_flow, sources=sources, ingest=config)


def _bootstrap(args, runtime, paths, overrides) -> int:
    from flows.pipeline import bootstrap_flow
    from pipelines.bootstrap import BootstrapConfig
    from pipelines.scribbles import scribble_files
    from pipelines.sources import find_stores

    config = load(BootstrapConfig, args.config, overrides)
    stores = find_stores(paths or [runtime.stores_dir])
    if args.scribbles is not None:
        scribble_files(args.scribbles, stores)  # a misnamed stroke image fails before a flow
    return _run(
        args, runtime, bootstrap_flow, stores=stores, bootstrap=config, scribbles=args.scribbles
    )


def _weights(args, runtime, paths, overrides) -> int:
    from flows.pipeline import weights_flow
    from pipelines.sources import find_stores
    from pipelines.weightmaps import WeightsConfig

    config = load(WeightsConfig, args.config, overrides)
    stores = find_stores(paths or [runtime.stores_dir])
    return _run(args, runtime, weights_flow, stores=stores, weights=config)


def _train(args, runtime, paths, overrides) -> int:
    from flows.pipeline import train_flow

    config = _train_config(args, runtime, paths, overrides)
    return _run(args, runtime, train_flow, train=config)


def _infer(args, runtime, paths, overrides) -> int:
    from flows.pipeline import CHAMPION, infer_flow
    from pipelines.infer import InferConfig
    from pipelines.location import parse_location
    from pipelines.sources import find_slides, find_stores

    # Configured here, as training is: a run without an MLflow store fails before any lookup.
    config = runtime.configure(load(InferConfig, args.config, overrides))
    model = args.model or CHAMPION
    if not model.startswith(("models:/", "runs:/")) and "://" not in model:
        existing([Path(model)])
    archive = args.archive
    if archive is not None:
        archive = parse_location(archive, runtime.object_storage)
        find_slides([archive])
    stores = find_stores(paths or [runtime.stores_dir]) if paths or archive is None else []
    return _run(
        args, runtime, infer_flow, stores=stores, archive=archive, model_uri=model, infer=config
    )


def _pipeline_config(args, runtime, paths, overrides):
    from flows.pipeline import PipelineConfig
    from pipelines.location import local_path, parse_location
    from pipelines.sources import as_manifest, find_slides

    if args.manifest is not None:
        paths = [*paths, as_manifest(local_path(args.manifest, "manifests"))]
    if len(paths) > 1:
        raise UsageError(f"{args.command}: one archive folder at a time, got {len(paths)}")
    if paths:
        overrides = [f"archive={existing(paths)[0]}", *overrides]
    config = load(PipelineConfig, args.config, overrides)
    # An archive URL, named here or in the configuration, is reached like ingest's slides.
    storage = config.ingest.object_storage.merged(runtime.object_storage)
    config = config.model_copy(update={"archive": parse_location(str(config.archive), storage)})
    find_slides([config.archive])
    return config


def _run_pipeline(args, runtime, paths, overrides) -> int:
    from flows.pipeline import pipeline_flow

    config = _pipeline_config(args, runtime, paths, overrides)
    return _run(args, runtime, pipeline_flow, config=config)


def _serve(args, runtime, paths, overrides) -> int:
    from flows.deployments import serve
    from flows.runtime import prefect_api_url, prefect_session
    from pipelines.storage import writable_folder

    config = _pipeline_config(args, runtime, paths, overrides)
    writable_folder(runtime.workdir)
    embedded = prefect_api_url(runtime) is None
    if embedded:
        print(
            "segflow: serving on Prefect's temporary local API: schedules run while this "
            "process runs; start `prefect server start` and set PREFECT_API_URL for the UI "
            "and manual runs (see infra/README.md)",
            file=sys.stderr,
        )
    with prefect_session(runtime):
        serve(config, runtime, args.cron, embedded)
    return 0


def _export(args, runtime, paths, overrides) -> int:
    from contextlib import nullcontext

    from pipelines.cluster import ClusterConfig, dask_client
    from pipelines.export import FORMATS, ExportSource, export_store
    from pipelines.location import local_path
    from pipelines.sources import ready_stores
    from segcore.store import INSTANCES, LABELS_GROUP

    if overrides:
        raise UsageError(f"export: no key=value settings, got {overrides[0]}")
    if args.out is not None:
        local_path(args.out, "export")
    # Export reads and writes local files only: stores on object storage are refused.
    paths = [local_path(path, "export") for path in paths or [runtime.stores_dir]]
    stores = ready_stores(
        paths,
        lambda store: (store / LABELS_GROUP / INSTANCES / "0" / "zarr.json").is_file(),
        "has instances (run segflow infer first)",
    )
    for store in stores:  # every store checked before a file is written
        ExportSource.open(store)
    formats = FORMATS if args.format == "both" else (args.format,)
    cluster = dask_client(runtime.cluster(ClusterConfig())) if runtime.scheduler_address else None
    with cluster or nullcontext() as client:
        for store in stores:
            result = export_store(store, args.out, formats, client)
            print(
                f"{store}: {result.n_objects} objects ({result.n_crossing} across chunk faces) "
                f"-> {', '.join(map(str, result.files))} in {result.seconds:.1f} s",
                flush=True,
            )
    return 0


def _demo(args, runtime, paths, overrides) -> int:
    from flows.demo import run_demo

    return run_demo(runtime, args.config, overrides, verbose=args.verbose)


def _config(stage: str | None) -> int:
    from flows.config_help import STAGE_CONFIGS, render

    try:
        for index, name in enumerate([stage] if stage else STAGE_CONFIGS):
            print(("\n" if index else "") + "\n".join(render(name)), flush=True)
    except BrokenPipeError:  # `segflow config | head`: the reader has all it wanted
        # Python's documented way out: stdout to devnull, so the exit's flush cannot fail.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _run(args, runtime, flow, **parameters) -> int:
    """Run `flow` with progress bars, print its table, and exit 1 if any slide failed."""
    from rich.console import Console

    from flows.console import print_report
    from flows.runner import run_flow
    from pipelines.storage import writable_folder

    # A flow that trains or segments needs an MLflow store: a workdir on object storage given
    # no tracking URI fails here in one line, before anything is written or started.
    tracking = runtime.mlflow_uri if flow.name in TRACKED_FLOWS else runtime.tracking_store
    writable_folder(runtime.workdir)
    outcome = run_flow(flow, runtime, verbose=args.verbose, **parameters)
    print_report(Console(), outcome.summary, tracking)
    print(f"stores: {runtime.stores_dir}")
    if tracking is not None:
        print(f"MLflow: {redact_uri(tracking)}")
    print(f"Prefect flow run: {outcome.flow_run_id}")
    for note in outcome.summary.notes:
        print(f"segflow: warning: {note}", file=sys.stderr)
    for failure in outcome.summary.failures:
        print(f"segflow: error: {failure.detail or failure.slide}", file=sys.stderr)
    return EXIT_FAILED_SLIDES if outcome.summary.failures else 0


COMMANDS: dict[str, Callable[..., int]] = {
    "ingest": _ingest,
    "bootstrap": _bootstrap,
    "weights": _weights,
    "train": _train,
    "infer": _infer,
    "run": _run_pipeline,
    "serve": _serve,
    "export": _export,
    "demo": _demo,
}


def entry() -> None:
    """The `segflow` console script: `main` in a process with glibc's allocator tuned."""
    from flows.allocator import reexecute_tuned

    reexecute_tuned(sys.argv)
    raise SystemExit(main())


if __name__ == "__main__":
    entry()
