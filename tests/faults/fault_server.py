"""A misbehaving OpenAI-compatible judge: the fault the fault tests inject.

    with FaultServer("slow", delay_s=5) as url: ...   # url = http://127.0.0.1:PORT/v1

Modes: `slow` (answers after `delay_s`), `error` (HTTP 503 with a JSON error), `garbage`
(HTTP 200 whose body is not JSON), `nonsense` (a well-formed chat completion whose text
is no verdict and carries no logprobs), `echo` (a healthy judge's short critique). Every request's arrival time is kept in `hits`.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FaultServer:
    def __init__(self, mode: str, delay_s: float = 0.0):
        self.mode, self.delay_s = mode, delay_s
        self.hits: list[tuple[float, str]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._server.block_on_close = False  # a handler still sleeping (mode slow) is not waited for
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> str:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self.url

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()

    def completion_hits(self) -> list[float]:
        return [t for t, path in self.hits if path.endswith("/chat/completions")]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fault = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except OSError:  # the client gave up (timeout): that is the point
                    pass

            def do_GET(self) -> None:
                fault.hits.append((time.monotonic(), self.path))
                if self.path.endswith("/models"):
                    self._send(
                        200, json.dumps({"object": "list", "data": [{"id": "judge", "object": "model"}]}).encode()
                    )
                else:
                    self._send(404, b'{"error": "not found"}')

            def do_POST(self) -> None:
                fault.hits.append((time.monotonic(), self.path))
                self.rfile.read(int(self.headers.get("content-length", 0)))
                if fault.mode == "slow":
                    time.sleep(fault.delay_s)
                    self._send(200, json.dumps(_completion("late")).encode())
                elif fault.mode == "error":
                    self._send(503, b'{"error": {"message": "engine overloaded", "type": "ServiceUnavailable"}}')
                elif fault.mode == "garbage":
                    self._send(200, b"<html>\x00\xff not json at all")
                elif fault.mode == "nonsense":
                    self._send(200, json.dumps(_completion("")).encode())
                elif fault.mode == "echo":
                    self._send(200, json.dumps(_completion("The response could be kinder.")).encode())
                else:
                    self._send(500, b"{}")

        return Handler


def _completion(text: str) -> dict[str, Any]:
    return {
        "id": "x",
        "object": "chat.completion",
        "created": 0,
        "model": "judge",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
