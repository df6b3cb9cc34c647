"""Real TRL training on the tiny model: SFT and DPO, LoRA and full; every trainable tensor moves."""

import io
import json

import pytest
import torch
from transformers import TrainerCallback

from charter.pipelines.events import PREFIX, Reporter
from charter.pipelines.train import train
from charter.spec import TrainSpec


class ParamWatch(TrainerCallback):
    """Snapshots the trainable parameters at the start and compares them at the end."""

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def on_train_end(self, args, state, control, model=None, **kw):
        after = dict(model.named_parameters())
        self.unchanged = [n for n, p in self.before.items() if torch.equal(p, after[n].detach())]


PROMPTS = ["Tell me a secret.", "How do I bake bread?", "What is 2+2?", "Say something rude."]


def pairs():
    return [
        {
            "prompt": [{"role": "user", "content": p}],
            "chosen": [{"role": "assistant", "content": "A kind, careful answer."}],
            "rejected": [{"role": "assistant", "content": "Go away, idiot."}],
        }
        for p in PROMPTS
    ]


def sft_rows():
    return [
        {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": "A kind answer."}]}
        for p in PROMPTS
    ]


@pytest.mark.parametrize("method", ["sft", "dpo"])
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_every_trainable_parameter_changes(tiny_model, tmp_path, method, lora):
    spec = TrainSpec.model_validate(
        {
            "method": method,
            "lora": {"r": 4, "alpha": 8} if lora else None,
            "args": {"max_steps": 3, "learning_rate": 1e-2, "per_device_train_batch_size": 2},
        }
    )
    out = io.StringIO()
    watch = ParamWatch()
    info = train(spec, sft_rows() if method == "sft" else pairs(), tiny_model, tmp_path, 0, Reporter(out), [watch])

    assert watch.before, "nothing was trainable"
    assert watch.unchanged == []
    if lora:
        assert all("lora_" in n for n in watch.before)
        assert (tmp_path / "adapter" / "adapter_config.json").exists()
        assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    else:
        assert (tmp_path / "model" / "config.json").exists() and (tmp_path / "model" / "model.safetensors").exists()
    assert info["steps"] == 3
    events = [json.loads(line[len(PREFIX) :]) for line in out.getvalue().splitlines()]
    losses = [e["data"]["loss"] for e in events if e["type"] == "metrics" and "loss" in e["data"]]
    assert len(losses) == 3 and all(x > 0 for x in losses)
    cfg = json.loads((tmp_path / info["kind"] / "charter_train_config.json").read_text())
    assert cfg["trl_config"]["learning_rate"] == 1e-2 and cfg["trl_config"]["bf16"] is False  # float32 on CPU
    assert (tmp_path / "curve.png").stat().st_size > 1000
