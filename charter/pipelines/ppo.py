"""`train.method: ppo`: TRL's experimental PPOTrainer, made resumable.

Policy (+LoRA or full), reference (the base; implicit with LoRA), reward model from a `reward`
job, value model initialised from that reward model (TRL's own example does the same).

TRL 1.12's `PPOTrainer.train()` takes no `resume_from_checkpoint`, and its checkpoints hold the
policy alone, not the value model. Here each checkpoint also gets `ppo_trainable.safetensors`
(every trainable tensor of policy and value model, one file), and `train(resume_from_checkpoint=)`
loads it with the optimizer, scheduler and RNG states, then runs only the remaining updates with
the step and episode counters and the log history carried on. The first resumed epoch skips the
batches already trained on; the order of later samples differs from an uninterrupted run (TRL
draws them from the global RNG as it goes), so a resumed run continues the same optimisation,
not the same random stream.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from charter.models import SAFE_WEIGHTS
from charter.spec import TrainSpec

STATE = "ppo_trainable.safetensors"


def trainer(
    spec: TrainSpec, cfg: Any, rows: list[dict], model_path: str, tok: Any, dtype: Any, cbs: list, ctx: dict
) -> Any:
    """A resumable PPOTrainer on `rows` (prompts) with the reward job that `spec.reward_model` names."""
    import copy

    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from charter.pipelines.rewards import load_reward_model, resolve_reward_model
    from charter.pipelines.train import _peft

    rm_path = resolve_reward_model(spec.reward_model, ctx.get("artifact_root"))
    reward_model, rm_tok = load_reward_model(rm_path, dtype)
    if rm_tok.get_vocab() != tok.get_vocab():
        raise ValueError(
            f"train.reward_model: {rm_path} uses a different tokenizer from the policy {model_path}; "
            "PPO scores the policy's tokens directly, so train the reward model from the same base model"
        )
    value_model = copy.deepcopy(reward_model).train()
    policy = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, **SAFE_WEIGHTS)
    ref = None if spec.lora else AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, **SAFE_WEIGHTS)
    chats = [tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False) for r in rows]
    ids = [tok(c, add_special_tokens=False)["input_ids"] for c in chats]
    dataset = Dataset.from_list([{"input_ids": x} for x in ids])
    return _resumable()(
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


def trainable_state(model: Any) -> dict[str, Any]:
    """Every trainable tensor by name; named_parameters() lists a tied weight once."""
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _resumable() -> type:
    """The subclass is built on first use: importing trl.experimental.ppo costs seconds."""
    from transformers import TrainerCallback
    from trl.experimental.ppo import PPOTrainer
    from trl.experimental.ppo.ppo_trainer import OnlineTrainerState

    class Carry(TrainerCallback):
        """Puts the checkpoint's counters back after PPOTrainer.train() has zeroed them."""

        def __init__(self, saved: Any, total: int) -> None:
            self.saved, self.total = saved, total

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            state.global_step, state.episode = self.saved.global_step, self.saved.episode
            state.max_steps, state.log_history = self.total, list(self.saved.log_history)

    class ResumablePPOTrainer(PPOTrainer):
        def _save_checkpoint(self, model: Any, trial: Any) -> None:
            super()._save_checkpoint(model, trial)
            if self.accelerator.is_main_process:  # the folder TRL just wrote (atomic_checkpoints stages it)
                from safetensors.torch import save_file

                folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
                save_file(trainable_state(self.accelerator.unwrap_model(self.model)), str(folder / STATE))

        def train(self, resume_from_checkpoint: str | None = None) -> Any:
            if not resume_from_checkpoint:
                return super().train()
            ckpt = Path(resume_from_checkpoint)
            if self.is_deepspeed_enabled or self.is_fsdp_enabled:
                raise ValueError(f"ppo cannot resume {ckpt.name} under DeepSpeed or FSDP; remove its checkpoints")
            self._load_trainable(ckpt)
            # PPOTrainer skips Trainer.__init__, which sets what the optimizer loader reads.
            self.is_fsdp_xla_v1_enabled = getattr(self, "is_fsdp_xla_v1_enabled", False)
            self._load_optimizer_and_scheduler(str(ckpt))
            self._load_rng_state(str(ckpt))
            saved = OnlineTrainerState.load_from_json(str(ckpt / "trainer_state.json"))
            total, loader = self.args.num_total_batches, self.dataloader
            carry = Carry(saved, total)
            self.args.num_total_batches = max(0, total - saved.global_step)  # the updates still to run
            self.dataloader = _SkipFirst(loader, saved.global_step)
            self.callback_handler.callbacks.insert(0, carry)  # first, so every other callback sees the carried step
            try:
                return super().train()
            finally:
                self.args.num_total_batches, self.dataloader = total, loader
                self.remove_callback(carry)

        def _load_trainable(self, ckpt: Path) -> None:
            from safetensors.torch import load_file

            if not (ckpt / STATE).exists():
                raise ValueError(f"{ckpt} has no {STATE}: it was not written by charter's PPO; remove it to start over")
            wrapper = self.accelerator.unwrap_model(self.model)
            saved = load_file(str(ckpt / STATE), device=str(self.accelerator.device))
            want = trainable_state(wrapper)
            if set(saved) != set(want):
                raise ValueError(
                    f"{ckpt.name} does not match this PPO run's trainable tensors "
                    f"({len(set(want) - set(saved))} missing, {len(set(saved) - set(want))} unexpected): "
                    "the job's train.lora or model changed since it was written; remove the checkpoints to start over"
                )
            wrapper.load_state_dict(saved, strict=False)

    return ResumablePPOTrainer


class _SkipFirst:
    """A dataloader whose next pass starts `n` batches in (mod its length); later passes are whole."""

    def __init__(self, loader: Any, n: int) -> None:
        self.loader, self.n = loader, n

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Any:
        it = iter(self.loader)
        skip, self.n = self.n % max(len(self.loader), 1), 0
        for _ in range(skip):
            next(it)
        yield from it
