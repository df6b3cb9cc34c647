"""Stage `train`: a TRL trainer per method, with LoRA (peft) or full fine-tuning.

`sft` trains on `messages` rows (prompt + final revision); `dpo` and `reward` (Bradley–Terry
sequence classifier, accuracy and margin reported on held-out pairs) on `prompt`/`chosen`/
`rejected` rows; `kto` on the same pairs unpaired (chosen desirable, rejected undesirable);
`grpo`/`rloo` on prompts with the reward sources of rewards.py; `ppo` (TRL's experimental
PPOTrainer) on prompts with a `reward` job's model as reward and value model. `train.args` are TRL config keys (parsed by TRL, see trl_args.py); charter
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
    return Dataset.from_list([{"prompt": r["prompt"]} for r in rows])  # grpo, rloo (ppo tokenizes its own)


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
) -> dict[str, Any]:
    """Train `spec.method` on `rows` (messages for sft; pairs for dpo/reward/kto; prompts for grpo/rloo/ppo).

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

    tok = AutoTokenizer.from_pretrained(model_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    history: list[dict] = []
    cbs = [monitors.callback(report, spec.monitors, history), *callbacks]
    if method == "ppo":
        trainer = _ppo_trainer(spec, cfg, rows, model_path, tok, dtype, cbs, rewards or {})
    elif method == "reward":
        from trl import RewardTrainer

        model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1, dtype=dtype)
        model.config.pad_token_id = tok.pad_token_id
        trainer = RewardTrainer(
            model=model,
            args=cfg,
            train_dataset=_dataset(method, rows),
            processing_class=tok,
            peft_config=_peft(spec, "SEQ_CLS"),
            callbacks=cbs,
        )
    else:
        import trl

        cls = {
            "sft": trl.SFTTrainer,
            "dpo": trl.DPOTrainer,
            "kto": trl.KTOTrainer,
            "grpo": trl.GRPOTrainer,
            "rloo": trl.RLOOTrainer,
        }[method]
        extra = {"reward_funcs": funcs} if method in ("grpo", "rloo") else {}
        trainer = cls(
            model=AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype),
            args=cfg,
            train_dataset=_dataset(method, rows),
            processing_class=tok,
            peft_config=_peft(spec, "CAUSAL_LM"),
            callbacks=cbs,
            **extra,
        )
    report.started(
        "train",
        total=trainer.args.max_steps if trainer.args.max_steps > 0 else None,
        method=method,
        lora=bool(spec.lora),
        rows=len(rows),
    )
    ckpt_dir = out_dir / "checkpoints"
    atomic_checkpoints(trainer, ckpt_dir)
    last = last_checkpoint(ckpt_dir)
    if last and method == "ppo":
        # TRL's PPOTrainer.train() takes no resume_from_checkpoint: it cannot pick up its optimizer or step.
        report.message(f"train: ppo cannot resume from {last.name} (TRL has no PPO resume); starting from step 0")
        last = None
    if last:
        report.message(f"train: resuming from {last.name}", step=int(last.name.rsplit("-", 1)[1]))
    result = trainer.train(resume_from_checkpoint=str(last)) if last else trainer.train()

    final = out_dir / ("adapter" if spec.lora else "model")
    trainer.save_model(str(final))
    tok.save_pretrained(final)
    (out_dir / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=2))
    # The whole run's metrics, a resumed run's earlier steps included (they come back with the checkpoint).
    history = [{"step": h.get("step"), **monitors.normalize(h)} for h in trainer.state.log_history]
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
    monitors.plot_curve(history, out_dir / "curve.png", method)
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
                "stage": "train",
                "step": trainer.state.global_step,
                **{f"heldout_{k}": v for k, v in info["heldout"].items()},
            }
        )
    return info


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
    """
    import shutil

    staging = ckpt_dir / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    original = trainer._save_checkpoint

    def save(model: Any, trial: Any) -> None:
        trainer.args.output_dir = str(staging)
        try:
            original(model, trial)
        finally:
            trainer.args.output_dir = str(ckpt_dir)
        for d in sorted(staging.glob("checkpoint-*")):
            target = ckpt_dir / d.name
            if target.exists():
                shutil.rmtree(target)
            os.replace(d, target)
        limit = trainer.args.save_total_limit
        done = sorted(ckpt_dir.glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
        for old in done[:-limit] if limit else []:
            shutil.rmtree(old, ignore_errors=True)

    trainer._save_checkpoint = save


def _ppo_trainer(
    spec: TrainSpec, cfg: Any, rows: list[dict], model_path: str, tok: Any, dtype: Any, cbs: list, ctx: dict
) -> Any:
    """PPO: policy (+LoRA or full), reference (the base; implicit with LoRA), reward model from a
    `reward` job, value model initialised from that reward model (TRL's own example does the same)."""
    import copy

    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl.experimental.ppo import PPOTrainer

    from charter.pipelines.rewards import load_reward_model, resolve_reward_model

    rm_path = resolve_reward_model(spec.reward_model, ctx.get("artifact_root"))
    reward_model, rm_tok = load_reward_model(rm_path, dtype)
    if rm_tok.get_vocab() != tok.get_vocab():
        raise ValueError(
            f"train.reward_model: {rm_path} uses a different tokenizer from the policy {model_path}; "
            "PPO scores the policy's tokens directly, so train the reward model from the same base model"
        )
    value_model = copy.deepcopy(reward_model).train()
    policy = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    ref = None if spec.lora else AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    chats = [tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False) for r in rows]
    ids = [tok(c, add_special_tokens=False)["input_ids"] for c in chats]
    dataset = Dataset.from_list([{"input_ids": x} for x in ids])
    return PPOTrainer(
        args=cfg,
        processing_class=tok,
        model=policy,
        ref_model=ref,
        reward_model=reward_model,
        value_model=value_model,
        train_dataset=dataset,
        callbacks=cbs,
        peft_config=_peft(spec, "CAUSAL_LM"),
    )
