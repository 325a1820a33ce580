"""Send the MLflow records a run kept while its tracking server was unreachable.

    python -m pipelines sync runs/<name>                      (or: make sync RUN=<name>)
    python -m pipelines sync <name> --tracking-uri http://127.0.0.1:5000

Training keeps what the server did not take in runs/<name>/mlflow_pending.jsonl and says so at the
end. This sends it into the run's MLflow run (run.json names it and its store) and deletes the file.
A metric step the MLflow run already holds is skipped, so a replayed step or a second sync
duplicates nothing. Run it once the training has ended.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from app.errors import UserError
from app.run_lock import lock_file
from app.tracking import PENDING_FILE, check_store, missing_database, read_pending, upload_pending
from pipelines.cli import ArgumentParser
from pipelines.config import RunConfig


def run_folder(run: str) -> Path:
    """A run folder given as a path, or as a name under runs/."""
    for folder in (Path(run), Path(RunConfig.root) / run):
        if (folder / "run.json").is_file() or (folder / PENDING_FILE).is_file():
            return folder
    raise UserError(f"no run folder {run} (nor {Path(RunConfig.root) / run}) with a run.json: "
                    "give the run's folder (runs/<name>) or its name")


def refuse_while_training(folder: Path) -> None:
    """A training still running appends to the file (and sends it itself once the server answers):
    sync only after it ended."""
    lock = lock_file(folder.parent, folder.name)
    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # conflicts only with the training's exclusive lock
    except BlockingIOError:
        raise UserError(f"run {folder.name} is still training (lock {lock}): it sends its kept records itself when "
                        "the server answers; sync what is left after it ended") from None
    finally:
        os.close(fd)


def sync(folder: Path, uri: str = "") -> str:
    """Upload `folder`'s pending records; what was done, as one line."""
    refuse_while_training(folder)
    pending = folder / PENDING_FILE
    if not pending.is_file():
        return f"nothing to sync: {folder} has no {PENDING_FILE} (every record reached MLflow)"
    info = folder / "run.json"
    if not uri:
        if not info.is_file():
            raise UserError(f"{info} is missing: pass the tracking store with --tracking-uri")
        uri = json.loads(info.read_text()).get("tracking_uri", "")
    check_store(uri, unreachable_fix=f"start it and sync again (the records stay in {pending}), or pass --tracking-uri")
    if missing_database(uri):
        raise UserError(f"no MLflow store at {uri}: pass the store the run was logged to with --tracking-uri")
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    records, _ = read_pending(pending)
    for run_id in sorted({r["run_id"] for r in records}):
        try:
            client.get_run(run_id)
        except MlflowException:
            raise UserError(f"MLflow run {run_id} of {pending} is not in {uri}: "
                            "pass the store it was logged to with --tracking-uri") from None
    report = upload_pending(client, pending)
    return f"synced {folder} to MLflow at {uri}: {report}"


def main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="python -m pipelines sync", description=__doc__.splitlines()[0])
    parser.add_argument("run", help="the run's folder (runs/<name>) or its name")
    parser.add_argument("--tracking-uri", default="", help="default: the run's own store (run.json)")
    args = parser.parse_args(argv)
    print(sync(run_folder(args.run), args.tracking_uri))
    return 0
