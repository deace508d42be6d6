"""A loopback stand-in for the Hugging Face Hub API: just the endpoints an ``upload_folder`` push uses.

Endpoints (as huggingface_hub 2.x calls them): ``POST /api/repos/create``, ``POST /api/models/{repo}/branch/{name}``,
``POST /api/models/{repo}/preupload/{rev}`` and ``POST /api/models/{repo}/commit/{rev}`` (NDJSON, base64 files).
The preupload answer marks every file ``regular``: the real Hub decides upload modes server-side, and inline uploads
keep Xet/LFS storage (a separate protocol and server) out of this test. Everything received is recorded.
"""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


class FakeHub:
    """Start with ``with FakeHub() as hub:``; ``hub.endpoint`` is the URL for ``HF_ENDPOINT``."""

    def __init__(self) -> None:
        self.requests: list[dict] = []  # method, path, authorization, json body (when JSON)
        self.repos: dict[str, dict] = {}  # repo_id -> {"private": bool, "branches": {name: {path: bytes}}}
        self.commits: list[dict] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                hub.requests.append({"method": "GET", "path": self.path, "auth": self.headers.get("authorization")})
                if urlparse(self.path).path == "/api/whoami-v2":
                    return self._reply(200, {"name": "fake-user", "type": "user"})
                self._reply(404, {"error": f"not implemented in the fake hub: GET {self.path}"})

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                raw = self.rfile.read(length)
                path = unquote(urlparse(self.path).path)
                record = {"method": "POST", "path": path, "auth": self.headers.get("authorization")}
                hub.requests.append(record)
                if path == "/api/repos/create":
                    body = json.loads(raw)
                    record["json"] = body
                    repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
                    hub.repos.setdefault(
                        repo_id, {"private": body.get("visibility") == "private", "branches": {"main": {}}}
                    )
                    return self._reply(200, {"url": f"{hub.endpoint}/{repo_id}"})
                parts = path.split("/")  # ['', 'api', 'models', owner, name, action, revision]
                if len(parts) >= 7 and parts[1:3] == ["api", "models"]:
                    repo_id, action, revision = f"{parts[3]}/{parts[4]}", parts[5], "/".join(parts[6:])
                    repo = hub.repos.get(repo_id)
                    if repo is None:
                        return self._reply(404, {"error": f"repository {repo_id} not found"})
                    if action == "branch":
                        repo["branches"].setdefault(revision, dict(repo["branches"]["main"]))
                        return self._reply(200, {})
                    if action == "preupload":
                        files = json.loads(raw)["files"]
                        record["json"] = {"files": [{"path": f["path"], "size": f["size"]} for f in files]}
                        return self._reply(
                            200,
                            {
                                "files": [
                                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
                                ]
                            },
                        )
                    if action == "commit":
                        if revision not in repo["branches"]:
                            return self._reply(404, {"error": f"revision {revision} not found"})
                        lines = [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
                        files = {}
                        for line in lines:
                            if line["key"] == "file":
                                files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
                        header = next(line["value"] for line in lines if line["key"] == "header")
                        repo["branches"][revision].update(files)
                        oid = f"{len(hub.commits) + 1:040x}"
                        hub.commits.append(
                            {"repo_id": repo_id, "revision": revision, "summary": header["summary"], "files": files}
                        )
                        return self._reply(
                            200,
                            {
                                "commitUrl": f"{hub.endpoint}/{repo_id}/commit/{oid}",
                                "commitOid": oid,
                                "pullRequestUrl": None,
                            },
                        )
                self._reply(404, {"error": f"not implemented in the fake hub: POST {path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
