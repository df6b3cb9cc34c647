"""A job's work directory: one folder per stage, rows as JSONL, and a manifest written last.

    ARTIFACT_ROOT/<job>/<stage>/rows.jsonl + manifest.json

A stage whose manifest exists is complete: a job picked up again after a crash skips it and
reads its rows back. Files are written under a temporary name and renamed, so a crash never
leaves a half-written file under a final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Row = dict[str, Any]


def write_atomic(path: Path, text: str) -> None:
    """Write under a temporary name, flush it to disk, then rename: readers, and a job resumed
    after a kill -9, see the whole file or none. The temporary name is the writer's own, so two
    attempts of a job (a worker taken over while its old job process lives) never mix bytes."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_jsonl(path: Path, rows: list[Row]) -> None:
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[Row]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Workdir:
    root: Path
    job_id: str
    meta: dict[str, Any]  # resolved config, constitution hash, judge model: copied into every manifest

    def stage_dir(self, stage: str) -> Path:
        d = self.root / stage
        d.mkdir(parents=True, exist_ok=True)
        return d

    def done(self, stage: str) -> bool:
        return (self.root / stage / "manifest.json").exists()

    def rows(self, stage: str) -> list[Row]:
        return read_jsonl(self.root / stage / "rows.jsonl")

    def manifest(self, stage: str) -> dict[str, Any]:
        return json.loads((self.root / stage / "manifest.json").read_text())

    def finish(
        self,
        stage: str,
        kind: str,
        rows: list[Row] | None = None,
        parents: list[str] = (),
        counts: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Write the stage's rows (if any), then its manifest: the stage is complete only after this."""
        d = self.stage_dir(stage)
        if rows is not None:
            write_jsonl(d / "rows.jsonl", rows)
        files = {
            str(p.relative_to(d)): sha256(p)
            for p in sorted(d.rglob("*"))
            if p.is_file() and p.name != "manifest.json" and not p.name.startswith(".")
        }
        manifest = {
            "kind": kind,
            "stage": stage,
            "job_id": self.job_id,
            "parents": list(parents),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "rows": len(rows) if rows is not None else None,
            "counts": counts or {},
            "files": files,
            "python": sys.version.split()[0],
            **self.meta,
            **(extra or {}),
        }
        write_atomic(d / "manifest.json", json.dumps(manifest, indent=2, ensure_ascii=False))
        return manifest
