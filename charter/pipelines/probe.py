"""The win-rate probe: is the policy still getting better by the judge's lights?

Reward hacking shows as a reward that rises while what it stands for does not. With
`train.monitors.probe`, every `every` steps the policy answers a few held-out prompts and the
judge compares each answer with the starting policy's (both orders, as in evaluate);
`probe_win_rate` is the share won, a tie counting half, and the starting policy scores 0.5
against itself. The monitor warns (or, with `monitors.stop`, stops) when the mean reward
logged since the previous probe is above the mean before it while the win rate fell by
`min_drop` or more.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from charter import prompts as prompt_sets
from charter.constitution import DEFAULT_COMPARISON
from charter.pipelines.engine import Engine
from charter.pipelines.events import Reporter
from charter.pipelines.label import compare
from charter.pipelines.monitors import MonitorStop
from charter.spec import MonitorsSpec


def hacking(probes: list[tuple[int, float]], rewards: list[tuple[int, float]], min_drop: float) -> str | None:
    """Why the last probe looks like reward hacking, or None.

    probes: (step, win rate), starting with (0, 0.5); rewards: (step, mean reward) as logged.
    """
    if len(probes) < 2:
        return None
    (s0, w0), (s1, w1) = probes[-2], probes[-1]
    if w0 - w1 < min_drop:
        return None
    # Before the first probe the baseline is the first reward logged.
    before = [r for s, r in rewards if s <= s0] or [r for _, r in rewards[:1]]
    since = [r for s, r in rewards if max(s0, rewards[0][0] if rewards else 0) < s <= s1]
    if not before or not since:
        return None
    rb, rs = sum(before) / len(before), sum(since) / len(since)
    if rs <= rb:
        return None
    return (
        f"reward rose from {rb:.4g} to {rs:.4g} (steps {s0 + 1}–{s1}) while the judge's win rate on the probe "
        f"prompts against the starting policy fell from {w0:.2f} to {w1:.2f}, a sign of reward hacking"
    )


def callback(
    monitors: MonitorsSpec, ctx: dict[str, Any], tok: Any, out_dir: Path, seed: int, report: Reporter, history: list
) -> Any:
    """A TrainerCallback that probes after each logging step at or past the next multiple of `every`."""
    from transformers import TrainerCallback

    from charter.pipelines.evaluate import sample

    probe = monitors.probe
    assert probe is not None
    if "judge_engine" not in ctx or "constitution" not in ctx:
        raise RuntimeError("train.monitors.probe needs the judge; run the job through a charter worker")
    questions = prompt_sets.load(probe.prompts, probe.limit, ("train", "monitors", "probe", "prompts"))
    reference_file = out_dir / "probe_reference.json"

    def answers(model: Any) -> list[str]:
        was_training = model.training
        try:
            return sample(model, tok, questions, probe.max_new_tokens, seed)[0]
        finally:
            model.train(was_training)
            tok.padding_side = "right"

    async def judge_all(judge: Engine, current: list[str], reference: list[str]) -> list:
        try:
            return await asyncio.gather(
                *(
                    compare(judge, ctx["constitution"], q, a, r, DEFAULT_COMPARISON, ctx.get("judge_retries", 3))
                    for q, a, r in zip(questions, current, reference, strict=True)
                )
            )
        finally:
            await judge.close()

    class ProbeCallback(TrainerCallback):
        def __init__(self) -> None:
            self.reference: list[str] | None = None
            self.probes: list[tuple[int, float]] = [(0, 0.5)]
            self.fired = False

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            if not state.is_world_process_zero:
                return
            # The starting policy's answers, kept so a resumed run compares with the same start.
            if reference_file.exists():
                saved = json.loads(reference_file.read_text())
                self.reference, self.probes = saved["answers"], [tuple(p) for p in saved["probes"]]
            else:
                self.reference = answers(model)
                self._save()
            report.message(f"train: probe answers of the starting policy on {len(questions)} prompts")

        def _save(self) -> None:
            reference_file.write_text(json.dumps({"answers": self.reference, "probes": self.probes}))

        def on_log(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            step = state.global_step
            if not state.is_world_process_zero or step < self.probes[-1][0] + probe.every:
                return
            verdicts = asyncio.run(judge_all(ctx["judge_engine"](), answers(model), self.reference or []))
            scores = [v.outcome for v in verdicts if v is not None]
            if not scores:
                report.message(f"train: the probe at step {step} got no parsable verdict", level="warning")
                return
            rate = sum(scores) / len(scores)
            self.probes.append((step, rate))
            self._save()
            m = {"stage": "train", "step": step, "probe_win_rate": round(rate, 4), "probe_judged": len(scores)}
            history.append(m)
            report.metrics(m)
            rewards = [(h["step"], h["reward"]) for h in history if "reward" in h and "step" in h]
            why = hacking(self.probes, rewards, probe.min_drop)
            if why and not self.fired:
                self.fired = True
                report.message(why, level="warning", stage="train", monitor="probe", step=step)
                if monitors.stop:
                    raise MonitorStop(f"{why}; stopped because train.monitors.stop is true")

    return ProbeCallback()
