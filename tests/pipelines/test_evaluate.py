"""Evaluation sampling: one copy of the base weights serves both the base and the trained answers."""

import pytest

from charter import prompts
from charter.pipelines.evaluate import load_policy, sample, win_rate


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory):
    """A LoRA adapter with random (non-zero) B matrices, so it really changes the outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    cfg = LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    path = tmp_path_factory.mktemp("adapter")
    get_peft_model(base, cfg).save_pretrained(path)
    return {"kind": "adapter", "path": str(path)}


def test_base_answers_with_the_adapter_off_equal_the_base_model(tiny_model, adapter):
    ps = prompts.load("builtin:helpful-heldout", limit=4)
    base, tok = load_policy(tiny_model, None)
    expected = sample(base, tok, ps, max_new_tokens=8, seed=3, batch_size=2)

    peft, ptok = load_policy(tiny_model, adapter)
    with peft.disable_adapter():
        off = sample(peft, ptok, ps, max_new_tokens=8, seed=3, batch_size=2)
    on = sample(peft, ptok, ps, max_new_tokens=8, seed=3, batch_size=2)
    assert off == expected
    assert on[0] != expected[0]


def test_win_rate_counts_ties_as_half_with_an_interval():
    rate, ci = win_rate([1.0, 1.0, 0.5, 0.0])
    assert rate == pytest.approx(0.625)
    assert ci[0] < rate < ci[1] and 0.0 <= ci[0] and ci[1] <= 1.0
    assert win_rate([]) == (None, None)
