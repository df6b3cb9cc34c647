"""Uploaded files, OpenAI's `/v1/files`: datasets (JSONL) and constitutions (YAML / JSON).

    curl -F purpose=fine-tune -F file=@sft.jsonl localhost:8400/v1/files
    openai.OpenAI(base_url="http://localhost:8400/v1").files.create(file=open("sft.jsonl", "rb"), purpose="fine-tune")

A file is checked on upload — a dataset line by line (charter.dataset: the first bad line
and why), a constitution by charter's loader — so a job never fails an hour in on a typo.
Bytes go to ARTIFACT_ROOT/files/<id> (written under a temporary name, then renamed); the
`files` table holds who owns it and what it is. A job spec names a file by id
(`dataset: {source: file-…}`, `prompts: {source: file-…}`, `constitution: file-…`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Literal

import sqlalchemy as sa
import yaml
from fastapi import APIRouter, Depends, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse
from pydantic import BaseModel
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from charter import constitution, dataset
from charter.errors import CharterError, ConstitutionError
from charter.service.auth import PrincipalDep
from charter.service.db import File, new_file_id
from charter.service.openai_errors import OpenAIError, OpenAIRoute
from charter.settings import Settings

PURPOSES = ("fine-tune", "constitution")
CHUNK = 1 << 20


class FileNotFound(CharterError):
    """No file with this id is visible to the caller."""

    status_code = 404

    def __init__(self, file_id: str):
        super().__init__(f"no file with id {file_id}; list your files with GET /v1/files")


class FileStore:
    """The files table and the bytes under `root` (ARTIFACT_ROOT/files)."""

    def __init__(self, engine: Engine, root: Path):
        self.engine, self.root = engine, root

    @classmethod
    def of(cls, request: Request) -> FileStore:
        settings: Settings = request.app.state.settings
        return cls(request.app.state.store.engine, settings.artifact_root / "files")

    @contextmanager
    def _session(self, write: bool = False) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as s, s.begin():
            if write:
                s.connection(execution_options={"sqlite_immediate": True})
            yield s

    def add(self, src: Path, *, tenant: str, filename: str, purpose: str, kind: str, rows: int | None) -> File:
        """Move the checked temporary file `src` into place and record it."""
        file_id = new_file_id()
        digest, size = _sha256(src)
        os.replace(src, self.root / file_id)
        try:
            with self._session(write=True) as s:
                row = File(
                    id=file_id,
                    tenant=tenant,
                    filename=filename,
                    purpose=purpose,
                    kind=kind,
                    bytes=size,
                    rows=rows,
                    sha256=digest,
                )
                s.add(row)
                return row
        except Exception:
            (self.root / file_id).unlink(missing_ok=True)
            raise

    def get(self, file_id: str, scope: str | None) -> File:
        with self._session() as s:
            row = s.get(File, file_id)
            if row is None or (scope is not None and row.tenant != scope):
                raise FileNotFound(file_id)  # another tenant's file is not found either
            return row

    def path(self, file_id: str, scope: str | None) -> Path:
        """The local path of a file the caller may use; FileNotFound otherwise."""
        self.get(file_id, scope)
        return self.root / file_id

    def list(self, scope: str | None, purpose: str | None, limit: int, after: str | None) -> list[File]:
        query = sa.select(File).order_by(File.created_at.desc(), File.id.desc())
        if scope is not None:
            query = query.where(File.tenant == scope)
        if purpose:
            query = query.where(File.purpose == purpose)
        if after:  # a cursor: files older than `after`
            cursor = self.get(after, scope)
            query = query.where(
                sa.or_(
                    File.created_at < cursor.created_at, sa.and_(File.created_at == cursor.created_at, File.id < after)
                )
            )
        with self._session() as s:
            return list(s.scalars(query.limit(limit)))

    def delete(self, file_id: str, scope: str | None) -> None:
        with self._session(write=True) as s:
            row = s.get(File, file_id)
            if row is None or (scope is not None and row.tenant != scope):
                raise FileNotFound(file_id)
            s.delete(row)
        (self.root / file_id).unlink(missing_ok=True)


def _sha256(path: Path) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def check(path: Path, purpose: str, filename: str) -> tuple[str, int | None]:
    """What an upload holds → (kind, rows); DatasetError / ConstitutionError say what is wrong."""
    if purpose == "constitution":
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))  # YAML is a superset of JSON
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConstitutionError([f"{filename}: not valid YAML or JSON: {e}"]) from None
        if not isinstance(data, dict):
            raise ConstitutionError([f"{filename}: expected a mapping at the top level, got {type(data).__name__}"])
        constitution.parse(data, name=str(data.get("name", Path(filename).stem)))
        return "constitution", None
    kind, rows = dataset.load(path)
    return kind, len(rows)


# -- routes ---------------------------------------------------------------------------


class FilePublic(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int  # unix seconds, as OpenAI's
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"  # checked on upload: a stored file is usable
    kind: str  # charter: sft | preference | prompts | constitution
    rows: int | None  # charter: dataset rows

    @classmethod
    def of(cls, f: File) -> FilePublic:
        return cls(
            id=f.id,
            bytes=f.bytes,
            created_at=int(f.created_at.timestamp()),
            filename=f.filename,
            purpose=f.purpose,
            kind=f.kind,
            rows=f.rows,
        )


class FilesPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[FilePublic]
    has_more: bool
    first_id: str | None
    last_id: str | None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


FilesDep = Annotated[FileStore, Depends(FileStore.of)]
router = APIRouter(prefix="/v1/files", tags=["files"], route_class=OpenAIRoute)


# Plain defs: they read and write files, so they run in the threadpool.
@router.post("", status_code=200)
def create_file(
    file: UploadFile,
    purpose: Annotated[str, Form(description="fine-tune (a JSONL dataset) or constitution (YAML or JSON)")],
    files: FilesDep,
    principal: PrincipalDep,
    request: Request,
) -> FilePublic:
    """Upload a dataset or a constitution; it is checked before it is stored."""
    if purpose not in PURPOSES:
        raise OpenAIError(
            400, f"purpose {purpose!r} is not supported; use one of {', '.join(PURPOSES)}", "purpose", "invalid_purpose"
        )
    limit = request.app.state.settings.max_upload_bytes
    filename = Path(file.filename or "upload").name[-200:] or "upload"
    files.root.mkdir(parents=True, exist_ok=True)
    tmp = files.root / f".tmp-{new_file_id()}"
    try:
        with open(tmp, "wb") as out:
            size = 0
            while chunk := file.file.read(CHUNK):
                size += len(chunk)
                if size > limit:
                    raise OpenAIError(
                        413,
                        f"{filename} is larger than the upload limit of {limit} bytes "
                        "(CHARTER_MAX_UPLOAD_BYTES); split it or ask the operator to raise the limit",
                        "file",
                        "file_too_large",
                    )
                out.write(chunk)
        try:
            kind, rows = check(tmp, purpose, filename)
        except dataset.DatasetError as e:
            raise OpenAIError(400, f"{filename}: {e}", "file", "invalid_file_format") from None
        except ConstitutionError as e:
            raise OpenAIError(400, f"{filename}: {e}", "file", "invalid_constitution") from None
        return FilePublic.of(
            files.add(tmp, tenant=principal.tenant, filename=filename, purpose=purpose, kind=kind, rows=rows)
        )
    finally:
        tmp.unlink(missing_ok=True)


@router.get("")
def read_files(
    files: FilesDep,
    principal: PrincipalDep,
    purpose: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
    after: str | None = None,
) -> FilesPublic:
    """The caller's files, newest first."""
    rows = files.list(principal.scope, purpose, limit + 1, after)
    page = [FilePublic.of(f) for f in rows[:limit]]
    return FilesPublic(
        data=page,
        has_more=len(rows) > limit,
        first_id=page[0].id if page else None,
        last_id=page[-1].id if page else None,
    )


@router.get("/{file_id}")
def read_file(file_id: str, files: FilesDep, principal: PrincipalDep) -> FilePublic:
    """One file's record."""
    return FilePublic.of(files.get(file_id, principal.scope))


@router.get("/{file_id}/content", response_class=FileResponse)
def read_file_content(file_id: str, files: FilesDep, principal: PrincipalDep) -> FileResponse:
    """The file's bytes, as uploaded."""
    row = files.get(file_id, principal.scope)
    return FileResponse(files.root / row.id, filename=row.filename, media_type="application/octet-stream")


@router.delete("/{file_id}")
def delete_file(file_id: str, files: FilesDep, principal: PrincipalDep) -> FileDeleted:
    """Delete a file; jobs already submitted with it fail when they start if they have not read it yet."""
    files.delete(file_id, principal.scope)
    return FileDeleted(id=file_id)
