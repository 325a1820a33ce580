"""The training runs of an MLflow experiment side by side, from MLflow's own search API.

    python -m pipelines compare                                  (or: make compare)
    python -m pipelines compare --name switch                    runs whose name contains "switch"
    python -m pipelines compare --filter "tags.kind = 'dense'"   any MLflow search filter
    python -m pipelines compare --tracking-uri http://127.0.0.1:5000 --experiment moe-lm

Prints a table (latest value of each metric) and writes a plot of validation loss vs step to
runs/compare/val_loss.png.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from app.errors import UserError
from app.plots import curves_plot
from app.tracking import TrackingConfig, check_store, missing_database, tracking_uri
from pipelines.cli import ArgumentParser

COLUMNS = [  # header, where the value comes from
    ("run", lambda r: r.data.tags.get("run_name") or r.info.run_name),
    ("kind", lambda r: r.data.tags.get("kind", "")),
    ("experts", lambda r: _param(r, "moe.num_experts", moe_only=True)),
    ("top-k", lambda r: _param(r, "moe.router.top_k", moe_only=True)),
    ("active", lambda r: _millions(r.data.params.get("stats.active_params"))),
    ("total", lambda r: _millions(r.data.params.get("stats.total_params"))),
    ("steps", lambda r: r.data.params.get("trainer.max_steps", "-")),
    ("val loss", lambda r: _metric(r, "val/loss", "{:.4f}")),
    ("bits/byte", lambda r: _metric(r, "val/bits_per_byte", "{:.4f}")),
    ("tokens/s", lambda r: _metric(r, "perf/tokens_per_s", "{:.0f}")),
    ("dropped", lambda r: _metric(r, "moe/dropped_frac", "{:.4f}")),
    ("max/mean load", lambda r: _metric(r, "moe/load_max_over_mean", "{:.2f}")),
]


def find_runs(client: MlflowClient, experiment: str, *, name: str = "", filter_string: str = "", include_eval: bool = False) -> list[Run]:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise UserError(f"no MLflow experiment named {experiment!r} at this tracking URI: train a run first (make train)")
    runs = client.search_runs([found.experiment_id], filter_string=filter_string, order_by=["attributes.start_time ASC"])
    runs = [r for r in runs if include_eval or r.data.tags.get("kind") != "eval"]
    return [r for r in runs if name in (r.data.tags.get("run_name") or r.info.run_name or "")]


def table(runs: list[Run]) -> str:
    rows = [[str(get(run)) for _, get in COLUMNS] for run in runs]
    headers = [header for header, _ in COLUMNS]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(row) for row in rows)])


def plot(client: MlflowClient, runs: list[Run], path: Path) -> Path:
    curves = {}
    for run in runs:
        history = sorted({m.step: m.value for m in client.get_metric_history(run.info.run_id, "val/loss")}.items())
        if history:
            curves[COLUMNS[0][1](run)] = ([s for s, _ in history], [v for _, v in history])
    path.parent.mkdir(parents=True, exist_ok=True)
    return curves_plot(curves, xlabel="optimizer step", ylabel="validation loss (nats/token)",
                       title="Validation loss", path=path)


def _param(run: Run, key: str, *, moe_only: bool = False) -> str:
    if moe_only and run.data.tags.get("kind") == "dense":
        return "-"
    return run.data.params.get(key, "-")


def _millions(value: str | None) -> str:
    return f"{int(value) / 1e6:.2f}M" if value else "-"


def _metric(run: Run, key: str, fmt: str) -> str:
    value = run.data.metrics.get(key)
    return "-" if value is None or math.isnan(value) else fmt.format(value)


def main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="python -m pipelines compare", description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default=TrackingConfig.experiment)
    parser.add_argument("--tracking-uri", default="", help="default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db here")
    parser.add_argument("--name", default="", help="keep runs whose name contains this")
    parser.add_argument("--filter", default="", help="an MLflow search filter, e.g. \"tags.kind = 'moe'\"")
    parser.add_argument("--all", action="store_true", help="include evaluation runs")
    parser.add_argument("--plot", type=Path, default=Path("runs/compare/val_loss.png"))
    args = parser.parse_args(argv)
    uri = tracking_uri(TrackingConfig(uri=args.tracking_uri))
    check_store(uri)
    if missing_database(uri):
        raise UserError(f"no MLflow store at {uri}: train a run first (make train) or pass --tracking-uri")
    client = MlflowClient(uri)
    try:
        runs = find_runs(client, args.experiment, name=args.name, filter_string=args.filter, include_eval=args.all)
    except Exception as err:  # MLflow rejects a malformed filter with its own exception types
        if isinstance(err, UserError):
            raise
        raise UserError(f"MLflow could not search the runs: {str(err).splitlines()[0][:200]}") from None
    if not runs:
        raise UserError(f"no runs match in experiment {args.experiment!r} (filter {args.filter!r}, name {args.name!r})")
    print(table(runs))
    print(f"\nvalidation loss plot: {plot(client, runs, args.plot)}", file=sys.stderr)
    return 0
