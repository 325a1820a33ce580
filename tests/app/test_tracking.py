"""app/tracking.py: where runs go, the store check before training, the logger's wiring, and the
git commit tag. Servers are local threads on 127.0.0.1; no MLflow store is ever created."""

from __future__ import annotations

import http.server
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

import app.tracking as tracking
from app.errors import UserError
from app.tracking import TrackingConfig, check_store, git_commit, make_logger, tracking_uri

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
# make_logger (MLFlowLogger replaced by a recorder: constructing the real one creates the store)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def made(monkeypatch):
    calls = []
    monkeypatch.setattr(tracking, "MLFlowLogger", lambda **kwargs: calls.append(kwargs) or kwargs)
    return calls


def test_logger_on_sqlite_keeps_artifacts_beside_the_database(made, tmp_path):
    config = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="exp")
    kwargs = make_logger(config, run_name="run-a", tags={"kind": "moe"}, run_id="abc")
    assert kwargs == {"experiment_name": "exp", "run_name": "run-a", "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
                      "tags": {"kind": "moe"}, "artifact_location": (tmp_path / "mlartifacts").as_uri(),
                      "run_id": "abc"}


def test_logger_on_a_server_leaves_artifacts_to_it(made, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    kwargs = make_logger(TrackingConfig(), run_name="r", tags={}, run_id=None)
    assert kwargs["tracking_uri"] == "http://127.0.0.1:5000" and kwargs["artifact_location"] is None


def test_logger_on_a_relative_sqlite_uri(made, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    kwargs = make_logger(TrackingConfig(uri="sqlite:///mlflow.db"), run_name="r", tags={}, run_id=None)
    assert kwargs["artifact_location"] == (tmp_path.resolve() / "mlartifacts").as_uri()


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
