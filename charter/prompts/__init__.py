"""Prompt sets: the built-in ones written for this project, or a user's JSONL file.

`builtin:red-team` / `builtin:red-team-heldout` and `builtin:helpful` / `builtin:helpful-heldout`
are the train and held-out splits of the files beside this module. A JSONL file has a
`prompt` column holding text or chat messages (`[{"role": "user", "content": …}]`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from charter.errors import SpecError

HERE = Path(__file__).parent
BUILTIN = {
    "red-team": ("red-team.jsonl", "train"),
    "red-team-heldout": ("red-team.jsonl", "heldout"),
    "helpful": ("helpful.jsonl", "train"),
    "helpful-heldout": ("helpful.jsonl", "heldout"),
}

Messages = list[dict[str, str]]


def load(source: str, limit: int | None = None, loc: tuple[str, ...] = ("prompts", "source")) -> list[Messages]:
    """Prompts as chat messages (each a list of {role, content} ending with the user's turn)."""
    if source.startswith("builtin:"):
        name = source.removeprefix("builtin:")
        if name not in BUILTIN:
            raise SpecError.one(
                loc,
                f"unknown built-in prompt set {name!r}; choose one of: " + ", ".join(f"builtin:{n}" for n in BUILTIN),
            )
        file, split = BUILTIN[name]
        rows = [r for r in _read_jsonl(HERE / file, loc) if r.get("split", "train") == split]
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise SpecError.one(
                loc, f"prompt source {source!r} is not a built-in set (builtin:…) nor a readable JSONL file"
            )
        rows = _read_jsonl(path, loc)
    prompts = [_as_messages(r, i, loc) for i, r in enumerate(rows)]
    if not prompts:
        raise SpecError.one(loc, f"prompt source {source!r} holds no prompts")
    return prompts[:limit] if limit else prompts


def _read_jsonl(path: Path, loc: tuple[str, ...]) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SpecError.one(loc, f"{path}:{n}: not valid JSON ({e.msg}); each line must be one JSON object") from e
        if not isinstance(row, dict) or "prompt" not in row:
            raise SpecError.one(loc, f"{path}:{n}: each line must be an object with a 'prompt' field")
        rows.append(row)
    return rows


def _as_messages(row: dict[str, Any], i: int, loc: tuple[str, ...]) -> Messages:
    p = row["prompt"]
    if isinstance(p, str) and p.strip():
        return [{"role": "user", "content": p}]
    if (
        isinstance(p, list)
        and p
        and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in p)
        and p[-1].get("role") == "user"
    ):
        return [{"role": m["role"], "content": m["content"]} for m in p]
    raise SpecError.one(loc, f"row {i}: 'prompt' must be non-empty text or chat messages ending with a user turn")
