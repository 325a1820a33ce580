"""app/tracking.py: where runs go, the store check before training, the logger's wiring, the git
commit tag, and the logger's two faults: replayed steps of a continued run, and a tracking server
that goes away. Health-check servers are local threads on 127.0.0.1; the logger is checked against
real stores (sqlite files, and a real `mlflow server` that is really killed and restarted)."""

from __future__ import annotations

import http.server
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

import app.tracked_logger as tracked_logger
import app.tracking as tracking
from app.errors import UserError
from app.tracked_logger import make_logger
from app.tracking import (PENDING_FILE, TrackingConfig, check_store, fail_fast, git_commit, keep,
                          read_pending, tracking_uri, unavailable, upload_pending)

# ---------------------------------------------------------------------------------------------
# tracking_uri
# ---------------------------------------------------------------------------------------------


def test_config_uri_wins(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://from-env:5000")
    assert tracking_uri(TrackingConfig(uri="http://from-config:5000")) == "http://from-config:5000"


def test_environment_is_next(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://from-env:5000")
    assert tracking_uri(TrackingConfig()) == "http://from-env:5000"


@pytest.mark.parametrize("env", [None, ""])
def test_default_is_sqlite_in_the_working_directory(monkeypatch, tmp_path, env):
    if env is None:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", env)
    monkeypatch.chdir(tmp_path)
    uri = tracking_uri(TrackingConfig())
    assert uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    check_store(uri)  # the default always passes the check


# ---------------------------------------------------------------------------------------------
# check_store: local stores
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("uri", ["file:///tmp/mlruns", "file:mlruns", "./mlruns", "mlruns", "/abs/mlruns"])
def test_file_stores_are_refused_with_a_sqlite_hint(uri):
    with pytest.raises(UserError) as err:
        check_store(uri)
    assert "sqlite" in str(err.value) and uri in str(err.value)


def test_sqlite_in_a_missing_folder_is_refused(tmp_path):
    folder = tmp_path / "no" / "such"
    with pytest.raises(UserError) as err:
        check_store(f"sqlite:///{folder}/mlflow.db")
    assert str(folder) in str(err.value)
    assert not folder.exists()  # the check creates nothing


def test_sqlite_in_an_existing_folder_passes(tmp_path, monkeypatch):
    check_store(f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)
    check_store("sqlite:///mlflow.db")  # relative to the working directory
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_other_database_uris_are_left_to_mlflow():
    check_store("postgresql://user@db.invalid/mlflow")


# ---------------------------------------------------------------------------------------------
# check_store: servers
# ---------------------------------------------------------------------------------------------


class Health(http.server.BaseHTTPRequestHandler):
    status = 200
    paths: list[str] = []

    def do_GET(self):
        type(self).paths.append(self.path)
        body = b"OK" if self.path == "/health" else b"not found"
        self.send_response(self.status if self.path == "/health" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    servers = []

    def start(status: int) -> str:
        handler = type("Handler", (Health,), {"status": status, "paths": []})
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}", handler

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_healthy_server_passes(server):
    uri, handler = server(200)
    check_store(uri)
    check_store(uri + "/")  # a trailing slash is not doubled
    assert handler.paths == ["/health", "/health"]


def test_unreachable_server_fails_fast():
    uri = f"http://127.0.0.1:{closed_port()}"
    start = time.perf_counter()
    with pytest.raises(UserError) as err:
        check_store(uri)
    assert time.perf_counter() - start < 10
    message = str(err.value)
    assert "unreachable" in message and uri in message and "\n" not in message


def test_unhealthy_server_fails(server):
    uri, _ = server(500)
    with pytest.raises(UserError) as err:
        check_store(uri)
    assert uri in str(err.value)


def test_unhealthy_server_is_not_called_unreachable(server):
    uri, _ = server(503)
    with pytest.raises(UserError) as err:
        check_store(uri)
    assert "unreachable" not in str(err.value) and "error" in str(err.value)


@pytest.fixture
def not_http():
    """A TCP port that answers like an SSH server (a common wrong port for tracking.uri)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.settimeout(10)

    def answer():
        try:
            conn, _ = srv.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
        except OSError:
            pass

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    srv.close()
    thread.join(timeout=10)


def test_non_http_server_is_a_user_error(not_http):
    with pytest.raises(UserError):
        check_store(not_http)


# ---------------------------------------------------------------------------------------------
# make_logger (TrackedLogger replaced by a recorder: constructing the real one creates the store)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def made(monkeypatch):
    calls = []
    monkeypatch.setattr(tracked_logger, "TrackedLogger", lambda **kwargs: calls.append(kwargs) or kwargs)
    return calls


def test_logger_on_sqlite_keeps_artifacts_beside_the_database(made, tmp_path):
    config = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="exp", retry_every_s=7.0)
    kwargs = make_logger(config, run_name="run-a", tags={"kind": "moe"}, run_id="abc", pending=tmp_path / PENDING_FILE)
    assert kwargs == {"experiment_name": "exp", "run_name": "run-a", "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
                      "tags": {"kind": "moe"}, "artifact_location": (tmp_path / "mlartifacts").as_uri(),
                      "run_id": "abc", "pending": tmp_path / PENDING_FILE, "retry_every_s": 7.0}


def test_logger_on_a_server_leaves_artifacts_to_it(made, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    kwargs = make_logger(TrackingConfig(), run_name="r", tags={}, run_id=None)
    assert kwargs["tracking_uri"] == "http://127.0.0.1:5000" and kwargs["artifact_location"] is None


def test_logger_on_a_relative_sqlite_uri(made, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    kwargs = make_logger(TrackingConfig(uri="sqlite:///mlflow.db"), run_name="r", tags={}, run_id=None)
    assert kwargs["artifact_location"] == (tmp_path.resolve() / "mlartifacts").as_uri()


# ---------------------------------------------------------------------------------------------
# Which failures are "the store is away" (kept and retried), and failing fast
# ---------------------------------------------------------------------------------------------


def _http_error(status: int):
    import requests

    response = requests.Response()
    response.status_code = status
    return requests.exceptions.HTTPError(f"{status}", response=response)


def test_unreachable_timeouts_5xx_and_429_are_kept_but_wrong_calls_are_raised():
    import requests
    from mlflow.exceptions import MlflowException, RestException

    # What MLflow's REST client raises when the connection is refused or times out.
    assert unavailable(MlflowException("API request to http://127.0.0.1:1/api failed with exception ... refused"))
    assert unavailable(RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "restarting"}))
    assert unavailable(RestException({"error_code": "REQUEST_LIMIT_EXCEEDED", "message": "slow down"}))  # 429
    assert unavailable(requests.exceptions.ConnectionError("refused"))  # artifact uploads
    assert unavailable(_http_error(503))
    assert not unavailable(RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "param changed"}))
    assert not unavailable(RestException({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no run"}))
    assert not unavailable(_http_error(404))
    assert not unavailable(OSError("disk full"))  # a local artifact copy: not a store outage
    assert not unavailable(ValueError("a bug"))


def test_fail_fast_sets_mlflow_http_settings_only_inside_and_keeps_the_users(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "42")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    with pytest.raises(RuntimeError):
        with fail_fast():
            assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1"
            assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "42"  # the user's choice wins
            raise RuntimeError
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "42"


# ---------------------------------------------------------------------------------------------
# TrackedLogger on a real sqlite store: a continued run logs each step once
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path):
    """An sqlite store with one run; returns (uri, client, run_id)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("exp", artifact_location=(tmp_path / "mlartifacts").as_uri())
    return uri, client, client.create_run(experiment).info.run_id


def _log(client, run_id: str, key: str, steps, value=lambda step: step + 0.5) -> None:
    from mlflow.entities import Metric

    client.log_batch(run_id, metrics=[Metric(key, value(s), 1000 + s, s) for s in steps])


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of every row, duplicates included."""
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _continue(uri: str, run_id: str, folder: Path, retry_every_s: float = 30.0):
    config = TrackingConfig(uri=uri, experiment="exp", retry_every_s=retry_every_s)
    return make_logger(config, run_name="r", tags={}, run_id=run_id, pending=folder / PENDING_FILE)


def test_a_continued_run_logs_only_steps_above_what_it_holds_per_key(store, tmp_path):
    uri, client, run_id = store
    # The killed process logged loss up to step 5 but moe/x only to 4 (killed between two batches).
    _log(client, run_id, "loss", range(1, 6))
    _log(client, run_id, "moe/x", range(1, 5))
    logger = _continue(uri, run_id, tmp_path / "run")
    for step in range(4, 8):  # the resumed process replays from its checkpoint at step 3
        logger.log_metrics({"loss": 100.0 + step, "moe/x": 100.0 + step}, step=step)
    # The first record wins: replayed steps keep the first value (equal anyway in an exact resume).
    assert _history(client, run_id, "loss") == [(s, s + 0.5) for s in range(1, 6)] + [(6, 106.0), (7, 107.0)]
    assert _history(client, run_id, "moe/x") == [(s, s + 0.5) for s in range(1, 5)] + [(s, 100.0 + s) for s in (5, 6, 7)]
    assert not (tmp_path / "run").exists()  # nothing was kept


def test_records_left_by_a_killed_run_are_sent_first_and_its_replay_is_dropped(store, tmp_path, capsys):
    uri, client, run_id = store
    _log(client, run_id, "loss", range(1, 5))
    # The killed process could not reach the store for steps 5 and 6, then was killed mid-append.
    folder = tmp_path / "run"
    folder.mkdir()
    kept = [{"run_id": run_id, "metrics": [["loss", s + 0.5, 2000 + s, s]]} for s in (5, 6)]
    (folder / PENDING_FILE).write_text("".join(json.dumps(r) + "\n" for r in kept) + '{"run_id": "' + run_id[:5])
    logger = _continue(uri, run_id, folder)
    for step in (5, 6, 7):
        logger.log_metrics({"loss": 100.0 + step}, step=step)
    assert _history(client, run_id, "loss") == [(s, s + 0.5) for s in range(1, 7)] + [(7, 107.0)]
    assert not (folder / PENDING_FILE).exists()
    err = capsys.readouterr().err
    assert "2 metric values sent (0 already logged, skipped), 0 other records, 1 damaged lines skipped" in err


def test_a_line_cut_by_a_kill_costs_only_itself(tmp_path):
    path = tmp_path / "run" / PENDING_FILE
    first, cut, later = ({"run_id": "r", "metrics": [["loss", float(s), s, s]]} for s in (1, 2, 3))
    keep(path, first)
    with open(path, "ab") as f:  # what a kill in the middle of an append leaves
        f.write(json.dumps(cut).encode()[:20])
    keep(path, later)  # the next process appends behind it
    assert read_pending(path) == ([first, later], 1)


def test_upload_pending_skips_what_the_store_holds_and_repeats_in_the_file(store, tmp_path):
    uri, client, run_id = store
    _log(client, run_id, "loss", range(1, 4))
    client.log_param(run_id, "lr", "0.1")
    (tmp_path / "plot.png").write_bytes(b"\x89PNG fake")
    records = [
        {"run_id": run_id, "params": {"lr": "0.1", "seed": "7"}},  # lr is already set: MLflow refuses a re-log
        {"run_id": run_id, "metrics": [["loss", 9.0, 1, 3], ["loss", 4.5, 1, 4]]},  # step 3 is in the store
        {"run_id": run_id, "metrics": [["loss", 9.0, 2, 4], ["loss", 5.5, 2, 5]]},  # step 4 again: first wins
        {"run_id": run_id, "tags": {"final_checkpoint": "/x/step-5.ckpt"}},
        {"run_id": run_id, "artifact": str(tmp_path / "plot.png"), "artifact_path": None},
        {"run_id": run_id, "artifact": str(tmp_path / "gone.ckpt"), "artifact_path": "checkpoints"},  # pruned
        {"run_id": run_id, "dict": {"a": 1}, "artifact_file": "split.json"},
        {"run_id": run_id, "status": "FINISHED", "end_time": 5000},
    ]
    path = tmp_path / PENDING_FILE
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    report = upload_pending(client, path)
    assert (report.metrics, report.duplicates, report.others, report.missing) == (2, 2, 5, [str(tmp_path / "gone.ckpt")])
    assert _history(client, run_id, "loss") == [(1, 1.5), (2, 2.5), (3, 3.5), (4, 4.5), (5, 5.5)]
    run = client.get_run(run_id)
    assert run.data.params == {"lr": "0.1", "seed": "7"}
    assert run.data.tags["final_checkpoint"] == "/x/step-5.ckpt"
    assert (run.info.status, run.info.end_time) == ("FINISHED", 5000)
    assert {a.path for a in client.list_artifacts(run_id)} == {"plot.png", "split.json"}
    assert not path.exists()
    path.write_text("".join(json.dumps(r) + "\n" for r in records[1:3]))  # sent twice: nothing new
    assert (upload_pending(client, path).metrics, _history(client, run_id, "loss")[-1]) == (0, (5, 5.5))


# ---------------------------------------------------------------------------------------------
# TrackedLogger and a real MLflow server that is killed, then restarted
# ---------------------------------------------------------------------------------------------


def test_a_killed_server_costs_seconds_records_are_kept_and_sent_when_it_is_back(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from tests.pipelines.conftest import MlflowServer

    (tmp_path / "server").mkdir()
    server = MlflowServer(tmp_path / "server")
    try:
        server.start()
        client = MlflowClient(server.uri)

        def logger(name: str, retry_every_s: float):
            config = TrackingConfig(uri=server.uri, experiment="exp", retry_every_s=retry_every_s)
            made = make_logger(config, run_name=name, tags={}, run_id=None, pending=tmp_path / name / PENDING_FILE)
            made.log_hyperparams({"lr": 0.1})
            made.log_metrics({"loss": 1.0}, step=1)
            return made

        eager, patient = logger("eager", 0.0), logger("patient", 3600.0)  # retries at every call / at the end
        server.stop(signal.SIGKILL)
        start = time.perf_counter()
        for step in (2, 3):
            eager.log_metrics({"loss": float(step)}, step=step)
            patient.log_metrics({"loss": float(step)}, step=step)
        eager.set_tags({"final_checkpoint": "/x.ckpt"})
        eager.log_dict({"a": 1}, "split.json")
        patient.finalize("success")
        notice = patient.flush_pending()  # the end of a run, the server still down
        assert time.perf_counter() - start < 15  # MLflow's own retries would take minutes per call
        assert not [k for k in os.environ if k.startswith("MLFLOW_HTTP_REQUEST")]
        lines = lambda name: (tmp_path / name / PENDING_FILE).read_text().splitlines()  # noqa: E731
        assert (len(lines("eager")), len(lines("patient"))) == (4, 3)
        warnings = [line for line in capsys.readouterr().err.splitlines() if "is unreachable" in line]
        assert len(warnings) == 2 and all("Connection refused" in w for w in warnings), warnings  # one per outage
        assert notice == (f"warning: 3 MLflow records did not reach {server.uri} and are kept in "
                          f"{tmp_path / 'patient' / PENDING_FILE}: once it is back, send them with "
                          f"`make sync RUN={tmp_path / 'patient'}` (python -m pipelines sync {tmp_path / 'patient'})")

        server.start()  # the same store on the same port
        eager.log_metrics({"loss": 4.0}, step=4)  # sends what it kept, then this
        patient.log_metrics({"loss": 4.0}, step=4)  # its next try is not due: kept
        assert not (tmp_path / "eager" / PENDING_FILE).exists() and len(lines("patient")) == 4
        assert _history(client, eager.run_id, "loss") == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]
        assert _history(client, patient.run_id, "loss") == [(1, 1.0)]
        assert client.get_run(eager.run_id).data.tags["final_checkpoint"] == "/x.ckpt"
        assert [a.path for a in client.list_artifacts(eager.run_id)] == ["split.json"]

        assert patient.flush_pending() is None  # the last attempt at the end of a run
        assert not (tmp_path / "patient" / PENDING_FILE).exists()
        assert _history(client, patient.run_id, "loss") == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]
        run = client.get_run(patient.run_id)
        assert run.info.status == "FINISHED" and run.data.params == {"lr": "0.1"}
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------
# git_commit
# ---------------------------------------------------------------------------------------------


def test_git_commit_of_this_repository():
    root = Path(tracking.__file__).resolve().parents[1]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    if head.returncode:
        pytest.skip("not a git checkout")
    commit = git_commit()
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", commit)
    assert commit.startswith(head.stdout.strip())


def test_git_commit_outside_a_repository(monkeypatch, tmp_path):
    # The module finds the repository from its own file; pretend that file lives elsewhere.
    monkeypatch.setattr(tracking, "__file__", str(tmp_path / "app" / "tracking.py"))
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    assert git_commit() == "unknown"


def test_a_continued_run_is_running_again_until_it_finishes(store, tmp_path):
    uri, client, run_id = store
    client.set_terminated(run_id, "KILLED")  # e.g. stopped by Ctrl-C
    logger = _continue(uri, run_id, tmp_path / "run")
    logger.reopen()
    assert client.get_run(run_id).info.status == "RUNNING"
    logger.finalize("success")
    assert client.get_run(run_id).info.status == "FINISHED"


@pytest.mark.parametrize("uri", ["ftp://host/mlflow", "s3://bucket/mlruns", "htp://127.0.0.1:5000"])
def test_unknown_schemes_are_refused_naming_the_two_that_work(uri):
    with pytest.raises(UserError, match=r"is not a tracking store MLflow can use: use sqlite:///.*or http\(s\)://"):
        check_store(uri)


@pytest.mark.parametrize("uri", ["mysql+pymysql://u@db.invalid/mlflow", "mssql://u@db.invalid/mlflow"])
def test_database_stores_with_a_driver_are_left_to_mlflow(uri):
    check_store(uri)
