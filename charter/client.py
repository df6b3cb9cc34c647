"""The charter client for notebooks, scripts and the CLI: httpx only, no torch.

    import charter
    client = charter.Client("http://127.0.0.1:8400", api_key=None)
    f = client.files.upload("sft.jsonl")                      # checked on upload
    job = client.jobs.create("examples/demo.yaml")            # a path, or a spec dict
    job.wait()                                                # a progress bar (Jupyter or terminal)
    job.metrics()                                             # training metrics as a pandas DataFrame
    job.plot()                                                # loss over steps (matplotlib)
    job.download("adapter", "out/")                           # GET /v1/jobs/{id}/artifacts/{name}

Errors raise ClientError, whose message is the service's own `detail`. pandas, matplotlib and
tqdm are imported only by the methods that use them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

TERMINAL = ("succeeded", "failed", "cancelled")
PAGE = 500


class ClientError(Exception):
    """The service refused a request, or could not be reached (status 0)."""

    def __init__(self, status: int, detail: Any):
        self.status, self.detail = status, detail
        super().__init__(f"HTTP {status}: {format_detail(detail)}" if status else format_detail(detail))


def format_detail(detail: Any) -> str:
    """The API's `detail` (a message, or a list of {loc, msg}) as one readable text."""
    if isinstance(detail, list):
        lines = []
        for err in detail:
            if isinstance(err, dict) and "msg" in err:
                loc = ".".join(str(p) for p in err.get("loc") or [])
                lines.append(f"{loc}: {err['msg']}" if loc else str(err["msg"]))
            else:
                lines.append(str(err))
        return "; ".join(lines)
    return str(detail)


class Client:
    """One charter service. `jobs` and `files` hold the notebook-friendly calls; the
    methods below them return the API's JSON as dicts (what the CLI prints)."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:8400",
        api_key: str | None = None,
        timeout: float = 30.0,
        http_client: httpx.Client | None = None,
    ):
        self.url = url.rstrip("/")
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        # http_client: bring your own (proxies, TLS settings, or FastAPI's TestClient in tests)
        self._http = http_client or httpx.Client(base_url=self.url, headers=headers, timeout=timeout)
        if http_client is not None:
            self._http.headers.update(headers)
        self.jobs = Jobs(self)
        self.files = Files(self)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"charter.Client({self.url!r})"

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ClientError(0, f"cannot reach charter at {self.url} ({exc}); start it with `charter serve`") from None
        if response.is_success:
            return response
        try:
            body = response.json()
            detail = body.get("detail") or (body.get("error") or {}).get("message") or response.text
        except ValueError:
            detail = response.text or response.reason_phrase
        raise ClientError(response.status_code, detail)

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._send(method, path, **kwargs).json()

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/healthz")

    def create_job(self, spec: dict[str, Any]) -> dict[str, Any]:
        return self._request("POST", "/v1/jobs", json=spec)

    def get_job(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/jobs/{job_id}")

    def list_jobs(self, limit: int = 50, status: str | None = None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit} | ({"status": status} if status else {})
        return self._request("GET", "/v1/jobs", params=params)["data"]

    def events(self, job_id: str, after: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        return self._request("GET", f"/v1/jobs/{job_id}/events", params={"after": after, "limit": limit})["data"]

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._request("POST", f"/v1/jobs/{job_id}/cancel")

    def follow(
        self, job_id: str, after: int = 0, poll_s: float = 1.0, timeout_s: float | None = None
    ) -> Iterator[dict[str, Any]]:
        """A job's events as they come, until it ends; the final job is the generator's return value."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            job = self.get_job(job_id)  # read before draining, so no event of a finished job is missed
            while True:
                page = self.events(job_id, after=after, limit=PAGE)
                for event in page:
                    after = event["id"]
                    yield event
                if len(page) < PAGE:
                    break
            if job["status"] in TERMINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout_s} s")
            time.sleep(poll_s)

    def wait(
        self,
        job_id: str,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        poll_s: float = 1.0,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """Follow a job's events (each passed to `on_event`) until it ends; returns the final job."""
        events = self.follow(job_id, poll_s=poll_s, timeout_s=timeout_s)
        while True:
            try:
                event = next(events)
            except StopIteration as stop:
                return stop.value
            if on_event is not None:
                on_event(event)


class Jobs:
    def __init__(self, client: Client):
        self._c = client

    def create(self, spec: dict[str, Any] | str | os.PathLike[str]) -> Job:
        """Submit a job spec (a dict, or the path of a YAML/JSON file); it is validated before it is queued."""
        if not isinstance(spec, dict):
            import yaml

            spec = yaml.safe_load(Path(spec).read_text())
        return Job(self._c, self._c.create_job(spec))

    def get(self, job_id: str) -> Job:
        return Job(self._c, self._c.get_job(job_id))

    def list(self, limit: int = 50, status: str | None = None) -> list[Job]:
        return [Job(self._c, j) for j in self._c.list_jobs(limit, status)]


class Job:
    """A job as last read from the service (`data`); `refresh()` reads it again."""

    def __init__(self, client: Client, data: dict[str, Any]):
        self._c, self.data = client, data
        self.id: str = data["id"]

    def __repr__(self) -> str:
        return f"<charter.Job {self.id} {self.data.get('name')!r} {self.status}>"

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    @property
    def status(self) -> str:
        return self.data["status"]

    @property
    def report(self) -> dict[str, Any] | None:
        return self.data.get("report")

    @property
    def artifacts(self) -> dict[str, Any]:
        return self.data.get("artifacts") or {}

    def refresh(self) -> Job:
        self.data = self._c.get_job(self.id)
        return self

    def cancel(self) -> Job:
        self.data = self._c.cancel(self.id)
        return self

    def events(self, follow: bool = False, after: int = 0) -> Iterator[dict[str, Any]]:
        """The job's events, oldest first; with `follow`, keep going until the job ends."""
        if follow:
            yield from self._c.follow(self.id, after=after)
            return
        while page := self._c.events(self.id, after=after, limit=PAGE):
            yield from page
            after = page[-1]["id"]

    def wait(self, progress: bool = True, timeout_s: float | None = None, poll_s: float = 1.0) -> Job:
        """Block until the job ends, with a progress bar per stage (tqdm: Jupyter or terminal)."""
        bar = _Progress() if progress else None
        try:
            self.data = self._c.wait(self.id, on_event=bar.update if bar else None, poll_s=poll_s, timeout_s=timeout_s)
        finally:
            if bar:
                bar.close()
        return self

    def metrics(self) -> Any:
        """Training metrics (one row per logging step: step, loss, learning_rate, …) as a pandas DataFrame."""
        import pandas as pd

        rows = [{"time": e["time"], **e["data"]} for e in self.events() if e["type"] == "metrics"]
        frame = pd.DataFrame(rows)
        if not frame.empty:
            frame["time"] = pd.to_datetime(frame["time"])
        return frame

    def plot(self, keys: tuple[str, ...] = ("loss",), ax: Any = None) -> Any:
        """Metrics over steps (default: the training loss) with matplotlib; returns the figure."""
        import matplotlib.pyplot as plt

        frame = self.metrics()
        if ax is None:
            _, ax = plt.subplots(figsize=(6, 3.5))
        for key in keys:
            if not frame.empty and key in frame:
                points = frame.dropna(subset=[key])
                ax.plot(points["step"], points[key], marker="o", label=key)
        ax.set_xlabel("step")
        ax.set_title(f"{self.data.get('name')} ({self.id})")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        return ax.figure

    def download(self, artifact: str, path: str | os.PathLike[str] = ".") -> Path:
        """Save an artifact (GET /v1/jobs/{id}/artifacts/{name}); into `path` if it is a folder. Returns the file."""
        dest = Path(path)
        with self._c._http.stream("GET", f"/v1/jobs/{self.id}/artifacts/{artifact}") as response:
            if not response.is_success:
                response.read()
                raise ClientError(response.status_code, _detail(response))
            if dest.is_dir() or str(path).endswith(os.sep):
                dest.mkdir(parents=True, exist_ok=True)
                dest = dest / (_filename(response) or artifact)
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.part")
            with open(tmp, "wb") as out:
                for chunk in response.iter_bytes():
                    out.write(chunk)
            tmp.replace(dest)  # a complete file or none
        return dest


class Files:
    def __init__(self, client: Client):
        self._c = client

    def upload(self, path: str | os.PathLike[str], purpose: str = "fine-tune") -> dict[str, Any]:
        """Upload a JSONL dataset (purpose fine-tune) or a constitution (purpose constitution)."""
        path = Path(path)
        with open(path, "rb") as f:
            return self._c._request("POST", "/v1/files", files={"file": (path.name, f)}, data={"purpose": purpose})

    def list(self, purpose: str | None = None) -> list[dict[str, Any]]:
        return self._c._request("GET", "/v1/files", params={"purpose": purpose} if purpose else {})["data"]

    def get(self, file_id: str) -> dict[str, Any]:
        return self._c._request("GET", f"/v1/files/{file_id}")

    def content(self, file_id: str) -> bytes:
        return self._c._send("GET", f"/v1/files/{file_id}/content").content

    def delete(self, file_id: str) -> dict[str, Any]:
        return self._c._request("DELETE", f"/v1/files/{file_id}")


def _detail(response: httpx.Response) -> Any:
    try:
        body = response.json()
        return body.get("detail") or (body.get("error") or {}).get("message") or response.text
    except ValueError:
        return response.text or response.reason_phrase


def _filename(response: httpx.Response) -> str | None:
    disposition = response.headers.get("content-disposition", "")
    for part in disposition.split(";"):
        key, _, value = part.strip().partition("=")
        if key == "filename" and value:
            return Path(value.strip('"')).name
    return None


class _Progress:
    """One tqdm bar per stage, fed by the job's events."""

    def __init__(self) -> None:
        self._bar: Any = None
        self._stage: str | None = None

    def update(self, event: dict[str, Any]) -> None:
        data = event["data"]
        if event["type"] == "message" and self._bar is not None:
            self._bar.write(f"[{event['level']}] {data.get('message')}")
            return
        if event["type"] != "stage":
            return
        stage, state = data.get("stage"), data.get("state")
        if state in ("started", "progress") and (stage != self._stage or self._bar is None):
            self._open(stage, data.get("total"))
        if self._bar is None or stage != self._stage:
            return
        if state in ("started", "progress"):
            if data.get("total"):
                self._bar.total = data["total"]
            self._bar.n = data.get("done") or 0
            extra = {k: v for k, v in data.items() if k in ("loss", "tokens_per_s", "prompt_tokens_per_s")}
            self._bar.set_postfix(extra, refresh=False)
            self._bar.refresh()
        elif state == "done":
            if self._bar.total:
                self._bar.n = self._bar.total
            self._bar.set_postfix({k: v for k, v in data.items() if k not in ("stage", "state")}, refresh=False)
            self.close()

    def _open(self, stage: str | None, total: int | None) -> None:
        from tqdm.auto import tqdm

        self.close()
        self._stage = stage
        self._bar = tqdm(total=total, desc=stage, unit="row" if stage != "train" else "step", leave=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
