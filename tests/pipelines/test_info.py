"""`python -m pipelines info`: the printed counts and the exit codes, through the real entry point."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(*args):
    return subprocess.run([sys.executable, "-m", "pipelines", *args], cwd=ROOT, capture_output=True, text=True)


def test_info_prints_mixtral_and_grok_headlines():
    mixtral = run("info", "conf/mixtral_8x7b.yaml")
    assert mixtral.returncode == 0, mixtral.stderr
    assert mixtral.stdout.startswith("46.7B total / 12.9B active parameters")
    grok = run("info", "conf/grok1.yaml")
    assert grok.returncode == 0, grok.stderr
    total, active = (float(grok.stdout.split()[i].rstrip("B")) for i in (0, 3))
    assert abs(total - 314) / 314 < 0.01 and abs(active - 86) / 86 < 0.03


def test_info_reports_a_dense_baseline_that_matches_active_params():
    out = run("info", "conf/default.yaml").stdout
    hidden = int(out.split("model.ffn_hidden=")[1].split()[0])
    dense = run("info", "conf/default.yaml", "model.kind=dense", f"model.ffn_hidden={hidden}").stdout
    moe_active = out.splitlines()[0].split("/")[1].split()[0]
    dense_total, dense_active = dense.splitlines()[0].split(" parameters")[0].split(" / ")
    assert dense_total.split()[0] == dense_active.split()[0] == moe_active


def test_bad_input_exits_2_with_one_line_and_no_traceback():
    for args in (("info", "conf/missing.yaml"), ("info", "moe.num_expert=3"), ("nojob",), ("info", "--bogus")):
        result = run(*args)
        assert result.returncode == 2, args
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: ")
