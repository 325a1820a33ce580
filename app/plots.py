"""Plots logged as MLflow artifacts (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def expert_load_plot(history: list[tuple[int, list[list[float]]]], layer_ids: list[int], path: Path) -> Path:
    """One heatmap per MoE layer: share of routed tokens per expert (rows) over training steps.

    A balanced layer is a flat colour at 1/E; a collapsing one shows a bright stripe.
    """
    steps = [step for step, _ in history]
    share_SLE = np.asarray([loads for _, loads in history])  # (steps, layers, experts)
    num_experts = share_SLE.shape[2]
    fig, axes = plt.subplots(len(layer_ids), 1, figsize=(9, 1.1 + 1.6 * len(layer_ids)), squeeze=False, sharex=True)
    for j, (ax, layer) in enumerate(zip(axes[:, 0], layer_ids)):
        image = ax.imshow(share_SLE[:, j, :].T, aspect="auto", origin="lower", cmap="viridis", vmin=0.0,
                          vmax=max(2.0 / num_experts, float(share_SLE.max())),
                          extent=(steps[0], steps[-1] if len(steps) > 1 else steps[0] + 1, -0.5, num_experts - 0.5))
        ax.set_ylabel(f"layer {layer}\nexpert")
        fig.colorbar(image, ax=ax, label="share of tokens")
    axes[-1, 0].set_xlabel("optimizer step")
    fig.suptitle(f"Expert load per MoE layer (uniform = {1 / num_experts:.3f})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def curves_plot(curves: dict[str, tuple[list[float], list[float]]], *, xlabel: str, ylabel: str, title: str,
                path: Path, hline: tuple[str, float] | None = None) -> Path:
    """One line per name: (x values, y values)."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, (xs, ys) in curves.items():
        ax.plot(xs, ys, marker="o", markersize=3, label=name)
    if hline is not None:
        ax.axhline(hline[1], color="grey", linestyle="--", linewidth=1, label=hline[0])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def load_heatmap(share_LE: np.ndarray, layer_ids: list[int], path: Path, *, title: str) -> Path:
    """Share of assignments per expert (columns) for each MoE layer (rows), annotated."""
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * share_LE.shape[1], 1.0 + 0.5 * share_LE.shape[0]))
    image = ax.imshow(share_LE, cmap="viridis", vmin=0.0, aspect="auto")
    for (j, e), value in np.ndenumerate(share_LE):
        ax.text(e, j, f"{value:.2f}", ha="center", va="center", color="white", fontsize=7)
    ax.set_yticks(range(len(layer_ids)), [f"layer {i}" for i in layer_ids])
    ax.set_xticks(range(share_LE.shape[1]), [str(e) for e in range(share_LE.shape[1])])
    ax.set_xlabel("expert")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="share of assignments")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
