"""app/perf.py: the precision names' dtypes and the measured precision choice (the measurement
itself is replaced by fixed numbers: nothing is timed here)."""

from __future__ import annotations

import pytest
import torch

import app.perf as perf
from app.perf import choose_precision, precision_dtype
from app.trainer import PRECISIONS


@pytest.mark.parametrize("precision, dtype", [
    ("bf16-mixed", torch.bfloat16), ("bf16-true", torch.bfloat16),
    ("16-mixed", torch.float16), ("32-true", torch.float32),
])
def test_precision_dtype(precision, dtype):
    assert precision_dtype(precision) is dtype


def test_every_configurable_precision_has_a_dtype():
    assert {p: precision_dtype(p) for p in PRECISIONS if p != "auto"} == {
        "32-true": torch.float32, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16, "bf16-true": torch.bfloat16}


@pytest.mark.parametrize("fp32, bf16, expected", [
    (100.0, 250.0, "bf16-mixed"),  # AMX: clearly faster
    (100.0, 121.0, "bf16-mixed"),  # just over the 1.2x margin
    (100.0, 120.0, "32-true"),  # at the margin: not worth the rounding
    (100.0, 110.0, "32-true"),
    (100.0, 40.0, "32-true"),  # AVX512-BF16 without AMX: bf16 slower
])
def test_choose_precision_on_cpu(monkeypatch, fp32, bf16, expected):
    measured = []

    def fake_flops(dtype, device, **kwargs):
        measured.append((dtype, device.type))
        return {torch.float32: fp32, torch.bfloat16: bf16}[dtype]

    monkeypatch.setattr(perf, "matmul_flops", fake_flops)
    assert choose_precision(torch.device("cpu")) == expected
    assert sorted(measured, key=str) == sorted([(torch.float32, "cpu"), (torch.bfloat16, "cpu")], key=str)


@pytest.mark.parametrize("bf16_supported, expected", [(True, "bf16-mixed"), (False, "16-mixed")])
def test_choose_precision_on_cuda_is_not_measured(monkeypatch, bf16_supported, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16_supported)
    monkeypatch.setattr(perf, "matmul_flops", lambda *args, **kwargs: pytest.fail("measured on a GPU"))
    assert choose_precision(torch.device("cuda")) == expected
