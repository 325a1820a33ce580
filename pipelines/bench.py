"""Speed of the MoE layer and of whole training steps against the FLOP-matched dense model.

    python -m pipelines bench                                   (or: make bench)
    python -m pipelines bench layer.tokens=512 layer.dim=128 layer.hidden=256 train.recipe=conf/debug.yaml
    python -m pipelines bench parallel.enabled=true             (adds the ep=2 vs ep=1 rows, torchrun)
    python -m pipelines bench layer.profile=true train.steps=0  (plus torch.profiler's top operators)

Layer rows, forward + backward of one layer on (1, T, D) activations, the median of
`layer.repeats` runs with the candidates interleaved (so a busy moment hits them all alike):
  moe_layer             moe.MoELayer, dropless token choice (expert_impl=loop, the default)
  moe_layer_recompute   the same with moe.recompute_activations=true (less activation memory)
  moe_layer_grouped_mm  the same with expert_impl=grouped_mm
  dense_ffn             a dense SwiGLU FFN of hidden top_k * F: the same active FLOPs
  expert_matmuls        moe_layer's expert products alone, no routing, gathers or elementwise work
  naive_loop            one boolean mask per expert, gather, expert, index_add (same router/weights)
  hf_mixtral            transformers' MixtralSparseMoeBlock, the fastest of its expert
                        implementations (each one also gets its own row hf_mixtral_<impl>);
                        skipped when transformers is missing: pip install -e '.[bench]'
fp32 rows run in float32; bf16 rows under bf16 autocast (float32 weights, as `bf16-mixed` trains),
except HF's block, which is converted to bf16 (its grouped_mm path is not autocast-aware).
Each layer row also has `activation_mib`: what its forward keeps for the backward (parameters and
input excluded), measured with autograd's saved-tensor hooks.
Training rows: whole Lightning training steps (forward, backward, clipping, AdamW) of
`train.recipe` and of its dense baseline with the same active parameters, on random tokens, in
the precision `make train` would choose; MFU against the matrix-product peak measured in the run.

Prints a table; writes the rows as JSON to <out>/latest.json and <out>/<timestamp>.json.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from moe import MoEConfig, MoELayer, RouterConfig, SwiGLU, dense_baseline, model_stats
from pipelines.cli import config_parser, split_config_arg
from pipelines.config import load_config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HF_IMPLS = ("eager", "grouped_mm", "batched_mm")
HF_BATCHED_MM_MAX_BYTES = 2**31  # batched_mm gathers one weight copy per assignment
BUSY = 0.05  # other processes' CPU share above which a row's figures are flagged


@dataclass
class LayerBench:
    tokens: int = 4096
    dim: int = 512
    hidden: int = 1024  # F of each expert; the dense FFN is top_k * hidden wide
    experts: int = 8
    top_k: int = 2
    # The fine-grained shape (same tokens and dim): many narrow experts. fine_experts=0 skips it.
    fine_experts: int = 64
    fine_hidden: int = 128
    fine_top_k: int = 8
    dtypes: list[str] = field(default_factory=lambda: ["fp32", "bf16"])
    repeats: int = 5
    warmup: int = 2
    naive: bool = True
    hf: bool = True
    profile: bool = False  # also print torch.profiler's top operators of moe_layer (3 steps)

    def __post_init__(self) -> None:
        unknown = [d for d in self.dtypes if d not in DTYPES]
        if unknown:
            raise ValueError(f"layer.dtypes: unknown {unknown}, choose from {list(DTYPES)}")
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError("layer.repeats must be >= 1 and layer.warmup >= 0")

    def shapes(self) -> list[Shape]:
        shapes = [Shape(self.tokens, self.dim, self.hidden, self.experts, self.top_k)]
        if self.fine_experts:
            shapes.append(Shape(self.tokens, self.dim, self.fine_hidden, self.fine_experts, self.fine_top_k))
        return shapes


@dataclass
class TrainBench:
    recipe: str = "conf/default.yaml"  # the model `make train` trains
    steps: int = 8  # timed optimizer steps per model; 0 skips the training rows
    warmup: int = 2
    precision: str = "auto"  # auto: what `make train` would pick on this machine (measured)


@dataclass
class ParallelBench:
    enabled: bool = False  # ep=2 (2 processes, torchrun, gloo) vs ep=1 on the same global batch
    dtype: str = "fp32"
    repeats: int = 5
    warmup: int = 2


@dataclass
class BenchConfig:
    layer: LayerBench = field(default_factory=LayerBench)
    train: TrainBench = field(default_factory=TrainBench)
    parallel: ParallelBench = field(default_factory=ParallelBench)
    out: str = "runs/bench"


@dataclass(frozen=True)
class Shape:
    tokens: int
    dim: int
    hidden: int
    experts: int
    top_k: int

    @property
    def train_flops(self) -> float:
        """Forward + backward FLOPs of the active experts (= the dense FFN) and the router: 3x forward."""
        ffn = 2 * self.tokens * 3 * self.dim * self.top_k * self.hidden
        router = 2 * self.tokens * self.dim * self.experts
        return 3.0 * (ffn + router)

    def label(self) -> str:
        return f"T{self.tokens} D{self.dim} F{self.hidden} E{self.experts} k{self.top_k}"


# ---------------------------------------------------------------------------------------------
# Timing


def time_interleaved(steps: dict[str, Callable[[], None]], *, repeats: int, warmup: int) -> dict[str, float]:
    """Median wall time (ms) of each step; rounds run every step once, in turn."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


@dataclass
class LayerStep:
    """One training-like step of `forward`: fresh input leaf, forward (under autocast), backward."""

    module: torch.nn.Module
    forward: Callable[[Tensor], Tensor]
    x: Tensor
    grad: Tensor
    autocast: torch.dtype | None

    def __call__(self) -> None:
        self.module.zero_grad(set_to_none=True)
        x_ = self.x.detach().requires_grad_(True)
        with self._autocast():
            y = self.forward(x_)
        y.backward(self.grad.to(y.dtype))

    def activation_mib(self) -> float:
        """MiB the forward keeps for its backward, besides its input and the module's parameters
        (each storage counted once)."""
        skip = {t.untyped_storage().data_ptr() for t in self.module.parameters()}
        kept: dict[int, int] = {}

        def pack(t: Tensor) -> Tensor:
            if t.untyped_storage().data_ptr() not in skip:
                kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        x_ = self.x.detach().requires_grad_(True)
        skip.add(x_.untyped_storage().data_ptr())
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), self._autocast():
            self.forward(x_)
        return sum(kept.values()) / 2**20

    def _autocast(self):
        return torch.autocast("cpu", dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None)


class ExpertMatmuls:
    """The `expert_matmuls` step: only the matrix products the MoE layer's experts make in a forward
    and backward (two forward, four backward per expert), with the loads the layer's router gives x,
    reading rows from buffers reused by every expert and writing outputs allocated once. No routing,
    gather, scatter, SwiGLU, weighting or autograd: the floor of any expert-by-expert loop over this
    machine's matrix products."""

    def __init__(self, layer: MoELayer, x: Tensor, autocast: torch.dtype | None):
        with torch.no_grad():
            self.counts = layer(x)[1].tokens_per_expert.tolist()
        experts, dtype = layer.experts, autocast or torch.float32
        self.w_in = experts.w_in.detach().to(dtype).unbind(0)
        self.w_out = experts.w_out.detach().to(dtype).unbind(0)
        self.dw_in = torch.empty_like(experts.w_in, dtype=dtype).unbind(0)
        self.dw_out = torch.empty_like(experts.w_out, dtype=dtype).unbind(0)
        rows, dim, hidden = max(self.counts), experts.dim, experts.hidden
        self.x, self.h, self.a, self.y, self.dy, self.u, self.dh, self.dx = (
            torch.randn(rows, width).to(dtype) for width in (dim, 2 * hidden, hidden, dim, dim, hidden, 2 * hidden, dim))

    def __call__(self) -> None:
        for e, m in enumerate(self.counts):
            torch.mm(self.x[:m], self.w_in[e], out=self.h[:m])
            torch.mm(self.a[:m], self.w_out[e], out=self.y[:m])
        for e, m in enumerate(self.counts):
            torch.mm(self.a[:m].t(), self.dy[:m], out=self.dw_out[e])
            torch.mm(self.dy[:m], self.w_out[e].t(), out=self.u[:m])
            torch.mm(self.x[:m].t(), self.dh[:m], out=self.dw_in[e])
            torch.mm(self.dh[:m], self.w_in[e].t(), out=self.dx[:m])

    def activation_mib(self) -> None:
        return None  # no autograd


def profile(step: Callable[[], None], steps: int = 3, top: int = 12) -> str:
    """torch.profiler's operators by self CPU time over `steps` calls of `step`."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


def load_1min() -> float:
    return os.getloadavg()[0]


class OthersCPU:
    """Share of the machine's cores that other processes used while the block ran (from
    /proc/stat, minus this process's own CPU time): 0.0 means the figures had the machine alone."""

    def __enter__(self) -> OthersCPU:
        self.share = None
        self._start = (time.perf_counter(), time.process_time(), _busy_seconds())
        return self

    def __exit__(self, *exc) -> None:
        wall, own, busy = (b - a for a, b in zip(self._start, (time.perf_counter(), time.process_time(), _busy_seconds())))
        if busy is not None and wall >= 1.0:  # /proc/stat counts in 10 ms ticks: too coarse below
            self.share = max(0.0, (busy - own) / (wall * os.cpu_count()))


def _busy_seconds() -> float | None:
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None  # not Linux: unknown
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------
# Layer rows


def layer_rows(shape: Shape, dtype: str, cfg: LayerBench) -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(1, shape.tokens, shape.dim)
    grad = torch.randn(1, shape.tokens, shape.dim)
    autocast = DTYPES[dtype] if dtype != "fp32" else None
    steps, notes = {}, {}
    for name, impl, recompute in (("moe_layer", "loop", False), ("moe_layer_recompute", "loop", True),
                                  ("moe_layer_grouped_mm", "grouped_mm", False)):
        layer = moe_layer(shape, impl, recompute)
        steps[name] = LayerStep(layer, lambda v, m=layer: m(v)[0], x, grad, autocast)
    dense = SwiGLU(shape.dim, shape.top_k * shape.hidden)
    steps["dense_ffn"] = LayerStep(dense, dense, x, grad, autocast)
    steps["expert_matmuls"] = ExpertMatmuls(steps["moe_layer"].module, x, autocast)
    if cfg.naive:
        naive = moe_layer(shape, "loop")
        steps["naive_loop"] = LayerStep(naive, lambda v: naive_loop(naive, v), x, grad, autocast)
    if cfg.hf:
        hf_steps, notes = hf_mixtral_steps(shape, dtype, x, grad)
        steps.update(hf_steps)
    mib = {name: step.activation_mib() for name, step in steps.items()}
    load = load_1min()
    with OthersCPU() as others:
        ms = time_interleaved(steps, repeats=cfg.repeats, warmup=cfg.warmup)
    rows = [dict(_layer_row(name, dtype, shape, value, ms["dense_ffn"], load), activation_mib=mib[name],
                 others_cpu=others.share) for name, value in ms.items()]
    if cfg.profile:
        print(f"torch.profiler, moe_layer {shape.label()} {dtype}, 3 steps:\n{profile(steps['moe_layer'])}", flush=True)
    rows += _best_hf(rows)
    rows += [dict(_layer_row(name, dtype, shape, None, ms["dense_ffn"], load), skipped=why) for name, why in notes.items()]
    return rows


def _layer_row(name: str, dtype: str, shape: Shape, ms: float | None, dense_ms: float, load: float) -> dict:
    return {
        "name": name, "dtype": dtype, "shape": dataclasses.asdict(shape), "ms_median": ms,
        "ratio_to_dense": None if ms is None else ms / dense_ms,
        "gflops": None if ms is None else shape.train_flops / (ms * 1e-3) / 1e9,
        "tokens_per_s": None if ms is None else shape.tokens / (ms * 1e-3), "load_1min": load,
    }


def _best_hf(rows: list[dict]) -> list[dict]:
    """The `hf_mixtral` row: the fastest of HF's expert implementations that ran."""
    hf = [r for r in rows if r["name"].startswith("hf_mixtral_") and r["ms_median"] is not None]
    if not hf:
        return []
    best = min(hf, key=lambda r: r["ms_median"])
    return [dict(best, name="hf_mixtral", impl=best["name"].removeprefix("hf_mixtral_"))]


def moe_layer(shape: Shape, impl: str, recompute: bool = False) -> MoELayer:
    torch.manual_seed(0)
    config = MoEConfig(num_experts=shape.experts, expert_hidden=shape.hidden, router=RouterConfig(top_k=shape.top_k),
                       dropless=True, expert_impl=impl, recompute_activations=recompute)
    return MoELayer(config, shape.dim)


def naive_loop(layer: MoELayer, x_BTD: Tensor) -> Tensor:
    """The layer's math the way it is often first written: per expert, a boolean mask over the
    (token, k) choices, a gather, the expert, and an index_add back (HF Mixtral's eager loop)."""
    x_TD = x_BTD.reshape(-1, x_BTD.shape[-1])
    probs_TE = torch.softmax(F.linear(x_TD.float(), layer.router.gate.weight), dim=-1)
    weights_TK, ids_TK = probs_TE.topk(layer.config.router.top_k, dim=-1)
    weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    out_TD = torch.zeros_like(x_TD)
    hidden = layer.config.expert_hidden
    for e in range(layer.config.num_experts):
        token_idx, k_idx = torch.where(ids_TK == e)
        h = x_TD[token_idx] @ layer.experts.w_in[e]
        y = (F.silu(h[:, :hidden]) * h[:, hidden:]) @ layer.experts.w_out[e]
        out_TD.index_add_(0, token_idx, (y * weights_TK[token_idx, k_idx, None]).to(out_TD.dtype))
    return out_TD.view_as(x_BTD)


def hf_mixtral_steps(shape: Shape, dtype: str, x: Tensor, grad: Tensor) -> tuple[dict, dict]:
    """Steps for each of transformers' Mixtral expert implementations, and why any was skipped."""
    try:
        from transformers.models.mixtral import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        return {}, {"hf_mixtral": "transformers is not installed: pip install -e '.[bench]'"}
    steps, notes = {}, {}
    weight_copies = shape.tokens * shape.top_k * 3 * shape.dim * shape.hidden * DTYPES[dtype].itemsize
    for impl in HF_IMPLS:
        if impl == "batched_mm" and weight_copies > HF_BATCHED_MM_MAX_BYTES:
            notes[f"hf_mixtral_{impl}"] = f"needs {weight_copies / 2**30:.0f} GiB of gathered expert weights"
            continue
        config = MixtralConfig(hidden_size=shape.dim, intermediate_size=shape.hidden, num_local_experts=shape.experts,
                               num_experts_per_tok=shape.top_k, experts_implementation=impl)
        torch.manual_seed(0)
        block = MixtralSparseMoeBlock(config)
        for p in block.parameters():
            torch.nn.init.normal_(p, std=0.02)
        block.to(DTYPES[dtype])
        steps[f"hf_mixtral_{impl}"] = LayerStep(block, block, x.to(DTYPES[dtype]), grad, None)
    return steps, notes


# ---------------------------------------------------------------------------------------------
# Training-step rows


def train_rows(cfg: TrainBench, experiment) -> list[dict]:
    from app.perf import choose_precision, matmul_flops, precision_dtype

    cpu = torch.device("cpu")
    precision = choose_precision(cpu) if cfg.precision == "auto" else cfg.precision
    dtype = "bf16" if precision_dtype(precision) == torch.bfloat16 else "fp32"
    peaks = {name: matmul_flops(d, cpu) for name, d in DTYPES.items()}
    rows = [_peak_row(name, flops) for name, flops in peaks.items()]
    models = {"train_step_moe": experiment.model, "train_step_dense": dense_baseline(experiment.model, experiment.moe)}
    ms = {}
    for name, model in models.items():
        load = load_1min()
        with OthersCPU() as others:
            ms[name] = time_training(experiment, model, precision, steps=cfg.steps, warmup=cfg.warmup)
        stats = model_stats(model, experiment.moe)
        tokens = experiment.trainer.batch_size * experiment.trainer.seq_len
        tokens_per_s = tokens / (ms[name] * 1e-3)
        rows.append({
            "name": name, "dtype": dtype, "shape": _train_shape(experiment, model, cfg.recipe), "ms_median": ms[name],
            "ratio_to_dense": None, "gflops": tokens_per_s * stats.flops_per_token_train / 1e9,
            "tokens_per_s": tokens_per_s, "mfu": tokens_per_s * stats.flops_per_token_train / peaks[dtype],
            "precision": precision, "load_1min": load, "others_cpu": others.share,
        })
    for row in rows[len(peaks):]:
        row["ratio_to_dense"] = row["ms_median"] / ms["train_step_dense"]
    return rows


def _peak_row(dtype: str, flops: float) -> dict:
    return {"name": "matmul_peak", "dtype": dtype, "shape": {"m": 1024, "n": 1024, "k": 1024}, "ms_median": None,
            "ratio_to_dense": None, "gflops": flops / 1e9, "load_1min": load_1min()}


def _train_shape(experiment, model, recipe: str) -> dict:
    shape = {"recipe": recipe, "kind": model.kind.value, "batch_size": experiment.trainer.batch_size,
             "seq_len": experiment.trainer.seq_len, "dim": model.dim, "n_layers": model.n_layers}
    if model.kind.value == "moe":
        moe = experiment.moe
        shape.update(experts=moe.num_experts, hidden=moe.expert_hidden, top_k=moe.router.top_k)
    else:
        shape.update(ffn_hidden=model.ffn_hidden)
    return shape


def time_training(experiment, model, precision: str, *, steps: int, warmup: int) -> float:
    """Median wall time (ms) between the ends of consecutive optimizer steps of a Lightning fit."""
    import lightning as L

    from app.module import MoELanguageModel
    from app.trainer import build_trainer

    class StepClock(L.Callback):
        def __init__(self):
            self.ends: list[float] = []

        def on_train_batch_end(self, *args) -> None:
            self.ends.append(time.perf_counter())

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*(does not have many workers|LeafSpec|no `val_dataloader`).*")
    trainer_cfg = dataclasses.replace(experiment.trainer, max_steps=warmup + steps + 1, precision=precision,
                                      progress_bar=False, accelerator="cpu", devices=1, accumulate=1)
    torch.manual_seed(trainer_cfg.seed)
    module = MoELanguageModel(model, experiment.moe, experiment.optim, max_steps=trainer_cfg.max_steps)
    clock = StepClock()
    trainer = build_trainer(trainer_cfg, precision=precision, callbacks=[clock], logger=None)
    trainer.fit(module, train_dataloaders=_random_batches(trainer_cfg.batch_size, trainer_cfg.seq_len, model.vocab_size))
    intervals = [b - a for a, b in zip(clock.ends, clock.ends[1:])][warmup:]
    return 1e3 * statistics.median(intervals)


def _random_batches(batch_size: int, seq_len: int, vocab_size: int) -> torch.utils.data.DataLoader:
    class Batches(torch.utils.data.IterableDataset):
        def __iter__(self):
            generator = torch.Generator().manual_seed(0)
            index = 0
            while True:
                tokens = torch.randint(vocab_size, (batch_size, seq_len + 1), generator=generator)
                yield {"tokens": tokens, "index": torch.tensor(index)}
                index += 1

    return torch.utils.data.DataLoader(Batches(), batch_size=None)


# ---------------------------------------------------------------------------------------------
# Expert-parallel rows


def parallel_rows(layer: LayerBench, cfg: ParallelBench) -> list[dict]:
    """ep=1: this process (all its threads) on the global batch; ep=2: two single-threaded
    processes under torchrun, each with half of it (pipelines/bench_ep.py)."""
    shape = layer.shapes()[0]
    autocast = DTYPES[cfg.dtype] if cfg.dtype != "fp32" else None
    x, grad = torch.randn(1, shape.tokens, shape.dim), torch.randn(1, shape.tokens, shape.dim)
    moe = moe_layer(shape, "loop")
    load = load_1min()
    ep1 = time_interleaved({"ep1": LayerStep(moe, lambda v: moe(v)[0], x, grad, autocast)},
                           repeats=cfg.repeats, warmup=cfg.warmup)["ep1"]
    ep2 = _run_ep_worker(shape, cfg)
    rows = []
    for name, ms, share in (("ep1_layer_step", ep1, 0.0), ("ep2_layer_step", ep2["ms_median"], ep2["alltoall_share"])):
        row = _layer_row(name, cfg.dtype, shape, ms, ep1, load)
        row["ratio_to_dense"] = None  # no dense row in this group: ratio_to_ep1 instead
        rows.append(dict(row, ratio_to_ep1=ms / ep1, alltoall_share=share, processes=1 if name.startswith("ep1") else 2))
    rows[-1]["alltoall_ms"] = ep2["alltoall_ms"]
    return rows


def _run_ep_worker(shape: Shape, cfg: ParallelBench) -> dict:
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    args = json.dumps({**dataclasses.asdict(shape), "dtype": cfg.dtype, "repeats": cfg.repeats, "warmup": cfg.warmup})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "pipelines.bench_ep", args]
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"the ep=2 worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Report


def bench(config: BenchConfig) -> list[dict]:
    experiment = None
    if config.train.steps:  # read the recipe first: a bad one fails before minutes of measuring
        experiment = load_config(config.train.recipe, [])
        experiment.model.vocab_size = experiment.data.vocab_size  # what its tokenizer would give
    rows = []
    for shape in config.layer.shapes():
        for dtype in config.layer.dtypes:
            rows += layer_rows(shape, dtype, config.layer)
    if experiment is not None:
        rows += train_rows(config.train, experiment)
    if config.parallel.enabled:
        rows += parallel_rows(config.layer, config.parallel)
    return rows


def table(rows: list[dict]) -> str:
    header = (f"{'name':<22} {'dtype':<5} {'shape':<34} {'ms':>9} {'x dense':>8} {'GFLOP/s':>8} {'tok/s':>9} "
              f"{'MFU':>6} {'act MiB':>8}  note")
    lines = [header, "-" * len(header)]
    for r in rows:
        shape = r["shape"]
        label = Shape(**shape).label() if set(shape) == {f.name for f in dataclasses.fields(Shape)} else _short(shape)
        note = r.get("skipped") or _note(r)
        lines.append(
            f"{r['name']:<22} {r['dtype']:<5} {label:<34} {_fmt(r['ms_median'], '9.1f')} "
            f"{_fmt(r.get('ratio_to_dense') or r.get('ratio_to_ep1'), '8.3f')} {_fmt(r['gflops'], '8.1f')} "
            f"{_fmt(r.get('tokens_per_s'), '9.0f')} {_fmt(r.get('mfu'), '6.1%')} {_fmt(r.get('activation_mib'), '8.1f')}  {note}"
        )
    return "\n".join(lines)


def _short(shape: dict) -> str:
    keys = {"batch_size": "B", "seq_len": "T", "dim": "D", "n_layers": "L", "experts": "E", "hidden": "F",
            "top_k": "k", "ffn_hidden": "H", "m": "m", "n": "n", "k": "k"}
    return " ".join(f"{keys[k]}{v}" for k, v in shape.items() if k in keys)


def _note(row: dict) -> str:
    parts = []
    if "impl" in row:
        parts.append(f"best HF impl: {row['impl']}")
    if "alltoall_share" in row and row["name"].startswith("ep2"):
        parts.append(f"all-to-all {row['alltoall_share']:.1%} of the step; ratio is to ep1")
    if row["name"] == "matmul_peak":
        parts.append("1024^3 matmul peak")
    if (row.get("others_cpu") or 0) > BUSY:
        parts.append(f"busy: others used {row['others_cpu']:.0%} of the CPU")
    return "; ".join(parts)


def _fmt(value: float | None, spec: str) -> str:
    width = int(spec.split(".")[0])
    return f"{value:{spec}}" if value is not None else f"{'-':>{width}}"


def write(rows: list[dict], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(rows, indent=1)
    stamped = out / f"{time.strftime('%Y%m%d-%H%M%S')}.json"
    stamped.write_text(text)
    tmp = out / ".latest.json.tmp"
    tmp.write_text(text)
    os.replace(tmp, out / "latest.json")
    return stamped


def main(argv: list[str]) -> int:
    args = config_parser("python -m pipelines bench", __doc__.splitlines()[0]).parse_args(argv)
    path, overrides = split_config_arg(args)
    config = load_config(path, overrides, schema=BenchConfig)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load_1min():.2f}", flush=True)
    rows = bench(config)
    print(table(rows))
    stamped = write(rows, Path(config.out))
    print(f"load average {load_1min():.2f}; rows written to {Path(config.out) / 'latest.json'} and {stamped}")
    if any((r.get("others_cpu") or 0) > BUSY for r in rows):
        print("warning: other processes were busy during some rows (see note): re-run on a quiet machine", file=sys.stderr)
    return 0
