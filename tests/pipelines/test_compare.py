"""`python -m pipelines compare` (make compare): the table from hand-made MLflow runs, bad input as
one error line, and a real MLflow tracking server holding a debug training and its evaluation.

References: runs created by hand with MLflow's client (so every cell of the table is known), and
for the server, the runs the server itself returns through `MlflowClient(uri)`.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.pipelines.conftest import EXPERIMENT, JobResult, MlflowServer, TrainJob

# ---------------------------------------------------------------------------------------------
# 1. The table, from runs made by hand


@dataclass
class Store:
    folder: Path
    uri: str
    client: object
    ids: dict[str, str]  # run name -> run id


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    """An sqlite store with two training runs (moe, dense) and one evaluation run."""
    from mlflow.tracking import MlflowClient

    folder = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment(EXPERIMENT, artifact_location=(folder / "mlartifacts").as_uri())
    t0 = int(time.time() * 1000)

    def run(name: str, start: int, tags: dict, params: dict, metrics: list[tuple[str, float, int]]) -> str:
        created = client.create_run(experiment, start_time=t0 + start, tags={"mlflow.runName": name, **tags})
        for key, value in params.items():
            client.log_param(created.info.run_id, key, value)
        for key, value, step in metrics:
            client.log_metric(created.info.run_id, key, value, step=step)
        client.set_terminated(created.info.run_id)
        return created.info.run_id

    ids = {
        "beta-dense": run("beta-dense", 2000, {"kind": "dense", "run_name": "beta-dense"},
                          {"moe.num_experts": 4, "moe.router.top_k": 2, "stats.active_params": 112832,
                           "stats.total_params": 112832, "trainer.max_steps": 12},
                          [("val/loss", 4.7, 4), ("val/loss", 4.6, 8), ("val/bits_per_byte", float("nan"), 8)]),
        "alpha-moe": run("alpha-moe", 1000, {"kind": "moe", "run_name": "alpha-moe"},
                         {"moe.num_experts": 4, "moe.router.top_k": 2, "stats.active_params": 112960,
                          "stats.total_params": 162112, "trainer.max_steps": 12},
                         [("val/loss", 5.0, 4), ("val/loss", 4.56789, 8), ("val/bits_per_byte", 4.2, 8),
                          ("perf/tokens_per_s", 1234.4, 8), ("moe/dropped_frac", 0.15, 8),
                          ("moe/load_max_over_mean", 1.987, 8)]),
        "eval-moe-alpha-moe": run("eval-moe-alpha-moe", 3000, {"kind": "eval", "model_kind": "moe"}, {},
                                  [("eval/loss", 4.5, 0)]),
    }
    return Store(folder, uri, client, ids)


def cells(table: str) -> list[list[str]]:
    lines = table.splitlines()
    assert lines[1].replace(" ", "").strip("-") == ""  # the rule under the header
    return [line.split() for line in [lines[0], *lines[2:]]]


def test_table_shows_the_latest_metrics_and_params_of_each_training_run(store: Store):
    from pipelines.compare import find_runs, table

    runs = find_runs(store.client, EXPERIMENT)
    assert [r.info.run_name for r in runs] == ["alpha-moe", "beta-dense"]  # by start time, no eval run
    rows = cells(table(runs))
    assert rows[0] == ["run", "kind", "experts", "top-k", "active", "total", "steps", "val", "loss", "bits/byte",
                       "tokens/s", "dropped", "max/mean", "load"]
    assert rows[1] == ["alpha-moe", "moe", "4", "2", "0.11M", "0.16M", "12", "4.5679", "4.2000", "1234", "0.1500", "1.99"]
    # A dense run: no experts nor top-k even though it logged the moe section; NaN and missing metrics are "-".
    assert rows[2] == ["beta-dense", "dense", "-", "-", "0.11M", "0.11M", "12", "4.6000", "-", "-", "-", "-"]


def test_find_runs_filters_by_name_by_mlflow_filter_and_includes_eval_runs_on_request(store: Store):
    from pipelines.compare import find_runs

    names = lambda runs: [r.info.run_name for r in runs]  # noqa: E731
    assert names(find_runs(store.client, EXPERIMENT, include_eval=True)) == ["alpha-moe", "beta-dense", "eval-moe-alpha-moe"]
    assert names(find_runs(store.client, EXPERIMENT, name="beta")) == ["beta-dense"]
    assert names(find_runs(store.client, EXPERIMENT, filter_string="tags.kind = 'moe'")) == ["alpha-moe"]
    assert names(find_runs(store.client, EXPERIMENT, filter_string="metrics.`val/loss` < 4.6")) == ["alpha-moe"]
    assert find_runs(store.client, EXPERIMENT, name="gamma") == []


# ---------------------------------------------------------------------------------------------
# 2. Bad input: exit 2, one `error:` line, nothing written


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BAD = {  # name -> (arguments after `compare --tracking-uri <store>`, what the error line says)
    "unknown-experiment": (["--experiment", "nosuch"], "no MLflow experiment named 'nosuch'"),
    "malformed-filter": (["--filter", "tags.kind = = 'dense'"], "MLflow could not search the runs"),
    "unknown-filter-key": (["--filter", "colour = 'red'"], "MLflow could not search the runs"),
    "no-run-matches-filter": (["--filter", "tags.kind = 'nosuch'"], "no runs match in experiment 'moe-lm'"),
    "no-run-matches-name": (["--name", "gamma"], "no runs match in experiment 'moe-lm'"),
    "only-eval-runs-match": (["--name", "eval-"], "no runs match"),
    "unknown-option": (["--bogus"], "unrecognized arguments: --bogus"),
    "unreachable-server": (None, "unreachable"),
}


def run_compare(capfd, monkeypatch, cwd: Path, args: list[str]) -> tuple[int, str, str]:
    """The entry point `python -m pipelines` runs, in process (compare trains nothing): its
    return value is the exit status."""
    import warnings

    from pipelines.__main__ import main

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # main() replaces it
    capfd.readouterr()
    code = main(["compare", *args])
    out, err = capfd.readouterr()
    return code, out, err


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_exits_2_with_one_error_line_and_writes_nothing(store: Store, capfd, monkeypatch, tmp_path, name: str):
    args, message = BAD[name]
    uri = f"http://127.0.0.1:{_closed_port()}" if args is None else store.uri
    code, out, err = run_compare(capfd, monkeypatch, tmp_path, ["--tracking-uri", uri, *(args or [])])
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0], err
    assert out == ""
    assert list(tmp_path.iterdir()) == [], "compare wrote files"


def test_bad_input_through_the_command_line_exits_2_with_one_line(store: Store, train_job: TrainJob, tmp_path):
    result = train_job.run(tmp_path, ["compare", "--tracking-uri", store.uri, "--experiment", "nosuch"], timeout=120)
    assert result.returncode == 2, result.explain()
    assert result.stderr.strip().splitlines() == [
        f"error: no MLflow experiment named 'nosuch' at this tracking URI: train a run first (make train)"], result.explain()
    assert result.stdout == "" and list(tmp_path.iterdir()) == []


def test_compare_without_a_store_is_one_error_line_and_creates_no_database(train_job: TrainJob, tmp_path):
    result = train_job.run(tmp_path, ["compare"], timeout=120)
    assert result.returncode == 2, result.explain()
    assert result.stderr.strip().startswith("error: "), result.explain()
    assert len(result.stderr.strip().splitlines()) == 1, result.explain()
    assert not (tmp_path / "mlflow.db").exists()


# ---------------------------------------------------------------------------------------------
# 3. A real MLflow tracking server: a debug training and its evaluation, then compare

SERVED = ("trainer.max_steps=4", "trainer.val_every=2", "trainer.ckpt_every=2", "trainer.log_every=2",
          "eval.max_windows=4")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`mlflow server` on a free port (tests/pipelines/conftest.py: MlflowServer), stopped at the end
    whatever happened."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        yield server.start().uri
    finally:
        server.stop()


@dataclass
class Served:
    cwd: Path
    uri: str
    train: JobResult
    eval: JobResult
    compare: JobResult  # `compare --tracking-uri <server>`, as a subprocess

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.uri)

    def runs(self) -> list:
        client = self.client()
        experiment = client.get_experiment_by_name(EXPERIMENT)
        assert experiment is not None
        return client.search_runs([experiment.experiment_id], max_results=1000)


@pytest.fixture(scope="module")
def served(server: str, train_job: TrainJob, tmp_path_factory) -> Served:
    cwd = tmp_path_factory.mktemp("served")
    tracking = f"tracking.uri={server}"
    train = train_job.run(cwd, train_job.debug_args(*SERVED, tracking))
    assert train.returncode == 0, train.explain()
    evaluated = train_job.run(cwd, ["eval", *train_job.debug_args(*SERVED, tracking)[1:]])
    assert evaluated.returncode == 0, evaluated.explain()
    compare = train_job.run(cwd, ["compare", "--tracking-uri", server], timeout=120)
    return Served(cwd, server, train, evaluated, compare)


def test_training_and_evaluation_log_to_the_tracking_server(served: Served, tmp_path):
    assert served.eval.stderr.count("is not trained yet: training it now") == 1, served.eval.explain()
    assert "the dense model" in served.eval.stderr
    assert not (served.cwd / "mlflow.db").exists()  # nothing went to the local default store
    runs = served.runs()
    training = {r.data.tags["kind"]: r for r in runs if r.data.tags.get("kind") != "eval"}
    evals = {r.data.tags["model_kind"]: r for r in runs if r.data.tags.get("kind") == "eval"}
    assert len(runs) == 4 and training.keys() == evals.keys() == {"moe", "dense"}
    for kind in ("moe", "dense"):
        assert training[kind].info.status == evals[kind].info.status == "FINISHED"
        assert evals[kind].data.tags["training_run_id"] == training[kind].info.run_id
        assert "eval/loss" in evals[kind].data.metrics
        assert sorted(m.step for m in served.client().get_metric_history(training[kind].info.run_id, "val/loss")) == [2, 4]
    assert f"run {training['moe'].info.run_name}:" in served.train.stderr  # the run trained first, reused by eval
    # Artifacts go through the server (proxied), and come back through it.
    client = served.client()
    assert {"comparison.md", "expert_specialisation.json"} <= {a.path for a in client.list_artifacts(evals["moe"].info.run_id)}
    table = Path(client.download_artifacts(evals["moe"].info.run_id, "comparison.md", str(tmp_path))).read_text()
    # (MLflow adds its own "View run ... at: <server>" lines to stdout for runs on a server.)
    assert table in served.eval.stdout and table.startswith("| measure | MoE | dense |")


def _rows(stdout: str) -> dict[str, list[str]]:
    """run name -> its cells, from compare's printed table."""
    lines = stdout.strip().splitlines()
    assert lines[0].split()[:2] == ["run", "kind"]
    return {line.split()[0]: line.split() for line in lines[2:]}


def test_compare_lists_the_servers_training_runs(served: Served):
    assert served.compare.returncode == 0, served.compare.explain()
    runs = served.runs()
    names = {r.data.tags["kind"]: r.info.run_name for r in runs if r.data.tags.get("kind") != "eval"}
    rows = _rows(served.compare.stdout)
    assert {name: cells[1] for name, cells in rows.items()} == {names["moe"]: "moe", names["dense"]: "dense"}
    for r in runs:  # the val loss column is the run's latest val/loss
        if r.info.run_name in rows:
            assert rows[r.info.run_name][7] == f"{r.data.metrics['val/loss']:.4f}"
    assert "validation loss plot:" in served.compare.stderr
    assert (served.cwd / "runs" / "compare" / "val_loss.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("args, kinds", [
    (["--filter", "tags.kind = 'dense'"], ["dense"]),
    (["--name", "moe"], ["moe"]),  # the dense run's name is debug-dense-<hex>
    (["--filter", "tags.kind != 'moe'", "--name", "debug-"], ["dense"]),
    (["--all"], ["moe", "dense", "eval", "eval"]),
])
def test_compare_filter_name_and_all_select_runs_on_the_server(served: Served, capfd, monkeypatch, tmp_path, args, kinds):
    runs = served.runs()
    code, out, err = run_compare(capfd, monkeypatch, tmp_path, ["--tracking-uri", served.uri, *args])
    assert code == 0, err
    rows = _rows(out)
    expected = {r.info.run_name: r.data.tags["kind"] for r in runs if r.data.tags["kind"] in kinds}
    assert {name: cells[1] for name, cells in rows.items()} == expected
    assert sorted(expected.values()) == sorted(kinds)
