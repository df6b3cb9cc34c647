import json

import pytest
import yaml

from charter import constitution
from charter.errors import ConstitutionError


def test_default_constitution_is_complete():
    c = constitution.load("default")
    assert len(c.principles) >= 12
    assert c.dimensions == {"helpfulness": 0.4, "harmlessness": 0.3, "honesty": 0.2, "coherence": 0.1}
    assert {p.dimension for p in c.principles} == set(c.dimensions)
    assert all(p.comparison.startswith("Choose the response that") for p in c.principles)
    assert len({p.id for p in c.principles}) == len(c.principles)
    assert c.few_shot, "the default ships few-shot examples"


def test_hf_cai_recipe_layout_loads(tmp_path):
    c = constitution.load(str(constitution.SHIPPED / "hf-cai-example.json"))
    raw = json.loads((constitution.SHIPPED / "hf-cai-example.json").read_text())
    assert [p.critique for p in c.principles] == [x["critic"] for x in raw["constitutions"]]
    assert [p.revision for p in c.principles] == [x["revision"] for x in raw["constitutions"]]
    assert c.system and raw["system_chat"][0][0]["content"] in c.system


def test_errors_are_reported_by_field_all_at_once():
    bad = {
        "dimensions": {"helpfulness": 0.5, "harmlessness": 0.6},
        "principles": [
            {"id": "a", "dimension": "harmlessness", "critique": "c", "revision": "r", "comparison": "Pick one"},
            {
                "id": "a",
                "dimension": "nope",
                "critique": "",
                "revision": "r",
                "comparison": "Choose the response that x",
                "colour": "red",
            },
        ],
        "extra": 1,
    }
    with pytest.raises(ConstitutionError) as e:
        constitution.load(bad)
    msgs = "\n".join(e.value.errors)
    for expected in (
        "extra: unknown key",
        "sum to 1.1",
        "principles[0].comparison",
        "principles[1].dimension",
        "principles[1].critique",
        "principles[1].colour",
        "principles[1].id: duplicate",
    ):
        assert expected in msgs


def test_inline_mapping_and_missing_file():
    c = constitution.load(
        {
            "name": "mine",
            "principles": [
                {
                    "id": "x",
                    "dimension": "honesty",
                    "critique": "c",
                    "revision": "r",
                    "comparison": "Choose the response that is true",
                }
            ],
        }
    )
    assert c.name == "mine" and c.principles[0].id == "x"
    with pytest.raises(ConstitutionError, match="neither a shipped name"):
        constitution.load("no-such-constitution")


def test_hash_changes_with_content():
    a = constitution.load("default")
    b = constitution.parse(
        {**a.to_dict(), "principles": [p.__dict__ for p in a.principles[:3]], "few_shot": [], "name": "default"},
        "default",
    )
    assert a.sha256 != b.sha256


def test_a_constitution_file_is_read_again_once_it_changes(tmp_path):
    """Loads are cached per version of the file, never past an edit."""
    from charter import constitution as C

    data = yaml.safe_load((C.SHIPPED / "default.yaml").read_text())
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({**data, "name": "first"}))
    assert C.load(str(path)).name == "first"
    assert C.load(str(path)) is C.load(str(path))  # the same version: parsed once
    path.write_text(yaml.safe_dump({**data, "name": "second, a longer name"}))
    assert C.load(str(path)).name == "second, a longer name"
    path.write_text("principles: [")
    with pytest.raises(ConstitutionError, match="not valid YAML"):
        C.load(str(path))
