"""A loopback stand-in for the Hugging Face Hub API: the endpoints huggingface_hub 2.x calls for an ``upload_folder``
push, branches, and a ``snapshot_download``.

Writes: ``POST /api/repos/create``, ``POST|DELETE /api/models/{repo}/branch/{name}``,
``POST /api/models/{repo}/preupload/{rev}`` and ``POST /api/models/{repo}/commit/{rev}`` (NDJSON, base64 files).
Reads: ``GET /api/whoami-v2``, ``GET /api/models/{repo}/refs``, ``GET /api/models/{repo}/revision/{rev}``,
``GET /api/models/{repo}/tree/{rev}`` and ``HEAD|GET /{repo}/resolve/{rev}/{path}``.
The preupload answer marks every file ``regular``: the real Hub decides upload modes server-side, and inline uploads
keep Xet/LFS storage (a separate protocol and server) out of this test. Every commit gets an id and its tree is kept,
so a revision is a branch name or a commit id, as on the Hub. Everything received is recorded. ``fail_commits = N``
makes the next N commits answer 507 (a server error huggingface_hub does not retry itself, so each failure reaches
the caller at once); ``commit_delay`` seconds slow every commit (a slow link).

Faults: ``hub.fail("create" | "commit", *faults)`` queues faults for the next repo creations or commits (calls that
huggingface_hub makes once, without its own retries), one per call: a status code (an ``HfHubHTTPError`` in the
client), ``(429, seconds)`` for a rate limit with ``Retry-After``, or ``"disconnect"`` (the connection closed without
an answer: an ``httpx`` transport error). ``FakeHub(port=P, started=False)`` listens nowhere until :meth:`start`:
until then every call meets a real connection refused.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

EMPTY_COMMIT = "0" * 40


class FakeHub:
    """Start with ``with FakeHub() as hub:``; ``hub.endpoint`` is the URL for ``HF_ENDPOINT``."""

    def __init__(self, port: int | None = None, started: bool = True) -> None:
        self.requests: list[dict] = []  # method, path, authorization, json body (when JSON)
        # repo_id -> {"private": bool, "branches": {name: {path: bytes}}, "heads": {name: commit id}}
        self.repos: dict[str, dict] = {}
        self.commits: list[dict] = []
        self.trees: dict[str, dict[str, bytes]] = {EMPTY_COMMIT: {}}  # commit id -> its files
        self.fail_commits = 0
        self.commit_delay = 0.0
        self.faults: dict[str, list] = {"create": [], "commit": []}
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, status: int, data: bytes, headers: dict, body: bool = True) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def _reply(self, status: int, body: dict | list, error_code: str | None = None) -> None:
                headers = {"Content-Type": "application/json", **({"X-Error-Code": error_code} if error_code else {})}
                self._send(status, json.dumps(body).encode(), headers, self.command != "HEAD")

            def _fault(self, where: str) -> bool:
                """Answer with the next queued fault for ``where``; False when none is queued."""
                with hub.lock:
                    if not hub.faults[where]:
                        return False
                    fault = hub.faults[where].pop(0)
                if fault == "disconnect":
                    self.close_connection = True  # nothing written: the client sees the server hang up
                    return True
                status, wait = fault if isinstance(fault, tuple) else (fault, None)
                headers = {
                    "Content-Type": "application/json",
                    **({"Retry-After": str(wait)} if wait is not None else {}),
                }
                self._send(
                    status, json.dumps({"error": f"the fake hub answers {status} on purpose"}).encode(), headers
                )
                return True

            def _record(self, raw: bytes = b"") -> tuple[str, dict]:
                path = unquote(urlparse(self.path).path)
                record = {"method": self.command, "path": path, "auth": self.headers.get("authorization")}
                hub.requests.append(record)
                return path, record

            def _repo(self, repo_id: str) -> dict | None:
                repo = hub.repos.get(repo_id)
                if repo is None:
                    self._reply(404, {"error": f"repository {repo_id} not found"}, "RepoNotFound")
                return repo

            def _commit_of(self, repo: dict, revision: str) -> str | None:
                commit = repo["heads"].get(revision, revision if revision in hub.trees else None)
                if commit is None:
                    self._reply(404, {"error": f"revision {revision} not found"}, "RevisionNotFound")
                return commit

            def do_GET(self) -> None:
                path, _ = self._record()
                if path == "/api/whoami-v2":
                    return self._reply(200, {"name": "fake-user", "type": "user"})
                parts = path.split("/")
                if parts[1:3] == ["api", "models"] and len(parts) >= 6:
                    return self._read_api(f"{parts[3]}/{parts[4]}", parts[5], parts[6:])
                if len(parts) >= 6 and parts[3] == "resolve":
                    return self._resolve(f"{parts[1]}/{parts[2]}", parts[4], "/".join(parts[5:]))
                self._reply(404, {"error": f"not implemented in the fake hub: GET {path}"})

            do_HEAD = do_GET

            def _read_api(self, repo_id: str, action: str, rest: list[str]) -> None:
                repo = self._repo(repo_id)
                if repo is None:
                    return
                if action == "refs":
                    branches = [
                        {"name": n, "ref": f"refs/heads/{n}", "targetCommit": c} for n, c in repo["heads"].items()
                    ]
                    return self._reply(200, {"branches": branches, "tags": [], "converts": []})
                commit = self._commit_of(repo, rest[0] if rest else "main")
                if commit is None:
                    return
                files = hub.trees[commit]
                if action == "revision":
                    siblings = [{"rfilename": p} for p in sorted(files)]
                    return self._reply(200, {"id": repo_id, "sha": commit, "siblings": siblings, "private": True})
                if action == "tree":
                    entries = [
                        {"type": "file", "path": p, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                        for p, d in sorted(files.items())
                    ]
                    return self._reply(200, entries)
                self._reply(404, {"error": f"not implemented in the fake hub: GET {action}"})

            def _resolve(self, repo_id: str, revision: str, name: str) -> None:
                repo = self._repo(repo_id)
                commit = self._commit_of(repo, revision) if repo is not None else None
                if commit is None:
                    return
                data = hub.trees[commit].get(name)
                if data is None:
                    return self._reply(404, {"error": f"{name} not found"}, "EntryNotFound")
                etag = f'"{hashlib.sha1(data).hexdigest()}"'
                headers = {"X-Repo-Commit": commit, "ETag": etag, "Content-Type": "application/octet-stream"}
                self._send(200, data, headers, self.command == "GET")

            def do_DELETE(self) -> None:
                path, _ = self._record()
                parts = path.split("/")
                if len(parts) >= 7 and parts[1:3] == ["api", "models"] and parts[5] == "branch":
                    repo = self._repo(f"{parts[3]}/{parts[4]}")
                    if repo is None:
                        return
                    name = "/".join(parts[6:])
                    if name not in repo["branches"]:
                        return self._reply(404, {"error": f"branch {name} not found"}, "RevisionNotFound")
                    del repo["branches"][name], repo["heads"][name]
                    return self._reply(200, {})
                self._reply(404, {"error": f"not implemented in the fake hub: DELETE {path}"})

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                raw = self.rfile.read(length)
                path, record = self._record()
                if path == "/api/repos/create":
                    if self._fault("create"):
                        return
                    body = json.loads(raw)
                    record["json"] = body
                    repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
                    hub.repos.setdefault(
                        repo_id,
                        {
                            "private": body.get("visibility") == "private",
                            "branches": {"main": {}},
                            "heads": {"main": EMPTY_COMMIT},
                        },
                    )
                    return self._reply(200, {"url": f"{hub.endpoint}/{repo_id}"})
                parts = path.split("/")  # ['', 'api', 'models', owner, name, action, revision]
                if len(parts) >= 7 and parts[1:3] == ["api", "models"]:
                    repo_id, action, revision = f"{parts[3]}/{parts[4]}", parts[5], "/".join(parts[6:])
                    repo = self._repo(repo_id)
                    if repo is None:
                        return
                    if action == "branch":
                        if revision not in repo["branches"]:
                            repo["branches"][revision] = dict(repo["branches"]["main"])
                            repo["heads"][revision] = repo["heads"]["main"]
                        return self._reply(200, {})
                    if action == "preupload":
                        files = json.loads(raw)["files"]
                        record["json"] = {"files": [{"path": f["path"], "size": f["size"]} for f in files]}
                        answer = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                        return self._reply(200, {"files": answer})
                    if action == "commit":
                        return self._commit(repo_id, repo, revision, raw)
                self._reply(404, {"error": f"not implemented in the fake hub: POST {path}"})

            def _commit(self, repo_id: str, repo: dict, revision: str, raw: bytes) -> None:
                time.sleep(hub.commit_delay)
                if self._fault("commit"):
                    return
                with hub.lock:
                    if hub.fail_commits > 0:
                        hub.fail_commits -= 1
                        return self._reply(507, {"error": "the fake hub failed this commit on purpose"})
                if revision not in repo["branches"]:
                    return self._reply(404, {"error": f"revision {revision} not found"}, "RevisionNotFound")
                lines = [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
                files = {}
                for line in lines:
                    if line["key"] == "file":
                        files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
                header = next(line["value"] for line in lines if line["key"] == "header")
                with hub.lock:
                    repo["branches"][revision].update(files)
                    oid = hashlib.sha1(f"{len(hub.commits) + 1}".encode()).hexdigest()
                    hub.trees[oid] = dict(repo["branches"][revision])
                    repo["heads"][revision] = oid
                    hub.commits.append(
                        {"repo_id": repo_id, "revision": revision, "summary": header["summary"], "files": files}
                    )
                self._reply(
                    200,
                    {"commitUrl": f"{hub.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None},
                )

        self.handler = Handler
        self.server: ThreadingHTTPServer | None = None
        if port is None:
            self._listen(0)
        self.endpoint = f"http://127.0.0.1:{port or self.server.server_address[1]}"
        self.port, self.started = port, started

    def _listen(self, port: int) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", port), self.handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def fail(self, where: str, *faults: int | tuple[int, int] | str) -> None:
        """Queue ``faults`` for the next calls to ``where`` (``create`` or ``commit``), one each."""
        with self.lock:
            self.faults[where].extend(faults)

    def start(self) -> None:
        """Start answering (a hub made with ``started=False`` refuses connections until now)."""
        if self.server is None:
            self._listen(self.port)
        self.thread.start()

    def __enter__(self) -> FakeHub:
        if self.started:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.server is not None and self.thread.is_alive():
            self.server.shutdown()
        if self.server is not None:
            self.server.server_close()
