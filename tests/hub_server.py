"""A small stand-in for the Hugging Face hub on 127.0.0.1, with switchable faults.

Serves ``/{owner}/{name}/resolve/{revision}/{file}`` for HEAD and GET (with ``Range``), sending
``X-Repo-Commit``, a quoted ``ETag`` and ``Content-Length`` like the real hub, and 404s with
``X-Error-Code: RepoNotFound | RevisionNotFound | EntryNotFound``. It counts the body bytes it sends.
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

ROUTE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit sha -> files
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit sha


@dataclass
class Log:
    method: str
    path: str
    range: str | None
    sent: int


class Hub:
    """The server's state: repos, a fault to inject (``truncate``, ``corrupt``, ``drop``) and a request log."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.fault: str | None = None
        self.fault_files: tuple[str, ...] = (".safetensors", ".bin")
        self.log: list[Log] = []
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def add(self, repo: str, commit: str, files: dict[str, bytes], branches: tuple[str, ...] = ()) -> None:
        r = self.repos.setdefault(repo, Repo())
        r.commits[commit] = files
        r.branches.update(dict.fromkeys(branches, commit))

    @property
    def bytes_sent(self) -> int:
        return sum(e.sent for e in self.log)

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> Hub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                hub._serve(self, body=False)

            def do_GET(self) -> None:
                hub._serve(self, body=True)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _error(self, h: BaseHTTPRequestHandler, code: str, commit: str | None = None) -> None:
        h.send_response(404)
        h.send_header("X-Error-Code", code)
        h.send_header("X-Error-Message", code)
        if commit:
            h.send_header("X-Repo-Commit", commit)
        h.send_header("Content-Length", "0")
        h.end_headers()

    def _serve(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        m = ROUTE.match(h.path.split("?")[0])
        repo = self.repos.get(m.group("repo")) if m else None
        if m is None or repo is None:
            return self._error(h, "RepoNotFound")
        rev = unquote(m.group("rev"))
        commit = repo.branches.get(rev, rev)
        if commit not in repo.commits:
            return self._error(h, "RevisionNotFound")
        name = unquote(m.group("file"))
        data = repo.commits[commit].get(name)
        if data is None:
            return self._error(h, "EntryNotFound", commit)
        faulty = self.fault is not None and name.endswith(self.fault_files)
        payload = data
        if body and faulty and self.fault == "corrupt":  # wrong bytes, right size
            payload = bytes(b ^ 0xFF for b in data[:64]) + data[64:]
        status, start, end = 200, 0, len(payload)
        rng = h.headers.get("Range")
        if body and rng and (r := re.fullmatch(r"bytes=(\d+)-(\d*)", rng)):
            start = int(r.group(1))
            end = min(int(r.group(2)) + 1, len(payload)) if r.group(2) else len(payload)
            status = 206
        chunk = payload[start:end]
        if body and faulty and self.fault == "truncate":  # a complete response, but short
            chunk = chunk[: len(chunk) // 2]
        h.send_response(status)
        h.send_header("X-Repo-Commit", commit)
        h.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        h.send_header("Content-Length", str(len(chunk) if body else len(data)))
        h.send_header("Accept-Ranges", "bytes")
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(payload)}")
        if body and faulty and self.fault == "drop":  # promise everything, send part, hang up
            h.send_header("Connection", "close")
            h.end_headers()
            sent = 0 if rng else len(chunk) // 2
            h.wfile.write(chunk[:sent])
            h.wfile.flush()
            h.close_connection = True
            self._record(h, body, sent)
            return None
        h.end_headers()
        if body:
            h.wfile.write(chunk)
        self._record(h, body, len(chunk) if body else 0)
        return None

    def _record(self, h: BaseHTTPRequestHandler, body: bool, sent: int) -> None:
        with self.lock:
            self.log.append(Log("GET" if body else "HEAD", h.path, h.headers.get("Range"), sent))
