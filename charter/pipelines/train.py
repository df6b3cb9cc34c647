"""Stage `train`: a TRL trainer per method, with LoRA (peft) or full fine-tuning.

`sft` trains on `messages` rows (prompt + final revision); `dpo` and `reward` (Bradley–Terry
sequence classifier, accuracy and margin reported on held-out pairs) on `prompt`/`chosen`/
`rejected` rows; `kto` on the same pairs unpaired (chosen desirable, rejected undesirable);
`grpo`/`rloo` on prompts with the reward sources of rewards.py; `ppo` (TRL's experimental
PPOTrainer, made resumable in ppo.py) on prompts with a `reward` job's model as reward and value model. `train.args` are TRL config keys (parsed by TRL, see trl_args.py); charter
adds its own defaults only where the user set nothing, and on a CPU trains in float32 (no
native bf16 there). Every logging step becomes a `metrics` event under stable names (loss, reward,
reward/<source>/mean|std, kl, entropy, completion_length, clip_fraction, learning_rate);
monitors warn (and optionally stop) on KL or length drift. The result is a PEFT
adapter folder (`adapter/`) or an HF model folder (`model/`), with the resolved config.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from charter import plots
from charter.models import SAFE_TOKENIZER, SAFE_WEIGHTS
from charter.pipelines import monitors, trl_args
from charter.pipelines.events import Reporter
from charter.spec import TrainSpec


def device_defaults(args: dict[str, Any]) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {}
    if "bf16" not in args and "fp16" not in args:
        out["bf16"] = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if "gradient_checkpointing" not in args and not torch.cuda.is_available():
        out["gradient_checkpointing"] = False  # memory is not the limit on a CPU; recomputing is time
    return out


def _peft(spec: TrainSpec, task_type: str) -> Any:
    if not spec.lora:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=spec.lora.r,
        lora_alpha=spec.lora.alpha,
        lora_dropout=spec.lora.dropout,
        target_modules=spec.lora.target_modules,
        task_type=task_type,
    )


def _dataset(method: str, rows: list[dict]) -> Any:
    """The columns each TRL trainer reads."""
    from datasets import Dataset

    if method == "sft":
        return Dataset.from_list([{"messages": r["messages"]} for r in rows])
    if method in ("dpo", "reward"):
        return Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    if method == "kto":  # unpaired: desirable = chosen, undesirable = rejected
        return Dataset.from_list(
            [
                {"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
                for r in rows
                for side in ("chosen", "rejected")
            ]
        )
    # grpo, rloo (ppo tokenizes its own): a row's other fields travel as one JSON column, which TRL
    # hands to reward functions as a keyword; one column keeps Arrow from typing users' fields.
    return Dataset.from_list(
        [
            {"prompt": r["prompt"], "charter_item": json.dumps({k: v for k, v in r.items() if k != "prompt"})}
            for r in rows
        ]
    )


def no_remote_code(cfg: Any) -> None:
    """TRL loads some models itself (a full-tuning reference model) with `model_init_kwargs`:
    held to the same rules as charter's own loads, whatever `train.args` asked for."""
    if hasattr(cfg, "trust_remote_code"):
        cfg.trust_remote_code = False
    for name in [n for n in vars(cfg) if n.endswith("model_init_kwargs")]:
        kwargs = getattr(cfg, name)
        kwargs = json.loads(kwargs) if isinstance(kwargs, str) else dict(kwargs or {})
        setattr(cfg, name, {**kwargs, **SAFE_WEIGHTS})


def split_heldout(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded split; at least one held-out row when the fraction is positive and rows allow."""
    import random

    idx = list(range(len(rows)))
    random.Random(seed).shuffle(idx)
    n = min(max(1, round(len(rows) * fraction)), len(rows) - 1) if fraction > 0 and len(rows) > 1 else 0
    held = set(idx[:n])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def pair_scores(model: Any, tok: Any, rows: list[dict], batch_size: int = 16) -> list[tuple[float, float]]:
    """(score of chosen, score of rejected) for each pair, with the reward model."""
    from charter.pipelines.rewards import score_texts, text

    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(rows), batch_size):
        b = rows[i : i + batch_size]
        ps = [r["prompt"] for r in b]
        sc = score_texts(model, tok, ps + ps, [text(r["chosen"]) for r in b] + [text(r["rejected"]) for r in b])
        out += list(zip(sc[: len(b)], sc[len(b) :], strict=True))
    model.train(was_training)
    return out


def train(
    spec: TrainSpec,
    rows: list[dict],
    model_path: str,
    out_dir: Path,
    seed: int,
    report: Reporter,
    callbacks: list[Any] = (),
    *,
    rewards: dict[str, Any] | None = None,
    validation: list[dict] = (),
) -> dict[str, Any]:
    """Train `spec.method` on `rows` (messages for sft; pairs for dpo/reward/kto; prompts for grpo/rloo/ppo).

    `validation` rows (the same kind) are the trainer's eval_dataset: evaluated every
    `eval_steps` (default 10) and once more at the end, logged as `eval_*` (eval_loss …).

    `rewards` carries what grpo/rloo reward sources need beyond the spec: `constitution`,
    `judge_engine` (a factory of engines), `judge_retries`, `artifact_root`.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    method = spec.method
    defaults = {
        "logging_steps": 1,
        # Checkpoints only when asked for: train.args save_steps (or save_strategy) turns them on.
        "save_strategy": "steps" if "save_steps" in spec.args else "no",
        "disable_tqdm": True,
        "seed": seed,
        "per_device_train_batch_size": 8,
        **trl_args.METHOD_DEFAULTS.get(method, {}),
        **({"eval_strategy": "steps", "eval_steps": 10} if validation else {}),
    }
    forced = {"report_to": "none", **device_defaults(spec.args)}
    args = {**{k: v for k, v in defaults.items() if k not in spec.args}, **spec.args, **forced}
    heldout: list[dict] = []
    if method == "reward":
        rows, heldout = split_heldout(rows, spec.heldout_fraction, seed)
    funcs: list[Any] = []
    if method in ("grpo", "rloo"):
        from charter.pipelines import rewards as R

        funcs, weights = R.build(spec.rewards, **(rewards or {}))
        args["reward_weights"] = weights
    cfg = trl_args.build(method, {k: v for k, v in args.items() if k != "output_dir"}, str(out_dir / "checkpoints"), {})
    no_remote_code(cfg)

    tok = AutoTokenizer.from_pretrained(model_path, **SAFE_TOKENIZER)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    history: list[dict] = []
    cbs = [monitors.callback(report, spec.monitors, history), *callbacks]
    if spec.monitors.probe:
        from charter.pipelines import probe

        cbs.insert(1, probe.callback(spec.monitors, rewards or {}, tok, out_dir, seed, report, history))
    if method == "ppo":
        from charter.pipelines import ppo

        trainer = ppo.trainer(spec, cfg, rows, model_path, tok, dtype, cbs, rewards or {})
    elif method == "reward":
        from trl import RewardTrainer

        model = AutoModelForSequenceClassification.from_pretrained(
            model_path, num_labels=1, dtype=dtype, **SAFE_WEIGHTS
        )
        model.config.pad_token_id = tok.pad_token_id
        trainer = RewardTrainer(
            model=model,
            args=cfg,
            train_dataset=_dataset(method, rows),
            eval_dataset=_dataset(method, list(validation)) if validation else None,
            processing_class=tok,
            peft_config=_peft(spec, "SEQ_CLS"),
            callbacks=cbs,
        )
    else:
        import trl

        # By name: touching a class in trl's lazy module imports its trainer (GRPO's brings vLLM's client).
        cls = getattr(
            trl,
            {
                "sft": "SFTTrainer",
                "dpo": "DPOTrainer",
                "kto": "KTOTrainer",
                "grpo": "GRPOTrainer",
                "rloo": "RLOOTrainer",
            }[method],
        )
        extra = {"reward_funcs": funcs} if method in ("grpo", "rloo") else {}
        trainer = cls(
            model=AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, **SAFE_WEIGHTS),
            args=cfg,
            train_dataset=_dataset(method, rows),
            eval_dataset=_dataset(method, list(validation)) if validation else None,
            processing_class=tok,
            peft_config=_peft(spec, "CAUSAL_LM"),
            callbacks=cbs,
            **extra,
        )
    report.started(
        "train",
        # PPO counts its updates itself (num_total_batches); the others know theirs once train() starts
        total=trainer.args.max_steps
        if trainer.args.max_steps > 0
        else getattr(trainer.args, "num_total_batches", None),
        method=method,
        lora=bool(spec.lora),
        rows=len(rows),
    )
    ckpt_dir = out_dir / "checkpoints"
    atomic_checkpoints(trainer, ckpt_dir)
    last = last_checkpoint(ckpt_dir)
    if last:
        report.message(f"train: resuming from {last.name}", step=int(last.name.rsplit("-", 1)[1]))
    result = trainer.train(resume_from_checkpoint=str(last)) if last else trainer.train()
    evaluated = [h["step"] for h in trainer.state.log_history if "eval_loss" in h or "eval_reward" in h]
    if validation and (not evaluated or evaluated[-1] != trainer.state.global_step):
        trainer.evaluate()  # the final model's validation metrics, whatever eval_steps was

    final = out_dir / ("adapter" if spec.lora else "model")
    trainer.save_model(str(final))  # every rank: DeepSpeed/FSDP gather the weights; only rank 0 writes
    # The whole run's metrics, a resumed run's earlier steps included (they come back with the checkpoint).
    history = [{"step": h.get("step"), **monitors.normalize(h)} for h in trainer.state.log_history]
    if (probed := out_dir / "probe_reference.json").exists():  # the win-rate probe's points, a resume's included
        history += [{"step": s, "probe_win_rate": w} for s, w in json.loads(probed.read_text())["probes"][1:]]
        history.sort(key=lambda h: h["step"] or 0)
    if trainer.accelerator.is_main_process:
        if not (final / "tokenizer_config.json").exists():  # TRL's trainers save it with the model already
            tok.save_pretrained(final)
        (out_dir / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=2))
        (out_dir / "metrics.json").write_text(json.dumps(history, indent=2))
        (final / "charter_train_config.json").write_text(
            json.dumps(
                {
                    "method": method,
                    "base_model": model_path,
                    "lora": spec.lora.model_dump() if spec.lora else None,
                    "rewards": [r.model_dump(mode="json") for r in spec.rewards] or None,
                    "trl_config": json.loads(cfg.to_json_string()),
                },
                indent=2,
                default=str,
            )
        )
        plots.plot_curve(history, out_dir / "curve.png", method)
    losses = [h["loss"] for h in history if "loss" in h]
    info = {
        "kind": "adapter" if spec.lora else "model",
        "method": method,
        "path": str(final),
        "steps": trainer.state.global_step,
        "train_loss": getattr(result, "training_loss", None),
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "rows": len(rows),
    }
    rewards_logged = [h["reward"] for h in history if "reward" in h]
    if rewards_logged and method in ("grpo", "rloo", "ppo"):
        info.update(first_reward=rewards_logged[0], final_reward=rewards_logged[-1])
    if method == "reward":
        scores = pair_scores(trainer.model, tok, heldout) if heldout else []
        info["heldout"] = {
            "pairs": len(scores),
            "accuracy": sum(c > r for c, r in scores) / len(scores) if scores else None,
            "mean_margin": sum(c - r for c, r in scores) / len(scores) if scores else None,
        }
        report.metrics(
            {
                "stage": report.stage or "train",
                "step": trainer.state.global_step,
                **{f"heldout_{k}": v for k, v in info["heldout"].items()},
            }
        )
    return info


def merge_adapter(trained: dict[str, Any], base_path: str, out: Path) -> str:
    """A full model folder (safetensors) for a trained policy: its LoRA adapter merged into its
    base, or the model folder itself after full fine-tuning. The recipe's next step starts from it,
    since adapters trained on different bases do not stack."""
    if trained["kind"] == "model":
        return trained["path"]
    import shutil

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, **SAFE_WEIGHTS)
    merged = PeftModel.from_pretrained(model, trained["path"]).merge_and_unload()
    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # what a killed attempt left half-written
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    merged.save_pretrained(str(tmp), safe_serialization=True)
    AutoTokenizer.from_pretrained(trained["path"], **SAFE_TOKENIZER).save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return str(out)


def last_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint: only complete ones carry the name `checkpoint-N`."""
    found = [(int(p.name.rsplit("-", 1)[1]), p) for p in ckpt_dir.glob("checkpoint-*") if p.name[11:].isdigit()]
    return max(found)[1] if found else None


def atomic_checkpoints(trainer: Any, ckpt_dir: Path) -> None:
    """Make each checkpoint appear whole or not at all.

    transformers writes `checkpoint-N` in place, so a process killed mid-save leaves a partial
    folder that a resume would trust. Here the trainer writes into `.staging/` and the finished
    folder is renamed into `checkpoints/` (one rename, atomic on one filesystem); a stale
    staging folder from a killed save is cleared first. save_total_limit is applied after.

    Under several processes every rank writes into the staged folder (its own rng state,
    DeepSpeed/FSDP shards), so all ranks meet at a barrier before rank 0 alone renames, and
    again after, so no rank saves or resumes while the folder is moving.
    """
    import shutil

    acc = trainer.accelerator
    staging = ckpt_dir / ".staging"
    if acc.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    acc.wait_for_everyone()
    original = trainer._save_checkpoint

    def save(model: Any, trial: Any) -> None:
        trainer.args.output_dir = str(staging)
        try:
            original(model, trial)
        finally:
            trainer.args.output_dir = str(ckpt_dir)
        acc.wait_for_everyone()  # every rank has written its part
        if acc.is_main_process:
            _publish(staging, ckpt_dir, trainer.args.save_total_limit)
        acc.wait_for_everyone()  # the checkpoint has its final name

    trainer._save_checkpoint = save


def _publish(staging: Path, ckpt_dir: Path, limit: int | None) -> None:
    """Rename finished checkpoints out of `.staging/`, then keep the newest `limit`."""
    import shutil

    for d in sorted(staging.glob("checkpoint-*")):
        target = ckpt_dir / d.name
        if target.exists():
            shutil.rmtree(target)
        os.replace(d, target)
    done = sorted(ckpt_dir.glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
    for old in done[:-limit] if limit else []:
        shutil.rmtree(old, ignore_errors=True)
