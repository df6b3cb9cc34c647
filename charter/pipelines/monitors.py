"""What training looks like from outside: stable metric names, reward-hacking monitors, the plot.

Each trainer logs under its own keys (GRPO `completions/mean_length`, PPO `objective/kl`, …);
`normalize` maps them to one vocabulary so events, plots and monitors read the same names for
every method. Monitors warn once per kind, and with `train.monitors.stop` end the run.
"""

from __future__ import annotations

import math
from typing import Any

from charter.pipelines.events import Reporter
from charter.spec import MonitorsSpec

# TRL's log keys → charter's stable metric names (first present wins). Per-source rewards
# (`rewards/<name>/mean|std`, GRPO/RLOO) become `reward/<name>/mean|std`.
METRIC_NAMES = {
    "loss": ("loss", "loss/policy_avg"),  # PPO: the policy's clipped loss (its value loss stays loss/value_avg)
    "reward": ("reward", "objective/scores"),
    "reward_std": ("reward_std",),
    "kl": ("kl", "objective/kl"),
    "entropy": ("entropy", "objective/entropy", "policy/entropy_avg"),
    "completion_length": ("completions/mean_length",),
    "clip_fraction": ("clip_ratio/region_mean", "policy/clipfrac_avg", "clip_ratio"),
    "learning_rate": ("learning_rate", "lr"),
}


def normalize(logs: dict[str, Any]) -> dict[str, Any]:
    """A trainer's log line → charter's stable names, with every other finite number kept as TRL named it."""
    logs = {k: v for k, v in logs.items() if isinstance(v, int | float) and math.isfinite(v)}
    out: dict[str, Any] = {}
    used: set[str] = set()
    for name, keys in METRIC_NAMES.items():
        for k in keys:
            if k in logs:
                out[name] = logs[k]
                used.add(k)
                break
    for k, v in logs.items():
        if k.startswith("rewards/") and k.endswith(("/mean", "/std")) and k.count("/") == 2:
            out["reward/" + k.removeprefix("rewards/")] = v
        elif k not in used:
            out[k] = v
    return out


class MonitorStop(RuntimeError):
    """A monitor fired with train.monitors.stop: true; the job stops here."""


def callback(report: Reporter, monitors: MonitorsSpec, history: list[dict]) -> Any:
    from transformers import TrainerCallback

    class EventCallback(TrainerCallback):
        """Training logs → `metrics` events (stable names); steps → progress; monitors → warnings."""

        def __init__(self) -> None:
            self.first_length: float | None = None
            self.fired: set[str] = set()

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
            m = normalize(logs or {})
            m = {"stage": report.stage or "train", "step": state.global_step, "epoch": state.epoch, **m}
            history.append(m)
            report.metrics(m)
            if shown := {k: m[k] for k in ("loss", "reward") if k in m}:
                total = state.max_steps if state.max_steps and state.max_steps > 0 else None
                report.progress(state.global_step, total, force=True, unit="steps", **shown)
            for name, msg in self.check(m):
                if name in self.fired:
                    continue
                self.fired.add(name)
                report.message(
                    msg, level="warning", stage=report.stage or "train", monitor=name, step=state.global_step
                )
                if monitors.stop:
                    raise MonitorStop(f"{msg}; stopped because train.monitors.stop is true")

        def check(self, m: dict[str, Any]) -> list[tuple[str, str]]:
            out = []
            if monitors.max_kl is not None and m.get("kl", 0.0) > monitors.max_kl:
                out.append(("max_kl", f"KL to the reference {m['kl']:.4g} exceeds max_kl {monitors.max_kl:g}"))
            length = m.get("completion_length")
            if length is not None and monitors.max_length_factor is not None:
                if self.first_length is None:
                    self.first_length = max(length, 1e-9)
                f = monitors.max_length_factor
                if not self.first_length / f <= length <= self.first_length * f:
                    out.append(
                        (
                            "max_length_factor",
                            f"mean completion length {length:.1f} drifted past {f:g}x its start "
                            f"({self.first_length:.1f}), a sign of reward hacking",
                        )
                    )
            return out

    return EventCallback()
