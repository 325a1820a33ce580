"""Evaluate the latest MoE run against its FLOP-matched dense baseline on held-out text.

    python -m pipelines eval conf/default.yaml                 (or: make eval)
    python -m pipelines eval conf/switch.yaml eval.max_windows=50
    python -m pipelines eval conf/default.yaml eval.moe=runs/<name>/checkpoints/last.ckpt eval.dense=<run name>

The MoE run is the one `make train CONFIG=...` makes (or `eval.moe`); the dense baseline has the
same active parameters, data, tokenizer, steps, batch and schedule. Either is trained first when
it is missing or unfinished. Checkpoints are only read. Results: a table on the terminal and one
MLflow evaluation run per model (tag kind=eval), linked to its training run.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mlflow.tracking import MlflowClient
from tokenizers import Tokenizer

from app.checkpoint import latest_checkpoint, load_weights, read_checkpoint
from app.data import token_byte_lengths
from app.errors import UserError, say
from app.evaluation import Evaluation, evaluate, top_tokens
from app.plots import curves_plot, load_heatmap
from app.tracking import check_store, tracking_uri
from app.trainer import TrainingStopped
from moe import ModelKind, ModelStats, Transformer, dense_baseline, model_stats
from pipelines.cli import config_parser, split_config_arg
from pipelines.config import ExperimentConfig, config_from_yaml, load_config
from pipelines.corpus import read_documents
from pipelines.tokenize import EOS_TOKEN, TokenData, encode, prepare_data
from pipelines.train import default_run_name, stopped, train


@dataclass
class Trained:
    """A finished training run, as evaluation needs it."""

    label: str  # "moe" or "dense"
    checkpoint: Path
    config: ExperimentConfig  # the checkpoint's own
    run_id: str | None  # its MLflow training run
    stats: ModelStats
    history: dict[str, list[tuple[int, float]]]  # MLflow metric histories of the training run
    wall_seconds: float


def evaluate_pair(config: ExperimentConfig, *, recipe: str) -> dict[str, Evaluation]:
    """Train what is missing, score both models, log evaluation runs, print the comparison."""
    uri = tracking_uri(config.tracking)
    check_store(uri)
    data = prepare_data(config.data, progress=config.trainer.progress_bar)
    config.model.vocab_size = data.meta["vocab_size"]
    client = MlflowClient(uri)
    # Derived before training the MoE: training records its measured precision in its config.
    dense_config = copy.deepcopy(dataclasses.replace(config, model=dense_baseline(config.model, config.moe),
                                                     run=dataclasses.replace(config.run, name="")))
    moe = _trained("moe", config, config.eval.moe, recipe, client)
    dense = _trained("dense", dense_config, config.eval.dense, recipe, client)
    sources = _sources(config, data)
    results = {t.label: _score(t, sources, config) for t in (moe, dense)}
    table = comparison_table(moe, dense, results)
    print(table)
    _log_eval_runs(client, config, moe, dense, results, table, data)
    return results


def _trained(label: str, config: ExperimentConfig, which: str, recipe: str, client: MlflowClient) -> Trained:
    if which and not Path(which).exists():
        config.run.name = which  # a run name: train it under that name when it is missing
    checkpoint = _find_checkpoint(which, config, recipe)
    raw = None if checkpoint is None else read_checkpoint(checkpoint)
    if raw is None or int(raw.get("global_step", 0)) < config.trainer.max_steps:  # missing or unfinished
        if which and Path(which).exists():
            raise UserError(f"eval.{label}={which} is not a finished run: finish it with make train first")
        say(f"the {label} model {config.run.name or default_run_name(config, recipe)} is not trained yet: training it now")
        train(config, recipe=recipe)
        checkpoint = _find_checkpoint(which, config, recipe)
        if checkpoint is None:
            raise UserError(f"no checkpoint for the {label} model after training it: see runs/{config.run.name}")
        raw = read_checkpoint(checkpoint)
    saved = config_from_yaml(raw["experiment_config"])
    run_id = raw.get("mlflow_run_id")
    history, wall = _training_history(client, run_id)
    return Trained(label, checkpoint, saved, run_id, model_stats(saved.model, saved.moe), history, wall)


def _find_checkpoint(which: str, config: ExperimentConfig, recipe: str) -> Path | None:
    if which and Path(which).exists():
        return Path(which)
    name = which or config.run.name or default_run_name(config, recipe)
    found = latest_checkpoint(Path(config.run.root) / name / "checkpoints")
    if found is None and not (which or config.run.name):
        # The same experiment trained from another recipe file (e.g. conf/dense.yaml): same hash.
        suffix = name.split("-", 1)[1]  # <kind>-<hash>
        for run_dir in sorted(Path(config.run.root).glob(f"*-{suffix}")):
            found = found or latest_checkpoint(run_dir / "checkpoints")
    return found


def _training_history(client: MlflowClient, run_id: str | None) -> tuple[dict, float]:
    if not run_id:
        return {}, math.nan
    run = client.get_run(run_id)
    history = {}
    for key in ("val/loss", "moe/dropped_frac", "perf/tokens_per_s"):
        last = {m.step: m.value for m in client.get_metric_history(run_id, key)}  # last value per step
        history[key] = sorted(last.items())
    wall = ((run.info.end_time or run.info.start_time) - run.info.start_time) / 1000
    return history, wall


def _sources(config: ExperimentConfig, data: TokenData) -> dict[str, np.ndarray]:
    """The held-out split, then each extra source encoded with the run's tokenizer."""
    sources = {"heldout": np.asarray(data.memmap("val"))}
    if config.eval.extra_sources:
        tokenizer = Tokenizer.from_file(str(data.tokenizer_path))
        tokenizer.encode_special_tokens = True
        eos = tokenizer.token_to_id(EOS_TOKEN)
        for source in config.eval.extra_sources:
            docs = read_documents([source], config.data.text_field)
            ids = [i for doc in docs for i in [*encode(tokenizer, doc.text), eos]]
            sources[Path(source).name or source] = np.asarray(ids, dtype=np.int64)
    for name, ids in sources.items():
        if len(ids) < config.trainer.seq_len + 1:
            raise UserError(f"eval source {name} has {len(ids)} tokens, fewer than one window of "
                            f"trainer.seq_len+1={config.trainer.seq_len + 1}: give it more text")
    return sources


def _score(trained: Trained, sources: dict[str, np.ndarray], config: ExperimentConfig) -> Evaluation:
    model = Transformer(trained.config.model, trained.config.moe)
    load_weights(trained.checkpoint, model)
    data = prepare_data(trained.config.data, progress=False)
    say(f"evaluating {trained.label}: {trained.checkpoint}")
    return evaluate(model, sources, token_byte_lengths(data.tokenizer_path), seq_len=trained.config.trainer.seq_len,
                    batch_size=config.eval.batch_size, max_windows=config.eval.max_windows or None)


def train_flops(trained: Trained) -> float:
    t = trained.config.trainer
    tokens = t.max_steps * t.accumulate * t.batch_size * t.seq_len * t.devices * trained.config.parallel.num_nodes
    return tokens * trained.stats.flops_per_token_train


def steps_to_reach(history: list[tuple[int, float]], target: float) -> int | None:
    """The first logged step whose validation loss is at or below `target`."""
    return next((step for step, loss in history if loss <= target), None)


def speedup(moe: Trained, dense: Trained) -> dict[str, float]:
    """Switch Transformer's headline: steps (and FLOPs) the MoE needs to reach the dense model's
    final validation loss, against the steps the dense model took."""
    dense_hist, moe_hist = dense.history.get("val/loss", []), moe.history.get("val/loss", [])
    if not dense_hist or not moe_hist:
        return {}
    dense_steps, target = dense_hist[-1]
    reached = steps_to_reach(moe_hist, target)
    if reached is None:
        return {"target_val_loss": target, "moe_steps_to_target": math.nan, "speedup_steps": math.nan}
    per_step = lambda t: train_flops(t) / t.config.trainer.max_steps  # noqa: E731
    return {"target_val_loss": target, "moe_steps_to_target": reached, "speedup_steps": dense_steps / reached,
            "speedup_flops": dense_steps * per_step(dense) / (reached * per_step(moe))}


def comparison_table(moe: Trained, dense: Trained, results: dict[str, Evaluation]) -> str:
    """Markdown: one column per model, one row per measure."""
    rows = [("checkpoint", lambda t, r: f"`{t.checkpoint}`")]
    for source in results["moe"].scores:
        rows += [(f"{source}: loss (nats/token)", lambda t, r, s=source: f"{r.scores[s].loss:.4f}"),
                 (f"{source}: perplexity", lambda t, r, s=source: f"{r.scores[s].ppl:.2f}"),
                 (f"{source}: bits per byte", lambda t, r, s=source: f"{r.scores[s].bits_per_byte:.4f}")]
    rows += [
        ("total parameters", lambda t, r: f"{t.stats.total_params:,}"),
        ("active parameters", lambda t, r: f"{t.stats.active_params:,}"),
        ("training FLOPs", lambda t, r: f"{train_flops(t):.3e}"),
        ("training wall time (s)", lambda t, r: f"{t.wall_seconds:.0f}"),
        ("training tokens/s", lambda t, r: _mean_last(t.history.get("perf/tokens_per_s"))),
        ("dropped fraction (eval capacity)", lambda t, r: f"{r.routing.dropped_frac_L.mean():.4f}" if r.routing else "-"),
    ]
    lines = ["| measure | MoE | dense |", "|---|---|---|"]
    lines += [f"| {name} | {fmt(moe, results['moe'])} | {fmt(dense, results['dense'])} |" for name, fmt in rows]
    gain = speedup(moe, dense)
    if gain:
        lines.append("")
        reached = gain["moe_steps_to_target"]
        target = f"The dense model's final validation loss ({gain['target_val_loss']:.4f})"
        lines.append(f"{target} was reached by the MoE at step {reached:.0f}: {gain['speedup_steps']:.2f}x fewer steps, "
                     f"{gain['speedup_flops']:.2f}x fewer training FLOPs." if not math.isnan(reached)
                     else f"{target} was not reached by the MoE in its training run.")
    return "\n".join(lines)


def _mean_last(history: list[tuple[int, float]] | None) -> str:
    return f"{np.mean([v for _, v in history[-5:]]):.0f}" if history else "-"


def _log_eval_runs(client, config, moe: Trained, dense: Trained, results, table: str, data: TokenData) -> None:
    experiment = client.get_experiment_by_name(config.tracking.experiment) or client.get_experiment(
        client.create_experiment(config.tracking.experiment))
    tokenizer = Tokenizer.from_file(str(data.tokenizer_path))
    gain = speedup(moe, dense)
    for trained in (moe, dense):
        result = results[trained.label]
        tags = {"kind": "eval", "model_kind": trained.config.model.kind.value, "training_run_id": trained.run_id or "",
                "checkpoint": str(trained.checkpoint), "mlflow.runName": f"eval-{trained.label}-{trained.config.run.name}"}
        run = client.create_run(experiment.experiment_id, tags=tags)
        metrics = _eval_metrics(trained, result, gain if trained.label == "moe" else {})
        for key, value in metrics.items():
            client.log_metric(run.info.run_id, key, value)
        with tempfile.TemporaryDirectory() as tmp:
            for path in _artifacts(Path(tmp), trained, moe, dense, result, table, tokenizer, config.eval.top_tokens):
                client.log_artifact(run.info.run_id, str(path))
        client.set_terminated(run.info.run_id)
        say(f"MLflow evaluation run {run.info.run_id} ({tags['mlflow.runName']})")


def _eval_metrics(trained: Trained, result: Evaluation, gain: dict) -> dict[str, float]:
    metrics = {}
    for source, score in result.scores.items():
        prefix = "eval" if source == "heldout" else f"eval/{source}"
        metrics.update({f"{prefix}/loss": score.loss, f"{prefix}/ppl": score.ppl, f"{prefix}/bits_per_byte": score.bits_per_byte})
    metrics.update({"params/total": trained.stats.total_params, "params/active": trained.stats.active_params,
                    "train/flops": train_flops(trained), "train/wall_seconds": trained.wall_seconds})
    if result.routing is not None:
        routing = result.routing
        for j, layer in enumerate(routing.layer_ids):
            load = routing.routed_LE[j]
            metrics[f"eval/layer_{layer}/dropped_frac"] = float(routing.dropped_frac_L[j])
            metrics[f"eval/layer_{layer}/load_max_over_mean"] = float(load.max() / max(load.mean(), 1e-9))
        metrics["eval/dropped_frac"] = float(routing.dropped_L.sum() / max(routing.assignments_L.sum(), 1))
    metrics.update({f"compare/{k}": float(v) for k, v in gain.items() if not math.isnan(float(v))})
    return metrics


def _artifacts(folder: Path, trained: Trained, moe: Trained, dense: Trained, result: Evaluation, table: str, tokenizer,
               top_k: int) -> list[Path]:
    paths = [folder / "comparison.md"]
    paths[0].write_text(table + "\n")
    curves = {t.label: t.history.get("val/loss", []) for t in (moe, dense)}
    paths.append(curves_plot({k: ([s for s, _ in h], [v for _, v in h]) for k, h in curves.items()},
                             xlabel="optimizer step", ylabel="validation loss (nats/token)",
                             title="Validation loss vs step", path=folder / "val_loss_vs_step.png"))
    flops_per_step = {t.label: train_flops(t) / t.config.trainer.max_steps for t in (moe, dense)}
    paths.append(curves_plot({k: ([s * flops_per_step[k] for s, _ in h], [v for _, v in h]) for k, h in curves.items()},
                             xlabel="training FLOPs", ylabel="validation loss (nats/token)",
                             title="Validation loss vs training compute", path=folder / "val_loss_vs_flops.png"))
    routing = result.routing
    if routing is not None:
        share = routing.routed_LE / np.maximum(routing.routed_LE.sum(axis=1, keepdims=True), 1)
        paths.append(load_heatmap(share, routing.layer_ids, folder / "expert_load_heatmap.png",
                                  title=f"Expert load on held-out text ({trained.label})"))
        dropped = trained.history.get("moe/dropped_frac", [])
        if dropped:
            paths.append(curves_plot({"dropped fraction": ([s for s, _ in dropped], [v for _, v in dropped])},
                                     xlabel="optimizer step", ylabel="share of assignments dropped",
                                     title="Dropped fraction over training", path=folder / "dropped_frac_over_training.png"))
        paths.append(_specialisation(folder, routing, tokenizer, result, top_k))
        paths.append(folder / "expert_specialisation.md")
    return paths


def _specialisation(folder: Path, routing, tokenizer, result: Evaluation, k: int) -> Path:
    """Top tokens per expert and, with several sources, each source's share of every expert."""
    table = top_tokens(routing, lambda i: tokenizer.decode([i]), k=k)
    names = list(result.scores)
    # Each source's share of what this expert computed: normalised over the sources.
    share_LES = routing.source_counts_LES / np.maximum(routing.source_counts_LES.sum(axis=2, keepdims=True), 1)
    payload = {f"layer_{layer}": {f"expert_{e}": {"top_tokens": table[layer][e],
                                                  "source_share": dict(zip(names, share_LES[j, e].round(4).tolist()))}
                                  for e in range(len(table[layer]))}
               for j, layer in enumerate(routing.layer_ids)}
    path = folder / "expert_specialisation.json"
    path.write_text(json.dumps(payload, indent=1, ensure_ascii=False))
    (folder / "expert_specialisation.md").write_text(specialisation_markdown(table, share_LES, names, routing.layer_ids))
    return path


def specialisation_markdown(table: dict, share_LES: np.ndarray, names: list[str], layer_ids: list[int]) -> str:
    """Per MoE layer: each expert's most frequent tokens and, with several sources, their shares."""
    lines = []
    for j, layer in enumerate(layer_ids):
        lines += [f"### layer {layer}", "", "| expert | top tokens (count) | " + " | ".join(names) + " |",
                  "|---|---|" + "---|" * len(names)]
        for e, tokens in enumerate(table[layer]):
            shown = ", ".join(f"`{t!r}` {n}" for t, n in tokens)
            shares = " | ".join(f"{share_LES[j, e, s]:.2f}" for s in range(len(names)))
            lines.append(f"| {e} | {shown} | {shares} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = config_parser("python -m pipelines eval", __doc__.splitlines()[0]).parse_args(argv)
    path, overrides = split_config_arg(args)
    config = load_config(path, overrides)
    if config.model.kind != ModelKind.moe:
        raise UserError("make eval compares an MoE config with its dense baseline: give an MoE config (model.kind=moe)")
    try:
        evaluate_pair(config, recipe=path or "")
    except TrainingStopped as stop:  # while training a missing run
        return stopped(stop)
    return 0
