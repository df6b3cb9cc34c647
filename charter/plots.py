"""The training curve as a PNG: loss, reward (total and per source), KL and completion length.

Drawn from charter's stable metric names (see pipelines/monitors.py), so the job's `curve.png`
artifact and the API's live `GET /v1/jobs/{id}/plot.png` are one drawing. matplotlib only:
the API draws it too, and the API imports no torch.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any


def plot_curve(history: list[dict[str, Any]], path: Path | io.BytesIO, method: str) -> None:
    """Loss, reward (total and per source), KL and completion length over steps — whichever
    the method logged (DPO: reward accuracy and margin; reward models: accuracy) — as a PNG."""
    # A bare Figure renders with Agg without pyplot's global state (thread-safe in the API)
    # and without importing pyplot and its backends, which cost a job about a second.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    panels = [
        ("loss", ["loss"]),
        (
            "reward",
            ["reward"] + sorted({k for h in history for k in h if k.startswith("reward/") and k.endswith("/mean")}),
        ),
        ("KL to the reference", ["kl"]),
        ("mean completion length", ["completion_length"]),
        ("probe win rate vs the start", ["probe_win_rate"]),
        ("reward accuracy", ["rewards/accuracies", "accuracy"]),
        ("reward margin", ["rewards/margins", "margin"]),
    ]
    present = [(t, [k for k in keys if any(k in h for h in history)]) for t, keys in panels]
    present = [(t, keys) for t, keys in present if keys]
    n = max(len(present), 1)
    fig = Figure(figsize=(4.5 * n, 3.5))
    axes = fig.subplots(1, n, squeeze=False)
    for ax, (title, keys) in zip(axes[0], present, strict=False):
        for key in keys:
            pts = [(h["step"], h[key]) for h in history if key in h and "step" in h]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
        if len(keys) > 1:
            ax.legend(fontsize=7)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        ax.set_title(title)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{method} training")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
