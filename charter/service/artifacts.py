"""A job's artifacts as the API serves them: names, safe paths, and folders as a streamed tar.

The names are those of the job's result (`dataset`, `adapter`, `plot`, `report`, …; while it
runs, those its `artifact` events announced so far) plus `log` (job.log). A relative path
inside the job's folder (`label/rows.jsonl`, `train/checkpoint-2`) is accepted too. Whatever
is asked, the file served must lie inside ARTIFACT_ROOT/<job>: `..`, absolute paths and
symlinks that lead out are refused.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from charter.errors import CharterError

CHUNK = 1 << 20


class ArtifactNotFound(CharterError):
    """The job has no artifact by this name (or it is not on disk yet)."""

    status_code = 404

    def __init__(self, job_id: str, name: str, why: str = ""):
        super().__init__(f"job {job_id} has no artifact {name!r}{why}; list them with GET /v1/jobs/{job_id}/artifacts")


class ArtifactRefused(CharterError):
    """The artifact path leads outside the job's folder."""

    status_code = 400

    def __init__(self, name: str):
        super().__init__(
            f"artifact {name!r} is refused: name an artifact or a relative path inside the job's folder, "
            "without '..', an absolute path or a symlink that leads out of it"
        )


def _relative(job_id: str, path: str) -> PurePosixPath | None:
    """A recorded artifact path as a path inside the job's folder.

    Worker and API may mount the artifact root at different places, so the part after the
    job id is what counts.
    """
    parts = PurePosixPath(path).parts
    if job_id in parts:
        return PurePosixPath(*parts[len(parts) - parts[::-1].index(job_id) :])
    return None


def named(job_id: str, result: dict[str, Any] | None, announced: dict[str, str]) -> dict[str, PurePosixPath]:
    """Artifact name → path inside the job's folder: the result's, else the announced ones, plus the log."""
    recorded = (result or {}).get("artifacts") or announced
    names = {name: rel for name, path in recorded.items() if (rel := _relative(job_id, str(path))) is not None}
    names.setdefault("log", PurePosixPath("job.log"))
    return names


def resolve(job_dir: Path, job_id: str, name: str, names: dict[str, PurePosixPath]) -> Path:
    """The file or folder for `name`, checked to lie inside the job's folder."""
    rel = names.get(name)
    if rel is None:
        given = PurePosixPath(name)
        if given.is_absolute() or ".." in given.parts or "\\" in name or "\0" in name:
            raise ArtifactRefused(name[:200])
        rel = given
    root = job_dir.resolve()
    try:
        path = (job_dir / rel).resolve()
        if not path.is_relative_to(root):  # a symlink somewhere along the way leads out
            raise ArtifactRefused(name)
        found = path.exists()
    except OSError:  # a name too long for the filesystem, a loop of symlinks
        found = False
    if not found:
        raise ArtifactNotFound(job_id, name[:200], " on disk" if name in names else "")
    return path


def describe(job_dir: Path, names: dict[str, PurePosixPath]) -> list[dict[str, Any]]:
    """[{name, kind: file|dir, bytes, path}] for the artifacts on disk."""
    root = job_dir.resolve()
    out = []
    for name, rel in names.items():
        path = (job_dir / rel).resolve()
        if not path.is_relative_to(root) or not path.exists():
            continue
        if path.is_dir():
            size = sum(f.stat().st_size for f in _files(path))
            out.append({"name": name, "kind": "dir", "bytes": size, "path": str(rel)})
        else:
            out.append({"name": name, "kind": "file", "bytes": path.stat().st_size, "path": str(rel)})
    return out


def _files(folder: Path) -> Iterator[Path]:
    """Regular files under `folder`, sorted, never following a symlink (one that leads out is skipped)."""
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for filename in sorted(filenames):
            path = Path(dirpath) / filename
            if not path.is_symlink() and path.is_file() and not filename.startswith("."):
                yield path


def stream_tar(folder: Path, arcname: str) -> Iterator[bytes]:
    """`folder` as an uncompressed tar, a chunk at a time: nothing is built in memory or on disk."""
    for path in _files(folder):
        info = tarfile.TarInfo(f"{arcname}/{path.relative_to(folder).as_posix()}")
        stat = path.stat()
        info.size, info.mtime, info.mode = stat.st_size, int(stat.st_mtime), 0o644
        yield info.tobuf(tarfile.PAX_FORMAT)
        sent = 0
        with open(path, "rb") as f:
            while sent < info.size and (chunk := f.read(min(CHUNK, info.size - sent))):
                sent += len(chunk)
                yield chunk
        if sent < info.size:  # the file shrank while it was read: keep the archive well-formed
            yield b"\0" * (info.size - sent)
        if info.size % tarfile.BLOCKSIZE:
            yield b"\0" * (tarfile.BLOCKSIZE - info.size % tarfile.BLOCKSIZE)
    yield b"\0" * (2 * tarfile.BLOCKSIZE)
