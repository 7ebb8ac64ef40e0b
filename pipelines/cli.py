"""The `reconray` command line: run, fit, tune, evaluate, predict and serve (contract in DESIGN.md).

Every command shows reconray's own lines and a progress bar per stage; Ray's output goes to the command's log file
(`--log-file`, default below) and is shown with `--verbose`. A user error (`ReconrayError`: a bad dataset, artifact
or option) is one line and exit code 2; anything else is a bug and keeps its traceback (exit code 1).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from reconray import __version__
from reconray.methods import METHODS
from reconray.methods.backbone import (
    AGGREGATIONS,
    DEFAULT_AGGREGATION,
    DEFAULT_BACKBONE,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_LEVELS,
    DEFAULT_POOL,
    DEFAULT_RESIZE,
    RESIZES,
)
from reconray.methods.errors import OptionError, ReconrayError
from reconray.pipelines.console import console_session, table
from reconray.pipelines.serve_options import ServeOptions
from reconray.pipelines.storage import is_uri, joined

logger = logging.getLogger("reconray.cli")

LOG_FILE = "reconray.log"
_PREDICTIONS_SHOWN = 20
"""Predictions listed on the console; all of them are in predictions.json."""


def parse_key_values(pairs: Sequence[str]) -> dict[str, str]:
    """`--set key=value` pairs as a dict of strings (each method option converts its value to its own type)."""
    options = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator or not key:
            raise OptionError(f"--set expects key=value, got {pair!r}")
        options[key.strip()] = value.strip()
    return options


def _categories(text: str | None) -> list[str] | None:
    return [name.strip() for name in text.split(",") if name.strip()] if text else None


def _levels(text: str) -> list[int]:
    try:
        return [int(level) for level in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _serve_default(name: str) -> object:
    return ServeOptions.model_fields[name].default


def _location(text: str) -> Path | str:
    """A local path as a `Path`, a URI (s3://, gs://) kept as text: `Path` would fold its `//`."""
    return text if is_uri(text) else Path(text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reconray", description="Industrial visual anomaly detection on Ray.")
    parser.add_argument("--version", action="version", version=f"reconray {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true", help="show Ray's own output on the console as well")
    common.add_argument("--log-file", type=Path, help="where every log line and Ray's output go (default: per command)")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", parents=[common],
                              help="build the synthetic dataset, fit and evaluate every method, report")
    run.add_argument("--out", type=Path, help="run directory (default runs/<timestamp>); log: <out>/reconray.log")

    fit = commands.add_parser("fit", parents=[common], help="fit a method on normal training images")
    fit.add_argument("--data", required=True, help="MVTec AD / MVTec 3D-AD root or category, split CSV, or folder")
    fit.add_argument("--method", choices=sorted(METHODS), help="required unless --config names it")
    fit.add_argument("--config", type=Path, help="a setting to fit, e.g. the best.yaml of `reconray tune`: method, "
                     "options, levels, image_size, aggregation, pool (flags and --set given here win)")
    fit.add_argument("--out", required=True, type=_location, help="artifact directory or URI (s3://...) to write")
    fit.add_argument("--add-to", type=_location, metavar="MODEL",
                     help="extend this bank-method model (patchcore, sgfr) with the new categories of --data, leaving "
                     "its existing categories' scores unchanged; method, options and features are MODEL's")
    fit.add_argument("--work-dir", type=_location,
                     help="feature cache, checkpoints and log (default <out>-work, beside the artifact)")
    fit.add_argument("--categories", help="comma-separated subset of categories")
    fit.add_argument("--backbone", default=DEFAULT_BACKBONE, help="timm model name (default %(default)s)")
    fit.add_argument("--weights", help="local backbone weights file (when the hub cannot be reached)")
    _feature_arguments(fit)
    fit.add_argument("--set", dest="options", action="append", default=[], metavar="KEY=VALUE",
                     help="method option, repeatable (e.g. --set coreset_ratio=0.1)")
    fit.add_argument("--on-bad-image", choices=("error", "skip"), default="error")
    training = fit.add_argument_group("training on Ray Train (rlr)")
    training.add_argument("--num-workers", type=int, help="data-parallel workers (default 1)")
    training.add_argument("--cpus-per-worker", type=float, help="CPUs per worker, fractional allowed "
                          "(default: a node's every CPU for one worker, else 1)")
    training.add_argument("--use-gpu", action=argparse.BooleanOptionalAction, default=None,
                          help="a GPU per worker when the cluster has GPUs (default: yes)")
    training.add_argument("--max-failures", type=int, help="worker failures to recover from (default 3)")
    training.add_argument("--checkpoint-every", type=int, help="epochs between checkpoints (default 10)")
    training.add_argument("--validate-every", type=int, help="epochs between scorings of the validation split "
                          "(select=validation; default 1)")

    tune_parser = commands.add_parser("tune", parents=[common],
                                      help="hyperparameter sweep on Ray Tune, scored on a validation split")
    tune_parser.add_argument("--data", required=True, help="dataset whose training images are swept on")
    tune_parser.add_argument("--method", required=True, choices=sorted(METHODS))
    tune_parser.add_argument("--out", required=True, type=_location,
                             help="sweep folder or URI (rerun the command to resume)")
    spaces = tune_parser.add_mutually_exclusive_group()
    spaces.add_argument("--space", type=Path, help="search space YAML: key: value or key: {choice|grid|uniform|"
                        "loguniform|randint: [...]}")
    spaces.add_argument("--preset", help="a documented search space: the method's name (default)")
    tune_parser.add_argument("--num-samples", type=int, default=16, help="trials (default %(default)s)")
    tune_parser.add_argument("--max-concurrent", type=int, help="trials at once (default: as resources allow)")
    tune_parser.add_argument("--search", default="random", choices=["random", "optuna"],
                             help="random/grid search, or Optuna's model-based sampler (default %(default)s)")
    tune_parser.add_argument("--objective", default="mean_auroc",
                             help="mean_auroc (default), image_auroc, pixel_auroc or aupro, on the validation split")
    tune_parser.add_argument("--time-budget-s", type=float, help="stop starting trials after this many seconds")
    tune_parser.add_argument("--trial-cpus", type=float, default=1.0, help="CPUs per trial (default %(default)s)")
    tune_parser.add_argument("--trial-gpus", type=float, default=0.0, help="GPUs per trial (default %(default)s)")
    tune_parser.add_argument("--categories", help="comma-separated subset of categories")
    tune_parser.add_argument("--backbone", default=DEFAULT_BACKBONE, help="timm model name (default %(default)s)")
    _feature_arguments(tune_parser)

    evaluate = commands.add_parser("evaluate", parents=[common], help="metrics, report and heatmaps on a test split")
    evaluate.add_argument("--model", required=True, type=_location, help="artifact directory or URI")
    evaluate.add_argument("--data", required=True, help="dataset folder, split CSV or URI")
    evaluate.add_argument("--out", required=True, type=_location, help="output directory or URI")
    evaluate.add_argument("--categories")
    evaluate.add_argument("--on-bad-image", choices=("error", "skip"), default="error")

    predict = commands.add_parser("predict", parents=[common], help="score images, write predictions.json and heatmaps")
    predict.add_argument("--model", required=True, type=_location, help="artifact directory or URI")
    predict.add_argument("--out", required=True, type=_location, help="output directory or URI")
    predict.add_argument("--threshold", type=float, help="override the model's calibrated threshold")
    predict.add_argument("--category", help="decide with the threshold calibrated for this category of the model "
                         "(default: the global threshold)")
    predict.add_argument("--heatmaps", choices=("none", "anomalous", "all"),
                         help="heatmap figures for every image, the anomalous ones or none (default: all with JSON "
                         "output, anomalous with Parquet)")
    predict.add_argument("--format", choices=("auto", "json", "parquet"), default="auto",
                         help="predictions.json, or predictions.parquet streamed batch by batch (default auto: Parquet "
                         "beyond 1000 images)")
    predict.add_argument("images", nargs="+", help="image files, folders (the images directly in them, sorted), glob "
                         "patterns (quote them; ** recurses) or CSV lists, local or URIs; each image is scored once")

    serve = commands.add_parser("serve", parents=[common],
                                help="online scoring over HTTP with Ray Serve (blocks until Ctrl-C)")
    serve.add_argument("--model", required=True, action="append", metavar="[NAME=]MODEL",
                       help="artifact directory or URI, or a folder of artifacts (each served at /v1/score/{its "
                       "folder name}); repeat as NAME=MODEL to serve several at /v1/score/NAME")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--proxy-location", choices=("EveryNode", "HeadOnly"), default="EveryNode",
                       help="Serve's HTTP proxies: on every node (default), or on the head only, as for several nodes "
                       "sharing one machine's ports")
    serve.add_argument("--min-replicas", type=int, help=f"default {_serve_default('min_replicas')}")
    serve.add_argument("--max-replicas", type=int, help=f"default {_serve_default('max_replicas')}")
    serve.add_argument("--threshold", type=float, help="override the model's calibrated threshold (one model only)")
    serve.add_argument("--max-models", type=int, help="several models: how many a replica keeps loaded, least recently "
                       f"used dropped first (default {_serve_default('max_models_per_replica')})")
    serve.add_argument("--max-batch-size", type=int, help="images per backbone batch (default 8 with a GPU, 1 on CPU)")
    serve.add_argument("--batch-wait-s", type=float,
                       help=f"longest wait for a batch to fill (default {_serve_default('batch_wait_timeout_s')})")
    serve.add_argument("--num-cpus", type=float,
                       help=f"CPUs per replica, fractional allowed (default {_serve_default('num_cpus')})")
    serve.add_argument("--num-gpus", type=float,
                       help=f"GPUs per replica, fractional allowed (default {_serve_default('num_gpus')})")
    serve.add_argument("--max-bytes", type=int,
                       help=f"largest accepted upload in bytes (default {_serve_default('max_bytes')})")
    serve.add_argument("--max-side", type=int,
                       help=f"largest accepted image side in pixels (default {_serve_default('max_side')})")
    return parser


def _feature_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image-size", type=int, help=f"input side (default {DEFAULT_IMAGE_SIZE})")
    parser.add_argument("--levels", type=_levels,
                        help=f"backbone feature levels, comma-separated (default {','.join(map(str, DEFAULT_LEVELS))})")
    parser.add_argument("--aggregation", choices=AGGREGATIONS,
                        help=f"local averaging before or after aligning the levels (default {DEFAULT_AGGREGATION})")
    parser.add_argument("--pool", type=int, help=f"side of the local average window, odd (default {DEFAULT_POOL})")
    parser.add_argument("--resize", choices=RESIZES,
                        help=f"squash images to the square, or keep their aspect and pad (default {DEFAULT_RESIZE})")
    parser.add_argument("--tile", type=int,
                        help="run the backbone on overlapping square tiles of this side, stitched (default: none)")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "run" and args.out is None:
        from reconray.pipelines.run import default_run_dir

        args.out = default_run_dir()
    log_file = args.log_file or _default_log_file(args)
    with console_session(log_file, verbose=args.verbose):
        try:
            _dispatch(args)
        except ReconrayError as error:
            # A ReconrayError raised inside a Ray task arrives wrapped; its cause holds the one-line message.
            logger.error("reconray %s: error: %s", args.command, getattr(error, "cause", None) or error)
            return 2
        except KeyboardInterrupt:
            logger.error("reconray %s: interrupted; what was saved stays (rerun the command to resume)", args.command)
            return 130
        except Exception:
            logger.exception("reconray %s: internal error (a bug, not your input); full log: %s", args.command,
                             log_file)
            return 1
    return 0


def _default_log_file(args: argparse.Namespace) -> Path:
    """The command's log: in its output (run, evaluate, predict), the fit's work directory, or a temp file (serve)."""
    if args.command == "fit":
        from reconray.pipelines.fitting import work_dir_for

        folder = args.work_dir or work_dir_for(args.out)
    elif args.command == "serve":
        return Path(tempfile.gettempdir()) / "reconray" / f"serve-{args.port}.log"
    else:
        folder = args.out
    if is_uri(folder):  # a log is appended line by line: it stays on the machine that ran the command
        return Path(tempfile.gettempdir()) / "reconray" / f"{args.command}-{os.getpid()}.log"
    return Path(folder) / LOG_FILE


def _dispatch(args: argparse.Namespace) -> None:
    if args.command == "run":
        from reconray.pipelines.run import run_default

        run_default(args.out)
    elif args.command == "fit":
        from reconray.pipelines.fit import fit_model
        from reconray.pipelines.fitting import TrainConfig

        setting = _extension_setting(args) if args.add_to else _fit_setting(args)
        given = {"num_workers": args.num_workers, "cpus_per_worker": args.cpus_per_worker, "use_gpu": args.use_gpu,
                 "max_failures": args.max_failures, "checkpoint_every": args.checkpoint_every,
                 "validate_every": args.validate_every}
        training = _validated(TrainConfig, {key: value for key, value in given.items() if value is not None})
        fit_model(
            args.data, setting["method"], args.out, categories=_categories(args.categories), backbone=args.backbone,
            levels=setting["levels"], image_size=setting["image_size"], aggregation=setting["aggregation"],
            pool=setting["pool"], resize=setting["resize"], tile=setting["tile"], weights=args.weights,
            options=setting["options"], training=training, work_dir=args.work_dir, on_bad_image=args.on_bad_image,
            add_to=args.add_to,
        )
    elif args.command == "tune":
        from reconray.pipelines.tune import PRESETS, load_space, tune_method

        preset = args.preset or args.method
        if args.space is None and preset not in PRESETS:
            raise OptionError(f"no preset {preset!r}; presets: {sorted(PRESETS)} (or give --space FILE.yaml)")
        summary = tune_method(
            args.data, args.method, args.out, space=load_space(args.space) if args.space else PRESETS[preset],
            num_samples=args.num_samples, max_concurrent=args.max_concurrent, search=args.search,
            objective=args.objective, time_budget_s=args.time_budget_s, trial_cpus=args.trial_cpus,
            trial_gpus=args.trial_gpus,
            categories=_categories(args.categories), backbone=args.backbone, levels=args.levels or DEFAULT_LEVELS,
            image_size=args.image_size or DEFAULT_IMAGE_SIZE, aggregation=args.aggregation or DEFAULT_AGGREGATION,
            pool=DEFAULT_POOL if args.pool is None else args.pool, resize=args.resize or DEFAULT_RESIZE, tile=args.tile,
        )
        logger.info("best %s %.4f with %s: %s, %s", args.objective, summary.best_objective, summary.best_options,
                    joined(args.out, "best.yaml"), joined(args.out, "best"))
    elif args.command == "evaluate":
        from reconray.pipelines.evaluate import evaluate_model

        metrics = evaluate_model(args.model, args.data, args.out, categories=_categories(args.categories),
                                 on_bad_image=args.on_bad_image)
        names = ("image_auroc", "pixel_auroc", "aupro", "pixel_ap", "image_f1_max")
        rows = [[category, *(values[name] for name in names)] for category, values in metrics["categories"].items()]
        rows.append(["mean", *(metrics["mean"][name] for name in names)])
        logger.info("\n%s\n\nreport: %s", table(["category", *names], rows), joined(args.out, "report.md"))
    elif args.command == "predict":
        from reconray.pipelines.evaluate import predict_images

        predictions = predict_images(args.model, args.images, args.out, threshold=args.threshold,
                                     category=args.category, heatmaps=args.heatmaps, output=args.format)
        if not isinstance(predictions, list):
            logger.info("%d predictions, %d anomalous: %s", predictions.count, predictions.anomalous, predictions.path)
            return
        shown = predictions[:_PREDICTIONS_SHOWN]
        rows = [[prediction["image"], prediction["score"], prediction["is_anomalous"]] for prediction in shown]
        more = f"\n... and {len(predictions) - len(shown)} more" if len(predictions) > len(shown) else ""
        logger.info("\n%s%s\n\npredictions: %s", table(["image", "score", "anomalous"], rows), more,
                    joined(args.out, "predictions.json"))
    elif args.command == "serve":
        from reconray.pipelines.serve import serve_model

        settings = {
            "threshold": args.threshold, "min_replicas": args.min_replicas, "max_replicas": args.max_replicas,
            "max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_s,
            "num_cpus": args.num_cpus, "num_gpus": args.num_gpus, "max_bytes": args.max_bytes,
            "max_side": args.max_side, "max_models_per_replica": args.max_models,
        }
        options = _validated(ServeOptions, _served_models(args.model)
                             | {key: value for key, value in settings.items() if value is not None})
        serve_model(options, host=args.host, port=args.port, proxy_location=args.proxy_location)


def _served_models(values: Sequence[str]) -> dict[str, object]:
    """`serve --model` values as ServeOptions fields: one artifact or folder (`model_dir`), or NAME=MODEL pairs."""
    named = [value.partition("=") for value in values]
    if len(values) == 1 and not _is_named(named[0]):
        return {"model_dir": values[0]}
    if not all(_is_named(parts) for parts in named):
        raise OptionError(f"--model: give one artifact (or folder of artifacts), or NAME=MODEL for each model; got "
                          f"{list(values)}")
    models = {name: location for name, _, location in named}
    if len(models) < len(named):
        raise OptionError(f"--model: a name is given twice in {list(values)}")
    return {"models": models}


def _is_named(parts: tuple[str, str, str]) -> bool:
    name, separator, location = parts
    return bool(separator and name and location) and "/" not in name and ":" not in name


def _fit_setting(args: argparse.Namespace) -> dict[str, object]:
    """Method, options and feature settings of `reconray fit`: from --config when given, the command line winning."""
    config: dict[str, object] = {}
    if args.config is not None:
        import yaml

        try:
            config = yaml.safe_load(args.config.read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise OptionError(f"{args.config}: cannot read the fit setting ({error})") from error
        if not isinstance(config, dict):
            raise OptionError(f"{args.config}: expected a mapping with method, options and feature settings")
    method = args.method or config.get("method")
    if method not in METHODS:
        raise OptionError(f"--method (or method: in --config) must be one of {sorted(METHODS)}, got {method!r}")
    return {
        "method": method,
        "options": {**dict(config.get("options") or {}), **parse_key_values(args.options)},
        "levels": args.levels or config.get("levels") or list(DEFAULT_LEVELS),
        "image_size": args.image_size or config.get("image_size") or DEFAULT_IMAGE_SIZE,
        "aggregation": args.aggregation or config.get("aggregation") or DEFAULT_AGGREGATION,
        "pool": args.pool if args.pool is not None else config.get("pool", DEFAULT_POOL),
        "resize": args.resize or config.get("resize") or DEFAULT_RESIZE,
        "tile": args.tile if args.tile is not None else config.get("tile"),
    }


def _extension_setting(args: argparse.Namespace) -> dict[str, object]:
    """`fit --add-to`: the model fixes the method, its options and the features, so flags that set them are refused
    rather than silently ignored."""
    given = {"--method": args.method, "--config": args.config, "--set": args.options or None,
             "--levels": args.levels, "--image-size": args.image_size, "--aggregation": args.aggregation,
             "--pool": args.pool, "--resize": args.resize, "--tile": args.tile, "--weights": args.weights,
             "--backbone": args.backbone if args.backbone != DEFAULT_BACKBONE else None}
    conflicting = [flag for flag, value in given.items() if value is not None]
    if conflicting:
        raise OptionError(f"--add-to takes the method, options and features from {args.add_to}; drop {conflicting}")
    return {"method": None, "options": {}, "levels": list(DEFAULT_LEVELS), "image_size": DEFAULT_IMAGE_SIZE,
            "aggregation": DEFAULT_AGGREGATION, "pool": DEFAULT_POOL, "resize": DEFAULT_RESIZE, "tile": None}


def _validated(model: type, values: dict[str, object]) -> object:
    """A pydantic settings model built from CLI values; a bad value is a user error naming the setting."""
    import pydantic

    try:
        return model(**values)
    except pydantic.ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, item['loc'])) or 'settings'}: {item['msg']}"
                             for item in error.errors())
        raise OptionError(problems) from None


if __name__ == "__main__":
    sys.exit(main())
