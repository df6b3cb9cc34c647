"""Constitutions: the principles the judge critiques, revises and compares against.

`load(ref)` takes a shipped name (`default`), a YAML/JSON file path, or an inline mapping, in
charter's layout (see default.yaml) or in the JSON layout of HuggingFace's CAI recipe
(`{"constitutions": [{"critic", "revision"}], "system_chat": [...]}`). Errors are collected
by field and raised together, so a user fixes a file in one pass.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from charter.errors import ConstitutionError

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's, where PyYAML was built with it

SHIPPED = Path(__file__).parent
DIMENSIONS = ("helpfulness", "harmlessness", "honesty", "coherence")
DEFAULT_WEIGHTS = {"helpfulness": 0.4, "harmlessness": 0.3, "honesty": 0.2, "coherence": 0.1}
DEFAULT_COMPARISON = "Choose the response that is more helpful, honest and harmless."


@dataclass(frozen=True)
class Principle:
    id: str
    dimension: str
    critique: str  # the critique request: "Identify specific ways in which the assistant's last response …"
    revision: str  # the revision request: "Please rewrite the assistant's last response …"
    comparison: str  # the comparison request: "Choose the response that …"


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str
    critique: str
    revision: str


@dataclass(frozen=True)
class Constitution:
    name: str
    principles: tuple[Principle, ...]
    dimensions: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    system: str | None = None
    few_shot: tuple[Example, ...] = ()
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


def shipped_names() -> list[str]:
    return sorted(p.stem for p in SHIPPED.glob("*.yaml"))


def load(ref: str | dict[str, Any]) -> Constitution:
    """A shipped name, a file path, or an inline mapping → a validated Constitution."""
    if isinstance(ref, dict):
        return parse(ref, name=str(ref.get("name", "inline")))
    shipped = SHIPPED / f"{ref}.yaml"
    path = shipped if shipped.exists() else Path(ref).expanduser()
    if not path.is_file():
        raise ConstitutionError(
            [f"constitution {ref!r} is neither a shipped name ({', '.join(shipped_names())}) nor a readable file"]
        )
    st = path.stat()
    return _load_file(str(path), (st.st_ino, st.st_mtime_ns, st.st_size))


@functools.lru_cache(maxsize=64)
def _load_file(path_str: str, version: tuple[int, int, int]) -> Constitution:
    """One file's Constitution, parsed once per version of the file (inode, mtime, size).

    Every submit checks its constitution: pure-Python YAML took ~9 ms of a ~11 ms validation."""
    path = Path(path_str)
    try:
        data = yaml.load(path.read_text(), Loader=_Loader)  # YAML is a superset of JSON
    except yaml.YAMLError as e:
        raise ConstitutionError([f"{path}: not valid YAML or JSON: {e}"]) from e
    if not isinstance(data, dict):
        raise ConstitutionError([f"{path}: expected a mapping at the top level, got {type(data).__name__}"])
    return parse(data, name=str(data.get("name", path.stem)))


def parse(data: dict[str, Any], name: str) -> Constitution:
    if "constitutions" in data:
        return _parse_hf(data, name)
    errors: list[str] = []
    known = {"name", "description", "system", "dimensions", "principles", "few_shot"}
    errors += [f"{k}: unknown key; allowed keys are {', '.join(sorted(known))}" for k in data if k not in known]

    dims = data.get("dimensions", DEFAULT_WEIGHTS)
    if not isinstance(dims, dict) or not dims:
        errors.append("dimensions: expected a mapping of dimension name to weight")
        dims = dict(DEFAULT_WEIGHTS)
    bad_weights = [k for k, v in dims.items() if not isinstance(v, int | float) or isinstance(v, bool) or v < 0]
    errors += [f"dimensions.{k}: weight must be a number ≥ 0, got {dims[k]!r}" for k in bad_weights]
    if not bad_weights and abs(sum(dims.values()) - 1.0) > 1e-6:
        errors.append(f"dimensions: weights must sum to 1.0, they sum to {sum(dims.values()):g}")

    principles: list[Principle] = []
    raw = data.get("principles")
    if not isinstance(raw, list) or not raw:
        errors.append("principles: expected a non-empty list of principles")
        raw = []
    seen: set[str] = set()
    for i, p in enumerate(raw):
        where = f"principles[{i}]"
        if not isinstance(p, dict):
            errors.append(f"{where}: expected a mapping with id, dimension, critique, revision, comparison")
            continue
        for key in ("id", "dimension", "critique", "revision", "comparison"):
            if not isinstance(p.get(key), str) or not p[key].strip():
                errors.append(f"{where}.{key}: required, a non-empty string")
        extra = set(p) - {"id", "dimension", "critique", "revision", "comparison"}
        errors += [f"{where}.{k}: unknown key" for k in sorted(extra)]
        if isinstance(p.get("dimension"), str) and p["dimension"] not in dims:
            errors.append(f"{where}.dimension: {p['dimension']!r} is not one of the dimensions ({', '.join(dims)})")
        if isinstance(p.get("comparison"), str) and not p["comparison"].startswith("Choose the response that"):
            errors.append(f"{where}.comparison: must begin 'Choose the response that …'")
        if p.get("id") in seen:
            errors.append(f"{where}.id: duplicate id {p['id']!r}")
        seen.add(p.get("id"))
        if not any(e.startswith(where) for e in errors):
            principles.append(
                Principle(**{k: p[k].strip() for k in ("id", "dimension", "critique", "revision", "comparison")})
            )

    few_shot: list[Example] = []
    for i, ex in enumerate(data.get("few_shot") or []):
        keys = ("prompt", "response", "critique", "revision")
        if not isinstance(ex, dict) or any(not isinstance(ex.get(k), str) for k in keys):
            errors.append(f"few_shot[{i}]: expected a mapping with string prompt, response, critique, revision")
            continue
        few_shot.append(Example(**{k: ex[k] for k in keys}))
    if data.get("system") is not None and not isinstance(data["system"], str):
        errors.append("system: expected a string")
    if errors:
        raise ConstitutionError(errors)
    return Constitution(
        name=name,
        principles=tuple(principles),
        dimensions={k: float(v) for k, v in dims.items()},
        system=data.get("system"),
        few_shot=tuple(few_shot),
        description=str(data.get("description", "")),
    )


def _parse_hf(data: dict[str, Any], name: str) -> Constitution:
    """HuggingFace's CAI recipe layout; it has no comparisons or dimensions, so defaults fill in."""
    errors: list[str] = []
    raw = data["constitutions"]
    if not isinstance(raw, list) or not raw:
        raise ConstitutionError(["constitutions: expected a non-empty list of {critic, revision}"])
    principles = []
    for i, p in enumerate(raw):
        if not isinstance(p, dict) or not isinstance(p.get("critic"), str) or not isinstance(p.get("revision"), str):
            errors.append(f"constitutions[{i}]: expected a mapping with string 'critic' and 'revision'")
            continue
        principles.append(Principle(f"hf-{i}", "harmlessness", p["critic"], p["revision"], DEFAULT_COMPARISON))
    chat = data.get("system_chat") or []
    if not isinstance(chat, list):
        errors.append("system_chat: expected a list of conversations (lists of {role, content})")
    if errors:
        raise ConstitutionError(errors)
    # The recipe's few-shot conversations are kept verbatim as the judge's system context.
    system = None
    if chat:
        turns = [f"{m.get('role')}: {m.get('content')}" for conv in chat for m in conv if isinstance(m, dict)]
        system = "Examples of critiques and revisions:\n" + "\n".join(turns)
    return Constitution(name=name, principles=tuple(principles), system=system)
