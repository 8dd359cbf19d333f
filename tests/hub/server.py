"""A Hub-compatible HTTP server on 127.0.0.1 that serves the local replicas.

It answers the endpoints huggingface_hub, transformers, datasets and lm-eval call (repository info with
the gated flag, tree listing, paths-info, resolve/<revision>/<file> with HEAD and ranges), so the
suite's own loading code runs against it unchanged with ``HF_ENDPOINT=http://127.0.0.1:PORT``.

Layout served (written by ``tests/hub/replicas.py``)::

    <root>/<models|datasets>/<org>/<name>/repo.json        gated flag, licence, revisions
    <root>/<models|datasets>/<org>/<name>/<revdir>/<files> one folder per published revision

A gated repository answers 401 without a token and 403 for a token not granted access, with the
Hub's ``X-Error-Code: GatedRepo``. Loopback only; the server thread is a daemon and stops with
``stop()`` (the test fixture calls it) or with the process.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

# The token the tests use as "the user's token" for a gated replica whose licence was accepted.
GRANTED_TOKEN = "hf_replica_granted"


def commit_of(repo_id: str, revdir: str) -> str:
    """A stable 40-hex commit id for one revision folder of a replica."""
    return hashlib.sha1(f"{repo_id}@{revdir}".encode()).hexdigest()


def file_oid(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


class Replicas:
    """Read-only view of the replica folder."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def repo_dir(self, kind: str, repo_id: str) -> Path | None:
        d = self.root / kind / repo_id
        return d if (d / "repo.json").is_file() else None

    def meta(self, kind: str, repo_id: str) -> dict:
        return json.loads((self.root / kind / repo_id / "repo.json").read_text())

    def revision_dir(self, kind: str, repo_id: str, revision: str) -> tuple[Path, str] | None:
        meta = self.meta(kind, repo_id)
        revs = meta["revisions"]  # published revision name -> folder
        revdir = revs.get(revision)
        if revdir is None:  # a commit id of one of the folders
            revdir = next((r for r in set(revs.values()) if commit_of(repo_id, r) == revision), None)
        if revdir is None:
            return None
        sha = meta.get("commits", {}).get(revdir) or commit_of(repo_id, revdir)
        return self.root / kind / repo_id / revdir, sha


def _entry(base: Path, path: Path) -> dict:
    rel = path.relative_to(base).as_posix()
    if path.is_dir():
        return {"type": "directory", "oid": hashlib.sha1(rel.encode()).hexdigest(), "size": 0, "path": rel}
    size = path.stat().st_size
    oid = file_oid(path)
    entry = {"type": "file", "oid": oid, "size": size, "path": rel}
    if path.suffix in {".safetensors", ".bin", ".parquet", ".zst", ".model", ".arrow"}:
        entry["lfs"] = {
            "oid": hashlib.sha256(path.read_bytes()).hexdigest(),
            "size": size,
            "pointerSize": 134,
        }
    return entry


def _make_handler(replicas: Replicas, log: list[str]):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # keep pytest output clean; keep a trace for failures
            log.append(fmt % args)

        # -- helpers ----------------------------------------------------------------------
        def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, str(v))
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head and body:
                self.wfile.write(body)

        def _json(self, status: int, obj, headers: dict | None = None, head: bool = False):
            body = json.dumps(obj).encode()
            self._send(status, body, {"Content-Type": "application/json", **(headers or {})}, head)

        def _error(self, status: int, code: str, message: str, head: bool = False):
            self._json(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message}, head)

        def _token(self) -> str | None:
            auth = self.headers.get("Authorization", "")
            return auth[7:] if auth.startswith("Bearer ") else None

        def _access(self, kind: str, repo_id: str, head: bool) -> bool:
            meta = replicas.meta(kind, repo_id)
            if not meta.get("gated"):
                return True
            token = self._token()
            if token is None:
                self._error(
                    401,
                    "GatedRepo",
                    f"Access to model {repo_id} is restricted. You must be authenticated.",
                    head,
                )
                return False
            if token not in meta.get("granted_tokens", [GRANTED_TOKEN]):
                self._error(
                    403,
                    "GatedRepo",
                    f"Access to model {repo_id} is restricted and you are not in the authorized list.",
                    head,
                )
                return False
            return True

        def _split_repo(self, parts: list[str]) -> tuple[str, list[str]]:
            return "/".join(parts[:2]), parts[2:]

        # -- routes -----------------------------------------------------------------------
        def do_HEAD(self):
            self._route(head=True)

        def do_GET(self):
            self._route(head=False)

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            self._body = self.rfile.read(length) if length else b""
            self._route(head=False, post=True)

        def _route(self, head: bool, post: bool = False):
            url = urlsplit(self.path)
            parts = [unquote(p) for p in url.path.split("/") if p]
            query = parse_qs(url.query)
            if parts[:1] == ["api"] and len(parts) >= 2 and parts[1] in ("models", "datasets"):
                return self._api(parts[1], parts[2:], query, head, post)
            kind = "models"
            if parts[:1] == ["datasets"]:
                kind, parts = "datasets", parts[1:]
            if len(parts) >= 4 and parts[2] == "resolve":
                return self._resolve(kind, "/".join(parts[:2]), parts[3], "/".join(parts[4:]), head)
            self._error(404, "RepoNotFound", f"no route for {url.path}", head)

        def _api(self, kind: str, parts: list[str], query, head: bool, post: bool):
            repo_id, rest = self._split_repo(parts)
            if replicas.repo_dir(kind, repo_id) is None:
                return self._error(404, "RepoNotFound", f"Repository {repo_id} not found", head)
            meta = replicas.meta(kind, repo_id)
            # /api/<kind>/<repo>            /api/<kind>/<repo>/revision/<rev>
            if not rest or rest[0] == "revision":
                revision = "/".join(rest[1:]) if rest else "main"
                found = replicas.revision_dir(kind, repo_id, revision)
                if found is None:
                    return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head)
                base, sha = found
                files = sorted(p for p in base.rglob("*") if p.is_file())
                info = {
                    "id": repo_id,
                    "_id": repo_id,
                    "sha": sha,
                    "private": False,
                    "disabled": False,
                    "gated": meta.get("gated", False),
                    "cardData": {"license": meta.get("license")},
                    "siblings": [
                        {"rfilename": p.relative_to(base).as_posix(), "size": p.stat().st_size} for p in files
                    ],
                    "usedStorage": sum(p.stat().st_size for p in files),
                    "tags": [],
                }
                return self._json(200, info, head=head)
            if rest[0] == "tree":
                # /api/<kind>/<repo>/tree/<rev>[/<path>]: the revision may itself contain slashes
                # (refs/convert/parquet arrives percent-encoded as one segment).
                revision, path = rest[1], "/".join(rest[2:])
                found = replicas.revision_dir(kind, repo_id, revision)
                if found is None:
                    return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head)
                if not self._access(kind, repo_id, head):
                    return None
                base, _ = found
                target = base / path if path else base
                if not target.exists():
                    return self._error(404, "EntryNotFound", f"{path} does not exist", head)
                recursive = query.get("recursive", ["false"])[0].lower() == "true"
                items = target.rglob("*") if recursive else target.iterdir()
                return self._json(200, [_entry(base, p) for p in sorted(items)], head=head)
            if rest[0] == "paths-info" and post:
                revision = "/".join(rest[1:])
                found = replicas.revision_dir(kind, repo_id, revision)
                if found is None:
                    return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head)
                base, _ = found
                form = parse_qs(self._body.decode())
                paths = form.get("paths", [])
                if not paths and self._body[:1] == b"{":
                    paths = json.loads(self._body).get("paths", [])
                out = [_entry(base, base / p) for p in paths if (base / p).exists()]
                return self._json(200, out)
            if rest[0] == "refs":
                revs = sorted(set(meta["revisions"]))
                branches = [
                    {"name": r, "ref": f"refs/heads/{r}", "targetCommit": ""} for r in revs if "/" not in r
                ]
                converts = [
                    {"name": r.split("/")[-1], "ref": r, "targetCommit": ""}
                    for r in revs
                    if r.startswith("refs/convert")
                ]
                return self._json(200, {"branches": branches, "converts": converts, "tags": []}, head=head)
            return self._error(404, "EntryNotFound", f"no api route {'/'.join(rest)}", head)

        def _resolve(self, kind: str, repo_id: str, revision: str, filename: str, head: bool):
            if replicas.repo_dir(kind, repo_id) is None:
                return self._error(404, "RepoNotFound", f"Repository {repo_id} not found", head)
            found = replicas.revision_dir(kind, repo_id, revision)
            if found is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head)
            if not self._access(kind, repo_id, head):
                return None
            base, sha = found
            path = base / filename
            if not path.is_file():
                return self._error(404, "EntryNotFound", f"{filename} does not exist at {revision}", head)
            data = path.read_bytes()
            etag = f'"{file_oid(path)}"'
            headers = {"X-Repo-Commit": sha, "ETag": etag, "Accept-Ranges": "bytes"}
            if path.suffix in {".safetensors", ".bin", ".parquet", ".zst", ".model"}:
                headers["X-Linked-Etag"] = etag
                headers["X-Linked-Size"] = len(data)
            rng = self.headers.get("Range")
            if rng and rng.startswith("bytes="):
                start_s, _, end_s = rng[6:].partition("-")
                start = int(start_s) if start_s else max(0, len(data) - int(end_s))
                end = min(int(end_s), len(data) - 1) if (start_s and end_s) else len(data) - 1
                chunk = data[start : end + 1]
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                return self._send(206, chunk, headers, head)
            return self._send(200, data, headers, head)

    return Handler


class HubReplicaServer:
    """Serve ``root`` on 127.0.0.1 (a free port) from a daemon thread."""

    def __init__(self, root: Path):
        self.log: list[str] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(Replicas(root), self.log))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="hub-replicas", daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubReplicaServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
