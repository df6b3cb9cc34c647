"""Every job spec the user guides show is a valid spec today: each YAML block of
docs/methods.md and docs/recipe.md goes through the same validation as POST /v1/jobs (TRL's
parser on train.args included). Placeholders (REWARD_JOB_ID, MY_FILE_ID) are replaced by a real
reward job's folder and a real uploaded file."""

import json
import re
from pathlib import Path

import pytest
import yaml

from charter import validation
from charter.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
GUIDES = [ROOT / "docs" / "methods.md", ROOT / "docs" / "recipe.md"]


def blocks() -> list[tuple[str, str]]:
    found = []
    for guide in GUIDES:
        for text in re.findall(r"```yaml\n(.*?)```", guide.read_text(), flags=re.S):
            raw = yaml.safe_load(text)
            if isinstance(raw, dict) and "policy" in raw:
                found.append((f"{guide.name}:{raw['name']}", text))
    return found


def test_the_guides_show_every_method():
    methods = {yaml.safe_load(t).get("train", {}).get("method") for _, t in blocks()}
    assert {"sft", "dpo", "kto", "reward", "grpo", "rloo", "ppo"} <= methods, methods


@pytest.mark.parametrize("name,text", blocks(), ids=[n for n, _ in blocks()])
def test_every_spec_in_the_guides_is_accepted(name, text, tmp_path, tiny_model):
    data = tmp_path / "data"
    data.mkdir()
    # A reward job's output, as a `reward` job leaves it, for the ppo spec.
    reward_job = tmp_path / "artifacts" / "job-0123456789ab"
    adapter = reward_job / "train" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(
        json.dumps({"task_type": "SEQ_CLS", "base_model_name_or_path": tiny_model})
    )
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    (adapter / "charter_train_config.json").write_text(json.dumps({"method": "reward", "base_model": tiny_model}))
    (reward_job / "train" / "manifest.json").write_text(json.dumps({"result": {"path": str(adapter)}}))
    pairs = data / "pairs.jsonl"
    pairs.write_text(
        "\n".join(
            json.dumps({"prompt": f"Question {i}?", "chosen": "A careful answer.", "rejected": "No."}) for i in range(4)
        )
    )
    raw = yaml.safe_load(text.replace("REWARD_JOB_ID", reward_job.name).replace("MY_FILE_ID", str(pairs)))
    settings = Settings(
        home=tmp_path, artifact_root=tmp_path / "artifacts", models_dir=Path(tiny_model).parent, data_roots=(data,)
    )
    spec = validation.validate_job_spec(raw, settings)
    assert spec.name == raw["name"]
