"""A typed client for berth's HTTP API.

``Berth(url, api_key)`` (defaults: ``BERTH_URL``, ``BERTH_TOKEN``) offers boxes, exec, files,
sessions, their event stream (resumed after a dropped connection from the last ``seq`` seen)
and usage. Errors are :class:`BerthError` carrying the HTTP status and the server's
``{"error": {"code", "message"}}``. Standard library only (``urllib``); blocking calls.

:mod:`berth.agent_sdk` runs the Claude Agent SDK's CLI in a berth box.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Iterator, Optional, TypedDict, Union

__all__ = [
    "Berth",
    "BerthError",
    "Box",
    "Session",
    "Event",
    "ExecResult",
]


class Box(TypedDict, total=False):
    id: str
    state: str
    lifecycle: str
    backend: str
    created_at: str


class Session(TypedDict, total=False):
    id: str
    box_id: str
    state: str
    state_reason: Optional[str]
    agent: dict[str, Any]
    agent_session_id: Optional[str]
    last_seq: int


class Event(TypedDict):
    seq: int
    session_id: str
    ts: str
    type: str
    data: Any


class ExecResult(TypedDict):
    exit_code: Optional[int]
    signal: Optional[int]
    timed_out: bool
    oom_killed: bool
    stdout: str
    stderr: str
    truncated: bool


class BerthError(Exception):
    """An error answer from berth (or no answer: status 0)."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


def _url_and_key(url: Optional[str], api_key: Optional[str]) -> tuple[str, str]:
    url = url or os.environ.get("BERTH_URL")
    api_key = api_key or os.environ.get("BERTH_TOKEN")
    if not url:
        raise BerthError(0, "config", "no berth URL: pass url= or set BERTH_URL")
    if not api_key:
        raise BerthError(0, "config", "no API key: pass api_key= or set BERTH_TOKEN")
    return url.rstrip("/"), api_key


class Berth:
    """berth's API. Every method is one HTTP request except :meth:`events`."""

    def __init__(self, url: Optional[str] = None, api_key: Optional[str] = None, timeout: float = 60.0):
        self.url, self.api_key = _url_and_key(url, api_key)
        self.timeout = timeout

    # ---- plumbing ----

    def _request(self, method: str, path: str, body: Any = None, raw: Optional[bytes] = None,
                 query: Optional[dict[str, Any]] = None) -> bytes:
        url = self.url + path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        headers = {"Authorization": f"Bearer {self.api_key}"}
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return r.read()
        except urllib.error.HTTPError as e:
            raise _error(e.code, e.read()) from None
        except urllib.error.URLError as e:
            raise BerthError(0, "unreachable", str(e.reason)) from None

    def _json(self, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        out = self._request(method, path, body, **kw)
        return json.loads(out) if out else None

    # ---- boxes ----

    def create_box(self, spec: Optional[dict[str, Any]] = None) -> Box:
        return self._json("POST", "/v1/boxes", spec or {})

    def get_box(self, box_id: str) -> Box:
        return self._json("GET", f"/v1/boxes/{_q(box_id)}")

    def list_boxes(self) -> list[Box]:
        return self._json("GET", "/v1/boxes")["items"]

    def delete_box(self, box_id: str) -> Box:
        return self._json("DELETE", f"/v1/boxes/{_q(box_id)}")

    def exec(self, box_id: str, argv: list[str], *, stdin: Optional[str] = None, cwd: Optional[str] = None,
             env: Optional[dict[str, str]] = None, timeout_s: Optional[int] = None,
             model: bool = False) -> ExecResult:
        """Run a command in the box; ``model=True`` gives it ``ANTHROPIC_BASE_URL`` and a
        token of its own (metered to the box) so an Agent SDK app in the box needs no set-up."""
        body: dict[str, Any] = {"argv": argv}
        for k, v in (("stdin", stdin), ("cwd", cwd), ("env", env), ("timeout_s", timeout_s)):
            if v is not None:
                body[k] = v
        if model:
            body["model"] = True
        return self._json("POST", f"/v1/boxes/{_q(box_id)}/exec", body)

    # ---- files (paths relative to the box's /workspace) ----

    def read_file(self, box_id: str, path: str) -> bytes:
        return self._request("GET", f"/v1/boxes/{_q(box_id)}/files/{_qp(path)}")

    def write_file(self, box_id: str, path: str, data: Union[bytes, str]) -> None:
        raw = data.encode() if isinstance(data, str) else data
        self._request("PUT", f"/v1/boxes/{_q(box_id)}/files/{_qp(path)}", raw=raw)

    def list_dir(self, box_id: str, path: str = "") -> dict[str, Any]:
        suffix = f"/{_qp(path)}" if path else "/"
        return self._json("GET", f"/v1/boxes/{_q(box_id)}/files{suffix}")

    def delete_file(self, box_id: str, path: str) -> None:
        self._request("DELETE", f"/v1/boxes/{_q(box_id)}/files/{_qp(path)}")

    # ---- sessions ----

    def create_session(self, agent: dict[str, Any], *, box: Union[str, dict[str, Any], None] = None,
                       prompt: Optional[str] = None, workdir: Optional[str] = None,
                       keep_open: bool = False) -> Session:
        body: dict[str, Any] = {"agent": agent}
        if box is not None:
            body["box"] = box
        if prompt is not None:
            body["prompt"] = prompt
        if workdir is not None:
            body["workdir"] = workdir
        if keep_open:
            body["keep_open"] = True
        return self._json("POST", "/v1/sessions", body)

    def get_session(self, session_id: str) -> Session:
        return self._json("GET", f"/v1/sessions/{_q(session_id)}")

    def list_sessions(self, box_id: Optional[str] = None) -> list[Session]:
        return self._json("GET", "/v1/sessions", query={"box": box_id})["items"]

    def delete_session(self, session_id: str) -> Session:
        return self._json("DELETE", f"/v1/sessions/{_q(session_id)}")

    def send_message(self, session_id: str, content: Union[str, list[Any]]) -> None:
        self._json("POST", f"/v1/sessions/{_q(session_id)}/messages", {"content": content})

    def interrupt(self, session_id: str) -> None:
        self._json("POST", f"/v1/sessions/{_q(session_id)}/interrupt", {})

    def events(self, session_id: str, *, after: int = 0, retries: int = 5) -> Iterator[Event]:
        """The session's events from ``seq > after``, live, until the server ends the stream.

        A dropped connection is resumed from the last ``seq`` seen (at most ``retries`` times in
        a row, with backoff), so nothing is missed or repeated.
        """
        last = after
        failures = 0
        while True:
            req = urllib.request.Request(
                f"{self.url}/v1/sessions/{_q(session_id)}/events?after={last}",
                headers={"Authorization": f"Bearer {self.api_key}", "Accept": "text/event-stream"},
            )
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    failures = 0
                    for ev in _sse(r):
                        if ev["seq"] > last:
                            last = ev["seq"]
                            yield ev
                return
            except urllib.error.HTTPError as e:
                raise _error(e.code, e.read()) from None
            except (urllib.error.URLError, OSError, ConnectionError):
                failures += 1
                if failures > retries:
                    raise
                time.sleep(min(0.2 * 2 ** failures, 5.0))

    # ---- usage ----

    def session_usage(self, session_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/sessions/{_q(session_id)}/usage")

    def usage(self, *, group_by: Optional[str] = None, since: Optional[str] = None,
              until: Optional[str] = None) -> dict[str, Any]:
        return self._json("GET", "/v1/usage", query={"group_by": group_by, "from": since, "to": until})


def _q(s: str) -> str:
    return urllib.parse.quote(s, safe="")


def _qp(path: str) -> str:
    return "/".join(urllib.parse.quote(p, safe="") for p in path.lstrip("/").split("/"))


def _error(status: int, body: bytes) -> BerthError:
    try:
        e = json.loads(body)["error"]
        return BerthError(status, e.get("code", ""), e.get("message", ""))
    except (ValueError, KeyError, TypeError):
        return BerthError(status, "http", body.decode(errors="replace")[:500])


def _sse(stream: Any) -> Iterator[Event]:
    """Events of an SSE body (berth sends one JSON event per ``data:`` line)."""
    data: list[str] = []
    kind = ""
    for raw in stream:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if data and kind != "error":
                yield json.loads("\n".join(data))
            elif data:
                e = json.loads("\n".join(data)).get("error", {})
                raise BerthError(0, e.get("code", "stream"), e.get("message", ""))
            data, kind = [], ""
        elif line.startswith("data:"):
            data.append(line[5:].lstrip(" "))
        elif line.startswith("event:"):
            kind = line[6:].strip()
