"""MLflow tracking: where runs go, checking the store before training, tags and artifacts.

Default store: a SQLite file `mlflow.db` in the working directory (the project folder under
`make`), artifacts beside it in `mlartifacts/`; no server needed. Any tracking URI works, from
`tracking.uri` or `MLFLOW_TRACKING_URI`. MLflow 3 refuses the old `./mlruns` file store, and
Lightning's `MLFlowLogger` defaults to it, so the URI is always passed explicitly.
"""

from __future__ import annotations

import http.client
import os
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from lightning.pytorch.loggers import MLFlowLogger

from app.errors import UserError


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = ""  # empty: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    experiment: str = "moe-lm"
    checkpoint_artifact_max_mb: float = 200.0  # larger final checkpoints are logged by path only
    continue_run: bool = True  # a resumed run logs into its MLflow run; false: a new MLflow run


def tracking_uri(config: TrackingConfig) -> str:
    return config.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def check_store(uri: str) -> None:
    """Fail before training, not at the first log call, when the store cannot work."""
    if uri.startswith(("http://", "https://")):
        _check_server(uri)
    elif uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        if not folder.is_dir():
            raise UserError(f"the folder of the MLflow database {uri} does not exist: create {folder} or change tracking.uri")
    elif uri.startswith("file:") or "://" not in uri:
        raise UserError(
            f"MLflow 3 does not accept the file store {uri!r}: use a database, e.g. tracking.uri=sqlite:///mlflow.db"
        )


def _check_server(uri: str) -> None:
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5):
            return
    except urllib.error.HTTPError as err:  # it answered, but not with 200
        raise UserError(f"MLflow tracking server {uri} answered /health with error HTTP {err.code}: check the server") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or type(err).__name__
        raise UserError(
            f"MLflow tracking server {uri} is unreachable ({reason}): start it, or set tracking.uri "
            "(empty = the local sqlite store)"
        ) from None


def make_logger(config: TrackingConfig, *, run_name: str, tags: dict[str, str], run_id: str | None) -> MLFlowLogger:
    """An MLFlowLogger on the configured store; `run_id` continues an existing run."""
    uri = tracking_uri(config)
    artifacts = None
    if uri.startswith("sqlite:///"):
        artifacts = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return MLFlowLogger(
        experiment_name=config.experiment, run_name=run_name, tracking_uri=uri,
        tags=tags, artifact_location=artifacts, run_id=run_id,
    )


def git_commit() -> str:
    """The project's git commit (with `-dirty` when there are local changes), or `unknown`."""
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if sha.returncode:
        return "unknown"
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
