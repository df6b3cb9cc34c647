"""Datasets a user brings (an uploaded file or a local JSONL path), checked line by line.

Each line is one JSON object; the first row decides the kind and every row must match it:

- `sft` — `{"messages": [... , {"role": "assistant", …}]}` (OpenAI's chat format), or
  `{"prompt": …, "completion": …}`;
- `preference` — `{"prompt", "chosen", "rejected"}` (TRL's columns), or OpenAI's DPO format
  `{"input": {"messages": […]}, "preferred_output": [assistant], "non_preferred_output": [assistant]}`;
- `prompts` — `{"prompt": …}`, or `{"messages": […]}` ending with the user's turn (OpenAI's
  reinforcement format, whose other keys are kept for graders).

Text fields may be strings or chat messages; rows come back in TRL's conversational columns
(`messages`; `prompt`/`chosen`/`rejected` as message lists), so one dataset never mixes the two.
The first bad line is reported with its number and what to fix (`DatasetError`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from charter.errors import CharterError

Kind = Literal["sft", "preference", "prompts"]
Messages = list[dict[str, str]]
ROLES = ("system", "user", "assistant", "developer", "tool")
KINDS_FOR_METHOD: dict[str, tuple[str, ...]] = {
    "sft": ("sft",),
    "dpo": ("preference",),
    "reward": ("preference",),
    "kto": ("preference",),
    "grpo": ("prompts",),
    "rloo": ("prompts",),
    "ppo": ("prompts",),
}


class DatasetError(CharterError):
    """A dataset line is not what its kind needs; the message names the line and the fix."""

    status_code = 422

    def __init__(self, line: int | None, msg: str):
        self.line = line
        super().__init__(f"line {line}: {msg}" if line else msg)


def load(path: Path, limit: int | None = None) -> tuple[Kind, list[dict[str, Any]]]:
    """A JSONL file → (kind, rows in TRL's conversational columns)."""
    return parse(path.read_bytes(), limit)


def parse(data: bytes, limit: int | None = None) -> tuple[Kind, list[dict[str, Any]]]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(None, f"the file is not UTF-8 text (byte {e.start}); save it as UTF-8 JSONL") from None
    kind: Kind | None = None
    rows: list[dict[str, Any]] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(
                n, f"not valid JSON ({e.msg} at column {e.colno}); each line must be one JSON object"
            ) from None
        if not isinstance(row, dict):
            raise DatasetError(n, f"expected a JSON object, got {type(row).__name__}")
        kind = kind or _kind_of(row, n)
        try:
            rows.append(_NORMALIZE[kind](row))
        except ValueError as e:
            raise DatasetError(n, f"{e} (this file holds {kind} rows, as its first row decided)") from None
        if limit and len(rows) >= limit:
            break
    if kind is None:
        raise DatasetError(None, "the file holds no rows; each line must be one JSON object")
    return kind, rows


def _kind_of(row: dict[str, Any], n: int) -> Kind:
    keys = set(row)
    if {"chosen", "rejected"} <= keys or {"preferred_output", "non_preferred_output"} <= keys:
        return "preference"
    if "completion" in keys:
        return "sft"
    if "messages" in keys:
        msgs = row["messages"]
        last = msgs[-1] if isinstance(msgs, list) and msgs else None
        return "sft" if isinstance(last, dict) and last.get("role") == "assistant" else "prompts"
    if "prompt" in keys:
        return "prompts"
    raise DatasetError(
        n,
        f"unrecognised columns {sorted(keys)}; use messages (SFT), prompt/completion (SFT), "
        "prompt/chosen/rejected or input/preferred_output/non_preferred_output (preference), or prompt (prompts)",
    )


def _messages(value: Any, field: str, last_role: str | None = None) -> Messages:
    """Text or chat messages → chat messages; `last_role` is the role text becomes and the last turn must have."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"'{field}' is empty")
        return [{"role": last_role or "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise ValueError(f"'{field}' must be text or a non-empty list of {{role, content}} messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"'{field}[{i}]' must be {{role, content}} with role one of {', '.join(ROLES)}")
        out.append({"role": m["role"], "content": m["content"]})
    if last_role and out[-1]["role"] != last_role:
        article = "an" if last_role[0] in "aeiou" else "a"
        raise ValueError(f"'{field}' must end with {article} {last_role} turn, it ends with a {out[-1]['role']} turn")
    return out


def _sft(row: dict[str, Any]) -> dict[str, Any]:
    if "messages" in row:
        msgs = _messages(row["messages"], "messages", last_role="assistant")
        if not any(m["role"] == "user" for m in msgs):
            raise ValueError("'messages' has no user turn to answer")
        return {"messages": msgs}
    if "prompt" not in row or "completion" not in row:
        raise ValueError("an SFT row needs 'messages', or both 'prompt' and 'completion'")
    return {
        "messages": _messages(row["prompt"], "prompt", "user") + _messages(row["completion"], "completion", "assistant")
    }


def _preference(row: dict[str, Any]) -> dict[str, Any]:
    if "preferred_output" in row or "input" in row:  # OpenAI's DPO format
        inp = row.get("input")
        if not isinstance(inp, dict) or "messages" not in inp:
            raise ValueError("'input' must be an object with 'messages' (OpenAI's DPO format)")
        prompt, chosen, rejected = inp["messages"], row.get("preferred_output"), row.get("non_preferred_output")
        names = ("input.messages", "preferred_output", "non_preferred_output")
    else:
        prompt, chosen, rejected = row.get("prompt"), row.get("chosen"), row.get("rejected")
        names = ("prompt", "chosen", "rejected")
    for name, value in zip(names, (prompt, chosen, rejected), strict=True):
        if value is None:
            raise ValueError(f"'{name}' is missing; a preference row needs {', '.join(names)}")
    return {
        "prompt": _messages(prompt, names[0], "user"),
        "chosen": _messages(chosen, names[1], "assistant"),
        "rejected": _messages(rejected, names[2], "assistant"),
    }


def _prompts(row: dict[str, Any]) -> dict[str, Any]:
    if "messages" in row:
        out = {k: v for k, v in row.items() if k != "messages"}  # reference answers etc. stay for graders
        return {**out, "prompt": _messages(row["messages"], "messages", "user")}
    if "prompt" not in row:
        raise ValueError("a prompts row needs 'prompt' (or 'messages' ending with a user turn)")
    return {**row, "prompt": _messages(row["prompt"], "prompt", "user")}


_NORMALIZE = {"sft": _sft, "preference": _preference, "prompts": _prompts}
