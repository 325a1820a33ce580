"""The Lightning logger training uses: MLflow's, made to survive a resume after a kill (no step
logged twice) and a tracking server that goes away (records kept in the run folder, sent later).
How and why: app/tracking.py, whose records, sending and pending files it uses. Kept apart from
app/tracking.py so that jobs that only read MLflow (`compare`, `sync`) do not import Lightning.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

from lightning.fabric.utilities.logger import _add_prefix, _convert_params, _flatten_dict
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from app.errors import say
from app.tracking import (TrackingConfig, fail_fast, keep, logged_steps, metric_key, reason, send, sqlite_file,
                          tracking_uri, unavailable, upload_pending)


def make_logger(config: TrackingConfig, *, run_name: str, tags: dict[str, str], run_id: str | None,
                pending: Path | None = None) -> TrackedLogger:
    """A logger on the configured store; `run_id` continues an existing run. With `pending` (a file in
    the run folder), records the store cannot take are kept there instead of stopping training."""
    uri = tracking_uri(config)
    database = sqlite_file(uri)
    artifacts = None if database is None else (database.parent / "mlartifacts").resolve().as_uri()
    return TrackedLogger(
        experiment_name=config.experiment, run_name=run_name, tracking_uri=uri,
        tags=tags, artifact_location=artifacts, run_id=run_id, pending=pending, retry_every_s=config.retry_every_s,
    )


class TrackedLogger(MLFlowLogger):
    """Lightning's MLFlowLogger that drops replayed steps of a continued run and, given a `pending`
    file, keeps what an unreachable store cannot take instead of failing the run.

    Every call becomes a record (a JSON object: run_id plus metrics, params, tags, status, artifact or
    dict) that is sent now or appended to `pending`. NOTE: once a record is pending, later ones are
    appended behind it until the whole file went through, so the store receives them in order.
    """

    def __init__(self, *args, pending: Path | None = None, retry_every_s: float = 30.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.pending, self.retry_every_s = pending, retry_every_s
        self._backlog = pending is not None and pending.is_file()  # e.g. left by a killed run: sent first
        self._watermark: dict[str, int] | None = None if self._run_id else {}  # a new run holds nothing
        self._next_try = 0.0  # time.monotonic() of the next attempt while the store is away
        self._away = False  # the store failed since it last answered

    # Lightning's hooks --------------------------------------------------------------------------

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        timestamp = int(time.time() * 1000)
        rows = [[metric_key(k), float(v), timestamp, step or 0]
                for k, v in _add_prefix(metrics, self._prefix, self.LOGGER_JOIN_CHAR).items() if not isinstance(v, str)]
        if rows:
            self._deliver({"metrics": rows})

    @rank_zero_only
    def log_hyperparams(self, params) -> None:
        flat = _flatten_dict(_convert_params(params))
        if flat:
            self._deliver({"params": {k: str(v)[:250] for k, v in flat.items()}})  # Lightning's truncation

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        if not self._initialized:
            return
        self._next_try = 0.0  # the end of fit: one more attempt, whatever the retry interval
        status = {"success": "FINISHED", "finished": "FINISHED", "failed": "FAILED"}.get(status, status)
        self._deliver({"status": status, "end_time": int(time.time() * 1000)})

    # Used by pipelines/train.py ---------------------------------------------------------------

    @rank_zero_only
    def reopen(self) -> None:
        """A continued run trains again: its status goes back to RUNNING until finalize."""
        self._deliver({"status": "RUNNING"})


    @rank_zero_only
    def log_artifact(self, local_path: Path, artifact_path: str | None = None) -> None:
        key = "artifacts" if Path(local_path).is_dir() else "artifact"
        self._deliver({key: str(Path(local_path).resolve()), "artifact_path": artifact_path})

    @rank_zero_only
    def log_dict(self, dictionary: dict, artifact_file: str) -> None:
        self._deliver({"dict": dictionary, "artifact_file": artifact_file})

    @rank_zero_only
    def set_tags(self, tags: dict[str, str]) -> None:
        self._deliver({"tags": {k: str(v) for k, v in tags.items()}})

    def flush_pending(self) -> str | None:
        """A last attempt to send what is kept; the line to show the user if some is still kept."""
        if self.pending is None or not self._backlog:
            return None
        self._next_try = 0.0
        self._ready()
        if not self._backlog:
            return None
        count = self.pending.read_bytes().count(b"\n")
        run_dir = self.pending.parent
        return (f"warning: {count} MLflow records did not reach {self._tracking_uri} and are kept in {self.pending}: "
                f"once it is back, send them with `make sync RUN={run_dir}` (python -m pipelines sync {run_dir})")

    # Sending or keeping ------------------------------------------------------------------------

    def _deliver(self, record: dict) -> None:
        record = {"run_id": self.run_id, **record}
        if self.pending is None:  # no run folder to keep records in: MLflow's own behaviour
            if self._watermark is None:
                self._watermark = logged_steps(self.experiment, self.run_id)
            send(self.experiment, self._new(record))
            return
        if self._ready():
            try:
                with fail_fast():
                    send(self.experiment, self._new(record))
                return
            except Exception as err:
                if not unavailable(err):
                    raise
                self._went_away(err)
        record = self._new(record) if self._watermark is not None else record  # else: the upload dedups exactly
        if record.get("metrics", True):
            keep(self.pending, record)
            self._backlog = True

    def _new(self, record: dict) -> dict:
        """A metrics record without the rows at steps the continued run already holds."""
        if "metrics" not in record or not self._watermark:
            return record
        rows = [r for r in record["metrics"] if r[3] > self._watermark.get(r[0], -1)]
        return {**record, "metrics": rows}

    def _ready(self) -> bool:
        """Whether a call may go to the store now: what is kept went through first, and the steps
        a continued run holds are known. While the store is away this is tried every retry_every_s."""
        if self._away and time.monotonic() < self._next_try:
            return False
        try:
            with fail_fast():
                if self._backlog and self.pending.is_file():
                    say(f"MLflow store {self._tracking_uri} answers: {upload_pending(self.experiment, self.pending)}")
                self._backlog = False
                if self._watermark is None:
                    self._watermark = logged_steps(self.experiment, self.run_id)
        except Exception as err:
            if not unavailable(err):
                raise
            self._went_away(err)
            return False
        self._away = False
        return True

    def _went_away(self, err: BaseException) -> None:
        self._next_try = time.monotonic() + self.retry_every_s
        if not self._away:
            say(f"warning: MLflow store {self._tracking_uri} is unreachable ({reason(err)}): training continues, its "
                 f"records are kept in {self.pending} and sent when the store answers again")
        self._away = True
