"""The `reconray` command line: run, fit, evaluate, predict, tune and serve (contract in DESIGN.md)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from reconray.methods import METHODS
from reconray.methods.artifact import ArtifactError
from reconray.methods.backbone import DEFAULT_BACKBONE
from reconray.pipelines.datasets import DatasetError


def _key_values(pairs: Sequence[str]) -> dict[str, str]:
    options = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator or not key:
            raise ValueError(f"--set expects key=value, got {pair!r}")
        options[key.strip()] = value.strip()
    return options


def _categories(text: str | None) -> list[str] | None:
    return [name.strip() for name in text.split(",") if name.strip()] if text else None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reconray", description="Industrial visual anomaly detection on Ray.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="build the synthetic dataset, fit and evaluate every method, report")
    run.add_argument("--out", type=Path, help="run directory (default runs/<timestamp>)")

    fit = commands.add_parser("fit", help="fit a method on normal training images")
    fit.add_argument("--data", required=True, help="MVTec AD / MVTec 3D-AD root or category, split CSV, or folder")
    fit.add_argument("--method", required=True, choices=sorted(METHODS))
    fit.add_argument("--out", required=True, type=Path, help="artifact directory to write")
    fit.add_argument("--categories", help="comma-separated subset of categories")
    fit.add_argument("--backbone", default=DEFAULT_BACKBONE, help="timm model name")
    fit.add_argument("--weights", help="local backbone weights file (when the hub cannot be reached)")
    fit.add_argument("--image-size", type=int, default=256)
    fit.add_argument("--levels", default="2,3", help="backbone feature levels, comma-separated")
    fit.add_argument("--set", dest="options", action="append", default=[], metavar="KEY=VALUE",
                     help="method option, repeatable (e.g. --set coreset_ratio=0.1)")
    fit.add_argument("--on-bad-image", choices=("error", "skip"), default="error")

    evaluate = commands.add_parser("evaluate", help="metrics, report and heatmaps on a test split")
    evaluate.add_argument("--model", required=True, type=Path)
    evaluate.add_argument("--data", required=True)
    evaluate.add_argument("--out", required=True, type=Path)
    evaluate.add_argument("--categories")
    evaluate.add_argument("--on-bad-image", choices=("error", "skip"), default="error")

    predict = commands.add_parser("predict", help="score images, write predictions.json and heatmaps")
    predict.add_argument("--model", required=True, type=Path)
    predict.add_argument("--out", required=True, type=Path)
    predict.add_argument("--threshold", type=float, help="override the model's calibrated threshold")
    predict.add_argument("images", nargs="+")

    serve = commands.add_parser("serve", help="online scoring over HTTP with Ray Serve (blocks until Ctrl-C)")
    serve.add_argument("--model", required=True, type=Path)
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--min-replicas", type=int, help="default 1")
    serve.add_argument("--max-replicas", type=int, help="default 2")
    serve.add_argument("--threshold", type=float, help="override the model's calibrated threshold")
    serve.add_argument("--max-batch-size", type=int, help="images per backbone batch (default 8 with a GPU, 1 on CPU)")
    serve.add_argument("--batch-wait-s", type=float, help="longest wait for a batch to fill (default 0.01)")
    serve.add_argument("--num-cpus", type=float, help="CPUs per replica, fractional allowed (default 1)")
    serve.add_argument("--num-gpus", type=float, help="GPUs per replica, fractional allowed (default 0)")
    serve.add_argument("--max-bytes", type=int, help="largest accepted upload in bytes (default 20000000)")
    serve.add_argument("--max-side", type=int, help="largest accepted image side in pixels (default 8000)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except (DatasetError, ArtifactError, ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"reconray {args.command}: error: {error}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "run":
        from reconray.pipelines.run import run_default

        run_default(args.out)
    elif args.command == "fit":
        from reconray.pipelines.fit import fit_model

        fit_model(
            args.data, args.method, args.out, categories=_categories(args.categories), backbone=args.backbone,
            levels=[int(level) for level in args.levels.split(",")], image_size=args.image_size,
            weights=args.weights, options=_key_values(args.options), on_bad_image=args.on_bad_image,
        )
    elif args.command == "evaluate":
        from reconray.pipelines.evaluate import evaluate_model

        metrics = evaluate_model(args.model, args.data, args.out, categories=_categories(args.categories),
                                 on_bad_image=args.on_bad_image)
        print("[reconray] mean: " + ", ".join(f"{k}={v:.3f}" for k, v in metrics["mean"].items()
                                              if isinstance(v, float)))
    elif args.command == "predict":
        from reconray.pipelines.evaluate import predict_images

        for prediction in predict_images(args.model, args.images, args.out, threshold=args.threshold):
            print(f"{prediction['image']}: score {prediction['score']:.4f} anomalous={prediction['is_anomalous']}")
    elif args.command == "serve":
        from reconray.pipelines.serve import ServeOptions, serve_model

        settings = {
            "threshold": args.threshold, "min_replicas": args.min_replicas, "max_replicas": args.max_replicas,
            "max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_s,
            "num_cpus": args.num_cpus, "num_gpus": args.num_gpus, "max_bytes": args.max_bytes,
            "max_side": args.max_side,
        }
        options = ServeOptions(model_dir=str(args.model), **{k: v for k, v in settings.items() if v is not None})
        serve_model(options, host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
