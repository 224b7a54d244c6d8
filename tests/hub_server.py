"""A loopback stand-in for the Hugging Face Hub: the endpoints ``create_repo`` and ``upload_folder`` call.

It answers every file with upload mode "regular", so files arrive inline in the commit request (no
LFS or Xet storage), keeps repositories in memory, and stops when its ``with`` block ends or after
``lifetime`` seconds, whichever comes first. Point huggingface_hub at :attr:`StandInHub.url` with
``huggingface_hub.constants.ENDPOINT``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

_MAX_BODY = 64 * 2**20
# Best-effort client telemetry: answered 404, so that the client caches nothing in HF_HOME.
_IGNORED = frozenset({"/api/agent-harnesses"})
_UNSERVED = "the stand-in Hub does not serve"
_REPO_OP = re.compile(
    r"^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<op>preupload|commit|branch|discussions)(?:/(?P<arg>.+))?$"
)


@dataclass
class _Repo:
    private: bool
    refs: dict[str, str] = field(default_factory=dict)  # branch or refs/pr/N -> commit id
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit id -> files
    pulls: list[str] = field(default_factory=list)  # titles of pull requests, numbered from 1


@dataclass(frozen=True)
class Request:
    """One request the stand-in received (for tests to check what the client sent)."""

    method: str
    path: str
    authorization: str | None
    handled: bool


class StandInHub:
    """A threaded HTTP server on 127.0.0.1 (a free port) that keeps pushed repositories in memory.

    Args:
        lifetime: seconds after which the server stops even if the test never leaves the ``with`` block.
    """

    def __init__(self, *, lifetime: float = 120.0) -> None:
        self.repos: dict[str, _Repo] = {}
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._timer = threading.Timer(lifetime, self._server.shutdown)
        self._timer.daemon = True

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> StandInHub:
        self._thread.start()
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of ``repo_id`` at a branch or ``refs/pr/N``."""
        repo = self.repos[repo_id]
        return dict(repo.commits[repo.refs[revision]])

    def export(self, repo_id: str, folder: Path, revision: str = "main") -> str:
        """Write the files of a revision into ``folder``; returns the revision's commit id."""
        for path, content in self.files(repo_id, revision).items():
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            (folder / path).write_bytes(content)
        return self.repos[repo_id].refs[revision]

    # --- endpoints (called with the lock held) ----------------------------------------------------------

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, Any]:
        if method == "POST" and path == "/api/repos/create":
            return self._create_repo(json.loads(body))
        if path in _IGNORED:
            return 404, {"error": "not available on the stand-in Hub"}
        match = _REPO_OP.match(path)
        if match is None:
            return 404, {"error": f"{_UNSERVED} {method} {path}"}
        repo = self.repos.get(match["repo"])
        if repo is None:
            return 404, {"error": "Repository not found"}
        op, arg = match["op"], unquote(match["arg"] or "")
        if method == "POST" and op == "preupload":
            files = json.loads(body)["files"]
            modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files]
            return 200, {"files": modes, "commitOid": repo.refs.get(arg)}
        if method == "POST" and op == "commit":
            return self._commit(match["repo"], repo, arg, body)
        if method == "POST" and op == "branch":
            if arg in repo.refs:
                return 409, {"error": "Reference already exists"}
            repo.refs[arg] = repo.refs[json.loads(body or b"{}").get("startingPoint") or "main"]
            return 200, {}
        if method == "POST" and op == "discussions" and not arg:
            request = json.loads(body)
            repo.pulls.append(request["title"])
            repo.refs[f"refs/pr/{len(repo.pulls)}"] = repo.refs["main"]
            return 200, {"num": len(repo.pulls)}
        if method == "GET" and op == "discussions" and arg.isdigit() and 0 < int(arg) <= len(repo.pulls):
            return 200, _pull_request(match["repo"], int(arg), repo.pulls[int(arg) - 1])
        return 404, {"error": f"{_UNSERVED} {method} {path}"}

    def _create_repo(self, request: dict[str, Any]) -> tuple[int, Any]:
        repo_id = f"{request['organization']}/{request['name']}" if request.get("organization") else request["name"]
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
        empty = _commit_id(repo_id.encode(), {})
        private = request.get("visibility") == "private"
        self.repos[repo_id] = _Repo(private=private, refs={"main": empty}, commits={empty: {}})
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}

    def _commit(self, repo_id: str, repo: _Repo, revision: str, body: bytes) -> tuple[int, Any]:
        if revision not in repo.refs:
            return 404, {"error": f"Invalid rev id: {revision}"}
        parent = repo.refs[revision]
        files = dict(repo.commits[parent])
        for line in body.splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "deletedFile":
                files.pop(value["path"], None)
            elif item["key"] == "deletedFolder":
                files = {p: c for p, c in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
            elif item["key"] != "header":
                return 400, {"error": f"the stand-in Hub takes regular files only, not {item['key']!r}"}
        oid = _commit_id(parent.encode(), files)
        repo.commits[oid], repo.refs[revision] = files, oid
        pull = revision.removeprefix("refs/pr/") if revision.startswith("refs/pr/") else None
        return 200, {
            "success": True,
            "commitOid": oid,
            "commitUrl": f"{self.url}/{repo_id}/commit/{oid}",
            "hookOutput": "",
            "pullRequestUrl": f"{self.url}/{repo_id}/discussions/{pull}" if pull else None,
        }


def _commit_id(parent: bytes, files: dict[str, bytes]) -> str:
    digest = hashlib.sha1(parent)  # noqa: S324 - an id, as git's, not a security measure
    for path in sorted(files):
        digest.update(path.encode() + b"\0" + hashlib.sha256(files[path]).digest())
    return digest.hexdigest()


def _pull_request(repo_id: str, num: int, title: str) -> dict[str, Any]:
    return {
        "num": num,
        "title": title,
        "author": {"name": "stand-in"},
        "createdAt": "2026-01-01T00:00:00.000Z",
        "status": "draft",
        "repo": {"name": repo_id, "type": "model"},
        "isPullRequest": True,
        "events": [],
        "changes": {"base": "refs/heads/main"},
        "filesWithConflicts": [],
        "diff": "",
    }


def _handler(hub: StandInHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = 30  # a stalled client cannot hold a server thread forever

        def do_GET(self) -> None:
            self._serve("GET")

        def do_POST(self) -> None:
            self._serve("POST")

        def _serve(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length > _MAX_BODY:
                self._reply(413, {"error": f"request body over {_MAX_BODY} bytes"})
                return
            body = self.rfile.read(length) if length else b""
            path = urlsplit(self.path).path
            with hub._lock:
                status, payload = hub.handle(method, path, body)
                handled = not str(payload.get("error", "")).startswith(_UNSERVED)
                hub.requests.append(Request(method, path, self.headers.get("Authorization"), handled))
            self._reply(status, payload)

        def _reply(self, status: int, payload: Any) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status == 404 and "not found" in str(payload.get("error", "")).lower():
                self.send_header("X-Error-Code", "RepoNotFound")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            """Quiet: tests read ``hub.requests`` instead."""

    return Handler
