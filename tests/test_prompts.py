import json

import pytest

from charter import prompts
from charter.errors import SpecError


def test_builtin_sets_are_large_and_splits_disjoint():
    for family in ("red-team", "helpful"):
        train = prompts.load(f"builtin:{family}")
        held = prompts.load(f"builtin:{family}-heldout")
        assert len(train) + len(held) >= 120
        assert len(held) >= 16
        texts = {p[-1]["content"] for p in train}
        assert not texts & {p[-1]["content"] for p in held}
        assert all(p[-1]["role"] == "user" for p in train + held)


def test_limit_and_unknown_builtin():
    assert len(prompts.load("builtin:helpful", limit=5)) == 5
    with pytest.raises(SpecError, match="builtin:red-team"):
        prompts.load("builtin:red-teem")


def test_jsonl_file_with_text_and_messages(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(
        json.dumps({"prompt": "hi"})
        + "\n\n"
        + json.dumps({"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "why?"}]})
        + "\n"
    )
    out = prompts.load(str(f))
    assert out == [
        [{"role": "user", "content": "hi"}],
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "why?"}],
    ]


@pytest.mark.parametrize(
    "line, msg",
    [
        ("{not json", ":1: not valid JSON"),
        ('{"text": "hi"}', "'prompt' field"),
        ('{"prompt": ""}', "non-empty text"),
        ('{"prompt": [{"role": "assistant", "content": "x"}]}', "ending with a user turn"),
    ],
)
def test_bad_jsonl_names_the_line(tmp_path, line, msg):
    f = tmp_path / "p.jsonl"
    f.write_text(line + "\n")
    with pytest.raises(SpecError, match=msg):
        prompts.load(str(f))
