"""A stand-in for the Hugging Face Hub over real HTTP: serves one model repo, the files of a
directory, at one commit, through the few routes huggingface_hub's snapshot_download
asks for (HF_ENDPOINT=its url). Plain HTTP downloads only: no Xet, no redirects."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


class HubStandIn:
    def __init__(self, repo_id: str, files_dir: Path, commit: str) -> None:
        self.repo_id, self.commit = repo_id, commit
        self.files = {p.name: p.read_bytes() for p in sorted(files_dir.iterdir()) if p.is_file()}
        self.requests: list[str] = []  # "METHOD path", in the order they came
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> HubStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _answer(self, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
        self.requests.append(f"{method} {path}")
        api = f"/api/models/{self.repo_id}/"
        if path.startswith(api + "revision/"):
            siblings = [{"rfilename": name} for name in self.files]
            body = {"id": self.repo_id, "sha": self.commit, "siblings": siblings}
            return 200, {"Content-Type": "application/json"}, json.dumps(body).encode()
        if path.startswith(api + "tree/"):
            tree = [
                {"type": "file", "path": name, "size": len(data), "oid": _git_oid(data)}
                for name, data in self.files.items()
            ]
            return 200, {"Content-Type": "application/json"}, json.dumps(tree).encode()
        resolve = f"/{self.repo_id}/resolve/"
        if path.startswith(resolve):
            name = path.removeprefix(resolve).split("/", 1)[-1]
            if name in self.files:
                data = self.files[name]
                headers = {
                    "X-Repo-Commit": self.commit,
                    "ETag": f'"{_git_oid(data)}"',
                    "Content-Length": str(len(data)),
                }
                return 200, headers, data
        return 404, {"X-Error-Code": "RepoNotFound"}, b'{"error": "Repository not found"}'

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, send_body: bool) -> None:
                status, headers, body = hub._answer(self.command, unquote(urlsplit(self.path).path))
                self.send_response(status)
                headers.setdefault("Content-Length", str(len(body)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                if send_body:
                    self.wfile.write(body)

            def do_GET(self) -> None:
                self._reply(send_body=True)

            def do_HEAD(self) -> None:
                self._reply(send_body=False)

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Handler


def _git_oid(data: bytes) -> str:
    """The hash git gives a blob (what the Hub calls a file's oid)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
