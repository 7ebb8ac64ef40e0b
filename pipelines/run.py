"""`reconray run`: the main job on the embedded default, start to finish with no arguments and no network.

Builds the synthetic dataset, fits every registered method on a local Ray (rlr at a CPU-sized setting), evaluates
each, and writes one side-by-side report.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from reconray.pipelines.console import table
from reconray.pipelines.evaluate import evaluate_model
from reconray.pipelines.fit import fit_model
from reconray.pipelines.report import comparison_report, write_json
from reconray.pipelines.runtime import ensure_ray
from reconray.pipelines.synthetic import SyntheticConfig, make_synthetic_dataset

logger = logging.getLogger(__name__)

RUN_OPTIONS: dict[str, dict[str, Any]] = {
    "patchcore": {"coreset_ratio": 0.1},
    "sgfr": {},
    "rlr": {"time_budget_s": 45.0},
}
"""Options per method for the default run, sized so that it ends within 5 minutes on 2 CPU cores.

patchcore keeps a 10% greedy coreset (the paper's usual setting), since exact search over the four categories' full
bank costs close to a second per image on a 2-core CPU. rlr trains with the recipe any user gets (`recipe=auto`: the
CPU recipe without a GPU) and a time budget, as a user with five minutes would ask for (measurements:
benchmarks/RESULTS.md, "reconray run").
"""

SUMMARY_METRICS = ("image_auroc", "pixel_auroc", "aupro")


def run_default(
    out_dir: str | Path | None = None,
    synthetic: SyntheticConfig | None = None,
    method_options: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """Runs the whole product on the synthetic dataset and returns the run directory.

    Args:
        out_dir: run directory (default `runs/<timestamp>`): data, models, work (caches, checkpoints), evaluations,
            `report.md`, `metrics.json`.
        synthetic: the dataset to build (default `SyntheticConfig()`, 256 px); images are fitted at its size.
        method_options: options per method (default `RUN_OPTIONS`); its keys say which methods run.
    """
    out_dir = Path(out_dir or default_run_dir())
    synthetic = synthetic or SyntheticConfig()
    started = time.perf_counter()
    data = make_synthetic_dataset(out_dir / "data", synthetic)
    logger.info("synthetic dataset ready: %s (%d categories)", data, len(synthetic.categories))
    ensure_ray()
    results, heatmaps, scores, fits = {}, {}, {}, {}
    work = out_dir / "work"
    for method, options in (method_options or RUN_OPTIONS).items():
        fitted = fit_model(data, method, out_dir / "models" / method, image_size=synthetic.image_size,
                           options=options, work_dir=work / method, feature_cache=work / "cache")
        metrics = evaluate_model(fitted.model_dir, data, out_dir / "evaluation" / method)
        heatmaps[method] = {
            category: [{**entry, "path": f"evaluation/{method}/{entry['path']}"} for entry in entries]
            for category, entries in metrics.pop("heatmaps").items()
        }
        scores[method] = metrics.pop("scores")  # per image, already in evaluation/<method>/scores.json
        results[method] = metrics
        fits[method] = {"model": str(fitted.model_dir), "options": options, "threshold": fitted.threshold,
                        "fit_s": fitted.fit_s}
    write_json(out_dir / "metrics.json", {"dataset": str(data), "methods": results, "models": fits,
                                           "wall_s": time.perf_counter() - started})
    report = comparison_report(results, heatmaps, "reconray run: synthetic dataset, all methods side by side", out_dir,
                               scores)
    (out_dir / "report.md").write_text(report)
    rows = [[method, *(results[method]["mean"][name] for name in SUMMARY_METRICS), fits[method]["fit_s"]]
            for method in results]
    logger.info("\n%s\n", table(["method", *SUMMARY_METRICS, "fit_s"], rows))
    logger.info("run finished in %.0f s: %s", time.perf_counter() - started, out_dir / "report.md")
    return out_dir


def default_run_dir() -> Path:
    """`runs/<timestamp>`: a fresh folder per run, so runs never overwrite each other."""
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")
