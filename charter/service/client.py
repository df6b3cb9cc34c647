"""A light client of the charter API (httpx only, no torch): for scripts, notebooks and the CLI.

    from charter.service.client import Client
    c = Client("http://127.0.0.1:8400")
    job = c.create_job(yaml.safe_load(open("examples/demo.yaml")))
    job = c.wait(job["id"], on_event=print)        # follows events until the job ends
    print(job["status"], job["report"])

Errors raise ClientError, whose message is the service's own `detail`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

TERMINAL = ("succeeded", "failed", "cancelled")


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
    def __init__(self, url: str = "http://127.0.0.1:8400", api_key: str | None = None, timeout: float = 30.0):
        self.url = url.rstrip("/")
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ClientError(0, f"cannot reach charter at {self.url} ({exc}); start it with `charter serve`") from None
        if response.is_success:
            return response.json()
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text or response.reason_phrase
        raise ClientError(response.status_code, detail)

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

    def wait(
        self,
        job_id: str,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        poll_s: float = 1.0,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """Follow a job's events (each passed to `on_event`) until it ends; returns the final job."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        after = 0
        while True:
            job = self.get_job(job_id)  # read before draining, so no event of a finished job is missed
            while True:
                page = self.events(job_id, after=after, limit=500)
                for event in page:
                    after = event["id"]
                    if on_event is not None:
                        on_event(event)
                if len(page) < 500:
                    break
            if job["status"] in TERMINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout_s} s")
            time.sleep(poll_s)
