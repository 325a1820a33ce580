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
