"""Stage `train`: TRL's SFTTrainer or DPOTrainer, with LoRA (peft) or full fine-tuning.

`sft` trains on `messages` rows (prompt + final revision); `dpo` on `prompt`/`chosen`/
`rejected` rows. `train.args` are TRL config keys (parsed by TRL, see trl_args.py); charter
adds its own defaults only where the user set nothing, and on a CPU trains in float32 (no
native bf16 there). Every logging step becomes a `metrics` event. The result is a PEFT
adapter folder (`adapter/`) or an HF model folder (`model/`), with the resolved config.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from charter.pipelines import trl_args
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


def _callback(report: Reporter) -> Any:
    from transformers import TrainerCallback

    class EventCallback(TrainerCallback):
        """Training logs → `metrics` events; steps → `train` progress."""

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
            logs = {k: v for k, v in (logs or {}).items() if isinstance(v, int | float) and math.isfinite(v)}
            report.metrics({"stage": "train", "step": state.global_step, "epoch": state.epoch, **logs})
            if "loss" in logs:
                report.progress(state.global_step, state.max_steps, force=True, loss=logs["loss"])

    return EventCallback()


def train(
    spec: TrainSpec,
    rows: list[dict],
    model_path: str,
    out_dir: Path,
    seed: int,
    report: Reporter,
    callbacks: list[Any] = (),
) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    defaults = {
        "logging_steps": 1,
        "save_strategy": "no",
        "disable_tqdm": True,
        "seed": seed,
        "per_device_train_batch_size": 8,
    }
    forced = {"report_to": "none", **device_defaults(spec.args)}
    args = {**{k: v for k, v in defaults.items() if k not in spec.args}, **spec.args, **forced}
    cfg = trl_args.build(
        spec.method, {k: v for k, v in args.items() if k != "output_dir"}, str(out_dir / "checkpoints"), {}
    )

    columns = ["messages"] if spec.method == "sft" else ["prompt", "chosen", "rejected"]
    dataset = Dataset.from_list([{k: r[k] for k in columns} for r in rows])
    tok = AutoTokenizer.from_pretrained(model_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    peft_config = None
    if spec.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=spec.lora.r,
            lora_alpha=spec.lora.alpha,
            lora_dropout=spec.lora.dropout,
            target_modules=spec.lora.target_modules,
            task_type="CAUSAL_LM",
        )
    if spec.method == "sft":
        from trl import SFTTrainer as Trainer
    else:
        from trl import DPOTrainer as Trainer
    trainer = Trainer(
        model=model,
        args=cfg,
        train_dataset=dataset,
        processing_class=tok,
        peft_config=peft_config,
        callbacks=[_callback(report), *callbacks],
    )
    report.started(
        "train",
        total=trainer.args.max_steps if trainer.args.max_steps > 0 else None,
        method=spec.method,
        lora=bool(spec.lora),
        rows=len(rows),
    )
    result = trainer.train()

    final = out_dir / ("adapter" if spec.lora else "model")
    trainer.save_model(str(final))
    tok.save_pretrained(final)
    history = trainer.state.log_history
    (out_dir / "log_history.json").write_text(json.dumps(history, indent=2))
    (final / "charter_train_config.json").write_text(
        json.dumps(
            {
                "method": spec.method,
                "base_model": model_path,
                "lora": spec.lora.model_dump() if spec.lora else None,
                "trl_config": json.loads(cfg.to_json_string()),
            },
            indent=2,
            default=str,
        )
    )
    plot_curve(history, out_dir / "curve.png", spec.method)
    losses = [h["loss"] for h in history if "loss" in h]
    return {
        "kind": "adapter" if spec.lora else "model",
        "path": str(final),
        "steps": trainer.state.global_step,
        "train_loss": result.training_loss,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "rows": len(rows),
    }


def plot_curve(history: list[dict], path: Path, method: str) -> None:
    """Loss (and DPO's reward accuracy and margin, when logged) over steps, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [("loss", "loss"), ("rewards/accuracies", "reward accuracy"), ("rewards/margins", "reward margin")]
    present = [(k, label) for k, label in series if any(k in h for h in history)]
    fig, axes = plt.subplots(1, max(len(present), 1), figsize=(4.5 * max(len(present), 1), 3.5), squeeze=False)
    for ax, (key, label) in zip(axes[0], present, strict=False):
        pts = [(h["step"], h[key]) for h in history if key in h and "step" in h]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
        ax.set_xlabel("step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{method} training")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
