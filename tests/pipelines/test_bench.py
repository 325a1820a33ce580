"""`python -m pipelines bench` on tiny shapes, once: the JSON rows' schema and their arithmetic.

No timing assertions: the figures depend on the machine and its load. What is checked is that
every row the README describes is there, with consistent numbers (ratios are ms / dense ms of the
same shape and dtype, GFLOP/s and tokens/s follow from ms), and that bad input is one error line.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "layer.tokens=64", "layer.dim=32", "layer.hidden=16", "layer.experts=4", "layer.top_k=2",
    "layer.fine_experts=8", "layer.fine_hidden=8", "layer.fine_top_k=4", "layer.repeats=2", "layer.warmup=1",
    "layer.profile=true",
    "train.recipe=conf/debug.yaml", "train.steps=2", "train.warmup=1",
    "parallel.enabled=true", "parallel.repeats=2", "parallel.warmup=1",
]
LAYER_NAMES = {"moe_layer", "moe_layer_recompute", "moe_layer_grouped_mm", "dense_ffn", "expert_matmuls", "naive_loop"}


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pipelines", "bench", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("bench")
    done = run(*TINY, f"out={out}")
    assert done.returncode == 0, done.stderr[-3000:]
    return done, out


@pytest.fixture(scope="module")
def rows(bench) -> list[dict]:
    return json.loads((bench[1] / "latest.json").read_text())


def by_name(rows: list[dict], name: str) -> list[dict]:
    return [r for r in rows if r["name"] == name]


def test_writes_latest_and_a_timestamped_copy(bench, rows):
    _, out = bench
    stamped = [p for p in out.glob("*.json") if p.name != "latest.json"]
    assert len(stamped) == 1 and json.loads(stamped[0].read_text()) == rows


def test_every_row_has_the_schema(rows):
    for row in rows:
        assert {"name", "dtype", "shape", "ms_median", "ratio_to_dense", "gflops"} <= set(row), row
        assert row["dtype"] in ("fp32", "bf16")
        assert isinstance(row["shape"], dict) and row["shape"]


def test_layer_rows_for_both_shapes_and_dtypes(rows):
    shapes = {(r["shape"]["experts"], r["shape"]["top_k"], r["shape"]["hidden"]) for r in by_name(rows, "dense_ffn")}
    assert shapes == {(4, 2, 16), (8, 4, 8)}
    for name in LAYER_NAMES:
        measured = by_name(rows, name)
        assert {r["dtype"] for r in measured} == {"fp32", "bf16"}, name
        assert len(measured) == 4 and all(r["ms_median"] > 0 for r in measured), name


def test_ratios_gflops_and_tokens_follow_from_ms(rows):
    layer_rows = [r for r in rows if r["name"] in LAYER_NAMES or r["name"].startswith("hf_mixtral")]
    for row in layer_rows:
        if row["ms_median"] is None:
            assert row.get("skipped") and row["ratio_to_dense"] is None
            continue
        dense = [d for d in by_name(rows, "dense_ffn") if d["shape"] == row["shape"] and d["dtype"] == row["dtype"]]
        assert len(dense) == 1
        assert math.isclose(row["ratio_to_dense"], row["ms_median"] / dense[0]["ms_median"], rel_tol=1e-9)
        s = row["shape"]
        flops = 3 * 2 * s["tokens"] * (3 * s["dim"] * s["top_k"] * s["hidden"] + s["dim"] * s["experts"])
        assert math.isclose(row["gflops"], flops / (row["ms_median"] * 1e-3) / 1e9, rel_tol=1e-9)
        assert math.isclose(row["tokens_per_s"], s["tokens"] / (row["ms_median"] * 1e-3), rel_tol=1e-9)
    for row in by_name(rows, "dense_ffn"):
        assert row["ratio_to_dense"] == 1.0


def test_activation_memory_of_the_dense_ffn_and_of_the_recomputed_experts(rows):
    """Hand-computed: the dense FFN (fp32) keeps h [T, 2H], silu(gate) and SwiGLU's output [T, H];
    recomputation drops the experts' silu(gate) and SwiGLU output, [T*K, F] each (dropless)."""
    for dense in by_name(rows, "dense_ffn"):
        s = dense["shape"]
        if dense["dtype"] == "fp32":
            assert dense["activation_mib"] * 2**20 == s["tokens"] * 4 * s["top_k"] * s["hidden"] * 4
        itemsize = 4 if dense["dtype"] == "fp32" else 2
        same = [r for r in rows if r["shape"] == s and r["dtype"] == dense["dtype"]]
        kept, recomputed = (next(r for r in same if r["name"] == n) for n in ("moe_layer", "moe_layer_recompute"))
        saved = (kept["activation_mib"] - recomputed["activation_mib"]) * 2**20
        assert saved == 2 * s["tokens"] * s["top_k"] * s["hidden"] * itemsize


def test_hf_rows_are_measured_or_say_why_not(rows):
    hf = by_name(rows, "hf_mixtral")
    assert {r["dtype"] for r in hf} == {"fp32", "bf16"} and len(hf) == 4
    for row in hf:
        if row["ms_median"] is None:
            assert "transformers" in row["skipped"]
        else:  # the best of the implementations that ran
            variants = [r for r in rows if r["name"].startswith("hf_mixtral_") and r["shape"] == row["shape"]
                        and r["dtype"] == row["dtype"] and r["ms_median"] is not None]
            assert row["ms_median"] == min(r["ms_median"] for r in variants)
            assert f"hf_mixtral_{row['impl']}" in {r["name"] for r in variants}


def test_training_rows_have_tokens_per_s_and_mfu(rows):
    peaks = {r["dtype"]: r["gflops"] for r in by_name(rows, "matmul_peak")}
    assert set(peaks) == {"fp32", "bf16"} and all(v > 0 for v in peaks.values())
    moe, dense = by_name(rows, "train_step_moe"), by_name(rows, "train_step_dense")
    assert len(moe) == len(dense) == 1
    moe, dense = moe[0], dense[0]
    assert moe["dtype"] == dense["dtype"] == "fp32"  # conf/debug.yaml pins 32-true
    tokens = moe["shape"]["batch_size"] * moe["shape"]["seq_len"]
    for row in (moe, dense):
        assert math.isclose(row["tokens_per_s"], tokens / (row["ms_median"] * 1e-3), rel_tol=1e-9)
        assert math.isclose(row["mfu"], row["gflops"] / peaks[row["dtype"]], rel_tol=1e-9)
        assert 0 < row["mfu"] < 1
    assert dense["ratio_to_dense"] == 1.0
    assert math.isclose(moe["ratio_to_dense"], moe["ms_median"] / dense["ms_median"], rel_tol=1e-9)
    assert moe["shape"]["kind"] == "moe" and dense["shape"]["kind"] == "dense"


def test_expert_parallel_rows(rows):
    ep1, ep2 = by_name(rows, "ep1_layer_step"), by_name(rows, "ep2_layer_step")
    assert len(ep1) == len(ep2) == 1
    ep1, ep2 = ep1[0], ep2[0]
    assert ep1["processes"] == 1 and ep2["processes"] == 2 and ep1["shape"] == ep2["shape"]
    assert ep1["alltoall_share"] == 0.0 and 0 < ep2["alltoall_share"] < 1 and ep2["alltoall_ms"] > 0
    assert math.isclose(ep2["ratio_to_ep1"], ep2["ms_median"] / ep1["ms_median"], rel_tol=1e-9)


def test_prints_the_table_and_the_profiles(bench):
    done, _ = bench
    for name in (*LAYER_NAMES, "train_step_moe", "train_step_dense", "ep2_layer_step"):
        assert name in done.stdout
    assert done.stdout.count("torch.profiler, moe_layer") == 4  # 2 shapes x 2 dtypes
    assert "aten::mm" in done.stdout


def test_rows_say_how_busy_the_machine_was(rows):
    for row in rows:
        if row["name"] in LAYER_NAMES or row["name"].startswith("train_step"):
            assert row["others_cpu"] is None or 0.0 <= row["others_cpu"] <= 1.0


@pytest.mark.parametrize("args", [("layer.dtypes=[fp16]",), ("layer.tokns=5",), ("train.recipe=conf/missing.yaml",)])
def test_bad_input_is_one_error_line(args, tmp_path):
    done = run(*args, "layer.repeats=1", f"out={tmp_path}")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith("error: ")
