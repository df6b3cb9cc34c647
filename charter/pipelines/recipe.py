"""`recipe: constitutional-ai`: the Constitutional-AI pipeline as one job.

    generate → critique.rN → revise.rN → sl.sft                          SL-CAI
    rl.k1.sample → rl.k1.label → rl.k1.reward → rl.k1.train              RL-CAI round 1, from the SFT policy
    …                                                                    round k, from round k-1's policy
    evaluate                                                             the final policy vs the base and vs SFT

`rl.kK.reward` (a reward model on that round's judge labels, trained from the round's policy)
runs for ppo and grpo; dpo trains on the labelled pairs directly. Every step is a stage with
its own manifest, so a job picked up again resumes after the last finished one.

A trained step is a LoRA adapter on the model it started from (or a full model without
`train.lora`). Adapters trained on different bases do not stack, so each trained step also
writes `<stage>/merged/` (the adapter merged in, safetensors) and the next step starts from
that folder. Samples come from HF `generate` on it (evaluate.answers): the worker's vLLM
server serves the original base only.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from charter import constitution as constitutions
from charter import prompts
from charter.errors import SpecError
from charter.pipelines.artifacts import Workdir, write_atomic
from charter.pipelines.engine import Engine
from charter.pipelines.evaluate import answers, evaluate
from charter.pipelines.events import Reporter
from charter.pipelines.label import label
from charter.pipelines.revise import sft_rows as revised_sft_rows
from charter.pipelines.train import merge_adapter, train
from charter.spec import JobSpec, RewardModelSource, TrainSpec, recipe_errors

TRAIN_KEYS = ("steps", "train_loss", "first_loss", "final_loss", "first_reward", "final_reward", "heldout")


def run_recipe(
    spec: JobSpec,
    wd: Workdir,
    revised_rows: Callable[[], tuple[list[dict], str]],
    ctx: dict[str, Any],
    base_path: str,
    report: Reporter,
) -> dict[str, Any]:
    """SL-CAI, `spec.rl_rounds` rounds of RL-CAI, evaluation; returns the job's {report, artifacts}.

    `ctx` is run.reward_context: the constitution, the judge's engine factory, its retries and
    ARTIFACT_ROOT, which the stages here and the rounds' reward sources share."""
    if errors := recipe_errors(spec):
        raise SpecError(errors)
    seed, method = spec.data.seed, spec.train.method
    c: constitutions.Constitution = ctx["constitution"]
    judge: Callable[[], Engine] = ctx["judge_engine"]

    def step(name: str, kind: str, fn: Callable[[Reporter], tuple[list[dict], dict]], parents: list[str]) -> list:
        """A data stage under its full name (`rl.k1.label`); skipped when its manifest exists."""
        r = report.as_stage(name)
        if wd.done(name):
            r.skipped(name)
            return wd.rows(name)
        rows, counts = fn(r)
        m = wd.finish(name, kind, rows, parents, counts)
        r.done(name, rows=m["rows"], **{k: v for k, v in counts.items() if k != "rows"})
        return rows

    def trained(name: str, parents: list[str], rows: list[dict], tspec: TrainSpec, start: str) -> dict[str, Any]:
        """A training stage: train `tspec` from the model folder `start`, then merge for the next step."""
        r = report.as_stage(name)
        if wd.done(name):
            r.skipped(name)
            return wd.manifest(name)["result"]
        out = wd.stage_dir(name)
        info = train(tspec, rows, start, out, seed, r, rewards=ctx)
        info["base"] = start
        if tspec.method != "reward":
            info["merged"] = merge_adapter(info, start, out / "merged")
        keep = rows if tspec.method == "sft" else None  # the SFT data; RL rows are the label stage's
        wd.finish(name, info["kind"], keep, parents, {"steps": info["steps"], "rows": info["rows"]}, {"result": info})
        r.done(name, **{k: info[k] for k in ("steps", "train_loss", "final_loss") if k in info})
        return info

    # SL-CAI: the final revisions are the SFT data
    revised, parent = revised_rows()
    sft_rows = revised_sft_rows(revised)
    if not sft_rows:
        raise RuntimeError("no revisions to fine-tune on: every revision came back empty; raise judge.max_tokens")
    sft_spec = TrainSpec(method="sft", lora=spec.train.lora, args=spec.sft.args if spec.sft else {})
    sft = trained("sl.sft", [parent], sft_rows, sft_spec, base_path)

    # RL-CAI, each round from the newest policy
    assert spec.prompts is not None
    ps = prompts.load(spec.prompts.source, spec.prompts.limit)
    policy, rounds, last = sft["merged"], [], sft
    for k in range(1, spec.rl_rounds + 1):
        rl = f"rl.k{k}"
        sampled = step(
            f"{rl}.sample", "samples", lambda r, p=policy, k=k: _sample(p, ps, spec, seed + k, r), [last_stage(k)]
        )
        pairs = step(
            f"{rl}.label",
            "preferences",
            lambda r, rows=sampled: label(judge(), c, rows, spec.data, spec.judge, r),
            [f"{rl}.sample"],
        )
        if not pairs:
            raise RuntimeError(
                f"round {k}: no preference pairs: label counts {wd.manifest(f'{rl}.label')['counts']}; "
                "raise prompts.limit or use disagreement: keep"
            )
        round_info: dict[str, Any] = {"round": k, "policy": policy, **_label_counts(wd.manifest(f"{rl}.label"))}
        rl_spec, rl_rows, parents = spec.train, pairs, [f"{rl}.label"]
        if method in ("ppo", "grpo"):
            rm_spec = TrainSpec(
                method="reward",
                lora=spec.train.lora,
                args=spec.reward.args if spec.reward else {},
                heldout_fraction=spec.train.heldout_fraction,
            )
            rm = trained(f"{rl}.reward", [f"{rl}.label"], pairs, rm_spec, policy)
            round_info["reward"] = {key: rm.get(key) for key in ("path", "steps", "final_loss", "heldout")}
            if method == "ppo":
                rl_spec = spec.train.model_copy(update={"reward_model": rm["path"]})
            else:  # the round's reward model, beside any sources the spec lists
                src = RewardModelSource(type="reward_model", model=rm["path"], name="reward_model")
                rl_spec = spec.train.model_copy(update={"rewards": [src, *spec.train.rewards]})
            rl_rows, parents = [{"prompt": p} for p in ps], [f"{rl}.reward"]
        last = trained(f"{rl}.train", parents, rl_rows, rl_spec, policy)
        round_info["train"] = {key: last[key] for key in TRAIN_KEYS if key in last}
        rounds.append(round_info)
        policy = last["merged"]

    # evaluate: the final policy against the base it all started from, and against the SFT policy
    assert spec.evaluate is not None
    final_name = f"rl.k{spec.rl_rounds}.train"
    if wd.done("evaluate"):
        report.skipped("evaluate")
    else:
        ev_prompts = prompts.load(spec.evaluate.prompts, spec.evaluate.limit, ("evaluate", "prompts"))
        ev_rows, summary = evaluate(
            judge(),
            c,
            ev_prompts,
            (last["base"], last),
            {"base": (base_path, None), "sft": (sft["merged"], None)},
            spec.evaluate,
            spec.judge,
            seed,
            report,
        )
        wd.finish("evaluate", "evaluation", ev_rows, [final_name, "sl.sft"], summary)
        vs = summary["versus"]
        report.done("evaluate", win_rate=vs["base"]["win_rate"], win_rate_vs_sft=vs["sft"]["win_rate"])

    report_json = {
        "job": spec.name,
        "recipe": spec.recipe,
        "method": method,
        "rounds": len(rounds),
        "sft": {"rows": len(sft_rows), **{k: sft[k] for k in TRAIN_KEYS if k in sft}},
        "rl": rounds,
        "train": rounds[-1]["train"],
        **wd.manifest("evaluate")["counts"],
    }
    write_atomic(wd.root / "report.json", json.dumps(report_json, indent=2))
    final = wd.root / final_name
    artifacts = {
        "sft_jsonl": str(wd.root / "sl.sft" / "rows.jsonl"),
        "sft_model": sft["merged"],
        "pairs_jsonl": str(wd.root / f"rl.k{spec.rl_rounds}.label" / "rows.jsonl"),
        **({"reward_model": rounds[-1]["reward"]["path"]} if "reward" in rounds[-1] else {}),
        last["kind"]: last["path"],
        "merged_model": last["merged"],
        "plot": str(final / "curve.png"),
        "metrics": str(final / "metrics.json"),
        "report": str(wd.root / "report.json"),
    }
    for name, path in artifacts.items():
        report.artifact(name, path, kind=name)
    return {"report": report_json, "artifacts": artifacts}


def last_stage(k: int) -> str:
    """The stage whose policy round k samples from."""
    return "sl.sft" if k == 1 else f"rl.k{k - 1}.train"


def _sample(
    model_dir: str, ps: list[list[dict]], spec: JobSpec, seed: int, report: Reporter
) -> tuple[list[dict], dict]:
    """`samples_per_prompt` answers per prompt from the policy folder, as `generate` writes them."""
    n = spec.data.samples_per_prompt
    repeated = [p for p in ps for _ in range(n)]
    report.started("sample", total=len(repeated), model=model_dir)
    texts, lengths = answers(
        {"policy": (model_dir, None)}, repeated, spec.data.max_new_tokens, seed, report, spec.data.temperature
    )["policy"]
    rows = [
        {"id": f"p{i // n}-s{i % n}", "prompt_index": i // n, "sample": i % n, "prompt": p, "response": t}
        for i, (p, t) in enumerate(zip(repeated, texts, strict=True))
    ]
    empty = sum(not t for t in texts)
    return rows, {"prompts": len(ps), "samples": len(rows), "empty": empty, "completion_tokens": sum(lengths)}


def _label_counts(manifest: dict[str, Any]) -> dict[str, Any]:
    counts = manifest["counts"]
    return {"pairs": counts.get("pairs"), "position_agreement": counts.get("position_agreement")}
