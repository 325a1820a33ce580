"""MLflow tracking: where runs go, checking the store before training, tags and artifacts.

Default store: a SQLite file `mlflow.db` in the working directory (the project folder under
`make`), artifacts beside it in `mlartifacts/`; no server needed. Any tracking URI works, from
`tracking.uri` or `MLFLOW_TRACKING_URI`. MLflow 3 refuses the old `./mlruns` file store, and
Lightning's `MLFlowLogger` defaults to it, so the URI is always passed explicitly.

Training logs through `TrackedLogger` (app/tracked_logger.py), which survives two faults:
- Resume after a kill: the steps between the last checkpoint and the kill are replayed, with
  identical values (exact resume). A continued MLflow run is asked once, per metric key, for the
  highest step it holds (the step of its latest metric), and rows at or below it are dropped: the
  first record wins, and the replay is identical, so nothing is lost and no step is logged twice.
- The tracking store going away: a call that fails because the store is unreachable (connection
  refused, timeout, HTTP 5xx or 429) fails within seconds, the record goes to
  runs/<name>/mlflow_pending.jsonl (appended and flushed per call, so a kill loses nothing) and
  training continues. The buffer is sent, at most every `retry_every_s`, once the store answers
  again; what is left at the end is sent by `python -m pipelines sync runs/<name>`, which skips
  every (key, step) the MLflow run already holds.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from app.errors import UserError


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = ""  # empty: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    experiment: str = "moe-lm"
    checkpoint_artifact_max_mb: float = 200.0  # larger final checkpoints are logged by path only
    continue_run: bool = True  # a resumed run logs into its MLflow run; false: a new MLflow run
    retry_every_s: float = 30.0  # while the store is unreachable, how often training tries it again

    def __post_init__(self) -> None:
        if self.retry_every_s < 0:
            raise ValueError(f"tracking.retry_every_s must be >= 0, got {self.retry_every_s}")


def tracking_uri(config: TrackingConfig) -> str:
    return config.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


_START_SERVER = "start it, or set tracking.uri (empty = the local sqlite store)"
_SQLITE = "sqlite:///"


def sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///` store; None for any other store."""
    return Path(uri[len(_SQLITE):]) if uri.startswith(_SQLITE) else None


def missing_database(uri: str) -> bool:
    """A sqlite store whose file does not exist: a client would create an empty one, so a job that
    only reads runs must not open it."""
    database = sqlite_file(uri)
    return database is not None and not database.is_file()


def check_store(uri: str, *, unreachable_fix: str = _START_SERVER) -> None:
    """Fail before training, not at the first log call, when the store cannot work."""
    if uri.startswith(("http://", "https://")):
        _check_server(uri, unreachable_fix)
    elif (database := sqlite_file(uri)) is not None:
        folder = database.parent
        if not folder.is_dir():
            raise UserError(f"the folder of the MLflow database {uri} does not exist: create {folder} or change tracking.uri")
    elif uri.startswith("file:") or "://" not in uri:
        raise UserError(
            f"MLflow 3 does not accept the file store {uri!r}: use a database, e.g. tracking.uri=sqlite:///mlflow.db"
        )
    elif uri.split("://", 1)[0].split("+", 1)[0] not in _OTHER_STORES:
        raise UserError(f"tracking.uri {uri!r} is not a tracking store MLflow can use: "
                        "use sqlite:///<path>/mlflow.db or http(s)://<server>")


# Stores MLflow reaches through SQLAlchemy (`mysql+pymysql://` too) or Databricks: left to MLflow.
_OTHER_STORES = {"postgresql", "mysql", "mssql", "databricks", "databricks-uc"}


def _check_server(uri: str, unreachable_fix: str) -> None:
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5):
            return
    except urllib.error.HTTPError as err:  # it answered, but not with 200
        raise UserError(f"MLflow tracking server {uri} answered /health with error HTTP {err.code}: check the server") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or type(err).__name__
        raise UserError(f"MLflow tracking server {uri} is unreachable ({reason}): {unreachable_fix}") from None


# ---------------------------------------------------------------------------------------------
# Failing fast, and which failures mean "the store is not there right now"

PENDING_FILE = "mlflow_pending.jsonl"

# MLflow's HTTP defaults (7 retries with exponential backoff, 120 s timeout) would stall a training
# step for minutes when the server is gone; the buffer makes a quick failure lossless instead.
_FAIL_FAST = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
              "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


@contextmanager
def fail_fast() -> Iterator[None]:
    """MLflow's HTTP calls inside fail within seconds. MLflow reads these variables at each request;
    they are set only for the calls inside (a value the user exported wins) and removed after."""
    added = {k: v for k, v in _FAIL_FAST.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def unavailable(err: BaseException) -> bool:
    """True when the store could not take a call now (down, timed out, overloaded): worth keeping the
    record and trying again. A 4xx answer is a wrong call, and trying again would not help."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(err, MlflowException):  # connection errors and timeouts arrive as INTERNAL_ERROR (500)
        status = err.get_http_status_code()
        return status >= 500 or status == 429
    if isinstance(err, requests.exceptions.HTTPError) and err.response is not None:  # artifact uploads
        return err.response.status_code >= 500 or err.response.status_code == 429
    return isinstance(err, requests.exceptions.RequestException)


def logged_steps(client, run_id: str) -> dict[str, int]:
    """metric key -> the highest step the run holds, from one `get_run`: MLflow's latest metric of a
    key is its highest (step, timestamp, value)."""
    return {m.key: m.step for m in client.get_run(run_id).data.to_proto().metrics}


_REASONS = (r"\[Errno -?\d+\] ([^'\")\]]+)", r"(Connection reset by peer)", r"(Connection refused)",
            r"(Read timed out)", r"(Remote end closed connection without response)", r"(Connection aborted)")


def reason(err: BaseException) -> str:
    """The useful part of MLflow's long error text, most specific first: e.g. `Connection refused`."""
    text = str(err)
    for pattern in _REASONS:
        if found := re.search(pattern, text):
            return found.group(1).strip().rstrip(".")
    return text.splitlines()[0][:120] if text else type(err).__name__


def metric_key(key: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_/. -]+", "", key)  # the characters MLflow allows, as Lightning does


# ---------------------------------------------------------------------------------------------
# Records: sending one, and sending a pending file without duplicating steps

def send(client, record: dict) -> None:
    """One record to the store through an MlflowClient."""
    from mlflow.entities import Metric, Param, RunTag

    run_id = record["run_id"]
    if "metrics" in record:
        if record["metrics"]:  # MlflowClient.log_batch splits into MLflow's batch limits
            client.log_batch(run_id, metrics=[Metric(k, v, t, s) for k, v, t, s in record["metrics"]])
    elif "params" in record:
        if record["params"]:
            client.log_batch(run_id, params=[Param(k, v) for k, v in record["params"].items()])
    elif "tags" in record:
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in record["tags"].items()])
    elif "status" in record:
        if record["status"] == "RUNNING":  # a resumed run: it was FAILED, KILLED or FINISHED
            client.update_run(run_id, status="RUNNING")
        else:
            client.set_terminated(run_id, record["status"], record["end_time"])
    elif "artifact" in record:
        client.log_artifact(run_id, record["artifact"], record["artifact_path"])
    elif "artifacts" in record:
        client.log_artifacts(run_id, record["artifacts"], record["artifact_path"])
    elif "dict" in record:
        client.log_dict(run_id, record["dict"], record["artifact_file"])
    else:
        raise ValueError(f"not a tracking record: {sorted(record)}")


def keep(path: Path, record: dict) -> None:
    """Append one record as a line of JSON, flushed: once this returns, a kill loses nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        if f.tell():  # a kill mid-append left a line without its newline: do not glue this record to it
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write((json.dumps(record) + "\n").encode())
        f.flush()  # in the kernel's hands, which outlive the process


def read_pending(path: Path) -> tuple[list[dict], int]:
    """The records of a pending file, and how many lines were damaged (cut by a kill mid-append:
    their steps come after the last checkpoint, so the resumed run logged them again)."""
    records, damaged = [], 0
    for line in path.read_bytes().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            damaged += 1
            continue
        if isinstance(record, dict) and "run_id" in record:
            records.append(record)
        else:
            damaged += 1
    return records, damaged


@dataclass
class SyncReport:
    metrics: int = 0  # metric values sent
    duplicates: int = 0  # metric values at a (key, step) the run already held: skipped
    others: int = 0  # params, tags, statuses and artifacts sent
    damaged: int = 0  # unreadable lines skipped
    missing: list[str] = field(default_factory=list)  # artifact files gone since: skipped

    def __str__(self) -> str:
        text = f"{self.metrics} metric values sent ({self.duplicates} already logged, skipped), {self.others} other records"
        text += f", {self.damaged} damaged lines skipped" if self.damaged else ""
        return text + (f"; files gone, not sent: {', '.join(self.missing)}" if self.missing else "")


def upload_pending(client, path: Path) -> SyncReport:
    """Send a pending file's records in order, then delete it. A metric row is sent only if its
    (run, key, step) is neither in the store nor earlier in the file (the first record wins), so a
    file holding a replay, or sent twice after an interruption, duplicates nothing. Params already set
    are skipped (MLflow params cannot change)."""
    records, damaged = read_pending(path)
    report = SyncReport(damaged=damaged)
    held = _HeldSteps(client)
    params: dict[str, dict[str, str]] = {}
    batch: dict | None = None  # the rows of consecutive metric records of one run: one call
    for record in records:
        run_id = record["run_id"]
        if "metrics" in record:
            if batch is not None and (batch["run_id"] != run_id or len(batch["metrics"]) >= 1000):
                send(client, batch)
                batch = None
            batch = batch or {"run_id": run_id, "metrics": []}
            new = [row for row in record["metrics"] if held.claim(run_id, row[0], row[3])]
            batch["metrics"] += new
            report.metrics += len(new)
            report.duplicates += len(record["metrics"]) - len(new)
            continue
        if batch is not None:
            send(client, batch)
            batch = None
        if "params" in record:
            if run_id not in params:
                params[run_id] = dict(client.get_run(run_id).data.params)
            record = {**record, "params": {k: v for k, v in record["params"].items() if k not in params[run_id]}}
            params[run_id].update(record["params"])
        elif not Path(record.get("artifact") or record.get("artifacts") or ".").exists():
            report.missing.append(record.get("artifact") or record.get("artifacts"))  # e.g. a pruned checkpoint
            continue
        send(client, record)
        report.others += 1
    if batch is not None:
        send(client, batch)
    path.unlink()
    return report


class _HeldSteps:
    """Which (run, key, step) the store holds, asking it little: one get_run per run gives each key's
    highest step; a key's whole history is read only for a row at or below that step (a replay)."""

    def __init__(self, client):
        self.client = client
        self.highest: dict[str, dict[str, int]] = {}  # run -> key -> highest step in the store
        self.steps: dict[tuple[str, str], set[int]] = {}  # (run, key) -> steps known held or sent
        self.read: set[tuple[str, str]] = set()  # (run, key) whose history was read

    def claim(self, run_id: str, key: str, step: int) -> bool:
        """True if the store lacks this step: the caller sends it, and from now on it is held."""
        if run_id not in self.highest:
            self.highest[run_id] = logged_steps(self.client, run_id)
        steps = self.steps.setdefault((run_id, key), set())
        if step <= self.highest[run_id].get(key, -1) and (run_id, key) not in self.read:
            steps |= {m.step for m in self.client.get_metric_history(run_id, key)}
            self.read.add((run_id, key))
        if step in steps:
            return False
        steps.add(step)
        return True


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
