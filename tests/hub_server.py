"""A small Hugging Face Hub-compatible HTTP server for tests: repos on disk, uploads and downloads over real HTTP.

No Hub server that accepts uploads installs from the package index (olah and the hf-mirror tools are download-only
mirrors), so this is a test *peer*: ``huggingface_hub`` and ``transformers`` talk to it exactly as they talk to
huggingface.co (set ``HF_ENDPOINT`` to :attr:`HubServer.url`), and it answers with the status codes, headers and
JSON shapes they parse. It implements the requests that huggingface_hub 2.4 sends (read in ``hf_api.py``,
``_commit_api.py``, ``lfs.py`` and ``file_download.py``):

write side
    ``GET /api/whoami-v2`` · ``POST /api/repos/create`` · ``POST /api/validate-yaml`` ·
    ``POST /api/{type}s/{repo}/preupload/{rev}`` (regular vs LFS decided from ``.gitattributes``, size, binary
    sample; returns remote oids so unchanged files are skipped) · ``POST /{repo}.git/info/lfs/objects/batch``
    (basic transfer) · ``PUT /lfs-storage/{sha256}`` (content checked against its sha256) ·
    ``POST /{repo}.git/info/lfs/objects/verify`` · ``POST /api/{type}s/{repo}/commit/{rev}`` (NDJSON: header,
    base64 ``file``, ``lfsFile``, ``deletedFile``, ``deletedFolder``; ``parentCommit`` checked) ·
    ``GET /api/agent-harnesses`` (an empty registry)
read side
    ``GET /api/{type}s/{repo}[/revision/{rev}]`` (model info with siblings and cardData) ·
    ``GET /api/{type}s/{repo}/tree/{rev}[/{path}]`` · ``HEAD``/``GET /{repo}/resolve/{rev}/{file}`` with
    ``ETag``, ``X-Linked-Etag``/``X-Linked-Size`` for LFS files, ``X-Repo-Commit``, ``Content-Length`` and byte ranges

Errors carry the Hub's ``X-Error-Code`` header (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) so that
huggingface_hub raises its usual exception types. Every request is recorded in :attr:`HubServer.requests`, and
requests to routes this server does not implement in :attr:`HubServer.unhandled` (answered 404), so a test can
assert that a whole round trip stayed inside the covered API.

Not covered (the real Hub differs): Xet storage (run clients with ``HF_HUB_DISABLE_XET=1``; files are never
advertised as Xet), token scopes / fine-grained permissions / organizations (any known token may write to its own
namespace, nothing else), gated repos, pull requests (``create_pr``), multipart LFS uploads, branches other than
``main`` and tags, ``.gitignore`` handling in preupload, rate limits, CDN redirects, pagination of trees.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import logging
import re
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

logger = logging.getLogger(__name__)

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
# The subset of the Hub's default .gitattributes that matters for model repos: these files are stored with LFS.
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.onnx", "*.msgpack", "*.model", "*.npy",
        "*.npz", "*.pkl", "*.pickle", "*.zip", "*.gz", "*.tar", "*.arrow", "*.parquet", "*tfevents*",
    )
)
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024  # the Hub forces LFS above 10 MB
BASE_MODEL_RELATIONS = ("adapter", "merge", "quantized", "finetune")
REPO_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
COMMIT_OID = re.compile(r"^[0-9a-f]{40}$")


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob (what the Hub reports as ``oid``/ETag for regular files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file that git stores in place of an LFS file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


class HubHTTPError(Exception):
    """Raised inside a handler: becomes an HTTP error response with the Hub's error headers."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}


@dataclass
class FileEntry:
    """One file of a commit: content lives in the blob store under its sha256."""

    sha256: str
    size: int
    git_oid: str
    lfs: bool

    def etag(self) -> str:
        return self.sha256 if self.lfs else self.git_oid


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    description: str
    author: str
    date: str
    files: dict[str, FileEntry] = field(default_factory=dict)


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)

    @property
    def owner(self) -> str:
        return self.repo_id.split("/", 1)[0]


class HubState:
    """Repos, blobs and tokens. Blobs are files on disk (content-addressed by sha256); metadata is in memory."""

    def __init__(self, root: Path, tokens: dict[str, str]):
        self.root = Path(root)
        self.blob_dir = self.root / "blobs"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.tokens = dict(tokens)
        self.repos: dict[tuple[str, str], Repo] = {}
        self.upload_tickets: dict[str, str] = {}  # ticket -> expected sha256
        self.lock = threading.RLock()
        self._counter = 0

    # blobs --------------------------------------------------------------------------------------------------------
    def blob_path(self, sha256: str) -> Path:
        return self.blob_dir / sha256

    def has_blob(self, sha256: str, size: int | None = None) -> bool:
        path = self.blob_path(sha256)
        return path.is_file() and (size is None or path.stat().st_size == size)

    def put_blob(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        path = self.blob_path(sha)
        if not path.exists():
            tmp = path.with_suffix(f".tmp-{secrets.token_hex(4)}")
            tmp.write_bytes(data)
            tmp.replace(path)
        return sha

    def read_blob(self, sha256: str) -> bytes:
        return self.blob_path(sha256).read_bytes()

    # repos --------------------------------------------------------------------------------------------------------
    def new_commit(
        self, repo: Repo, parent: str | None, files: dict[str, FileEntry], title: str, description: str, author: str
    ) -> Commit:
        with self.lock:
            self._counter += 1
            payload = json.dumps(
                [parent, sorted((p, e.sha256) for p, e in files.items()), title, description, self._counter]
            )
        oid = hashlib.sha1(payload.encode()).hexdigest()
        commit = Commit(oid, parent, title, description, author, _now(), files)
        repo.commits[oid] = commit
        return commit

    def file_entry(self, path: str, data: bytes, lfs: bool) -> FileEntry:
        sha = self.put_blob(data)
        git_oid = git_blob_oid(lfs_pointer(sha, len(data)) if lfs else data)
        return FileEntry(sha256=sha, size=len(data), git_oid=git_oid, lfs=lfs)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


class HubServer:
    """Run a Hub-compatible server on ``127.0.0.1`` (free port) in a background thread.

    ``tokens`` maps access tokens to user names. Use as a context manager or call :meth:`start`/:meth:`stop`.
    """

    def __init__(self, root: str | Path | None = None, tokens: dict[str, str] | None = None, host: str = "127.0.0.1"):
        self._own_root = root is None
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="hub-server-"))
        self.state = HubState(self.root, tokens or {"hf_test_token": "tester"})
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        server = self

        class Handler(_HubHandler):
            hub = server

        self._httpd = ThreadingHTTPServer((host, 0), Handler)
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "HubServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # helpers for tests -------------------------------------------------------------------------------------------
    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        return self.state.repos[(repo_type, repo_id)]

    def head(self, repo_id: str, repo_type: str = "model") -> Commit:
        repo = self.repo(repo_id, repo_type)
        return repo.commits[repo.branches["main"]]

    def read_file(self, repo_id: str, path: str, repo_type: str = "model") -> bytes:
        return self.state.read_blob(self.head(repo_id, repo_type).files[path].sha256)


class _HubHandler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"  # keep-alive, as the Hub; every response sets Content-Length
    server_version = "uncurl-test-hub/1"

    # plumbing ------------------------------------------------------------------------------------------------------
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        logger.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        self.raw_path = split.path
        self.hub.requests.append((method, split.path))
        try:
            body = self._read_body() if method in ("POST", "PUT") else b""
            handled = self._route(method, split.path, body)
            if not handled:
                self.hub.unhandled.append((method, split.path))
                raise HubHTTPError(404, f"Route {method} {split.path} is not implemented by the test Hub server")
        except HubHTTPError as err:
            self._error(err)
        except Exception as exc:  # noqa: BLE001 - a server bug must reach the client as a 500, not hang it
            logger.exception("test hub server error")
            self._error(HubHTTPError(500, f"Internal error: {type(exc).__name__}: {exc}"))

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline().strip():  # trailers
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(
        self,
        status: int,
        body: bytes = b"",
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
        length: int | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, data: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(data).encode(), headers=headers)

    def _error(self, err: HubHTTPError) -> None:
        headers = {"X-Error-Message": err.message.replace("\n", " "), **err.headers}
        if err.code:
            headers["X-Error-Code"] = err.code
        self._json({"error": err.message}, status=err.status, headers=headers)

    def _body_json(self, body: bytes) -> Any:
        try:
            return json.loads(body or b"{}")
        except ValueError as exc:
            raise HubHTTPError(400, f"Invalid JSON body: {exc}") from exc

    # auth ----------------------------------------------------------------------------------------------------------
    def _user(self, required: bool = False) -> str | None:
        header = self.headers.get("Authorization", "")
        if not header:
            if required:
                raise HubHTTPError(401, "You must be authenticated to access this resource (no token sent)")
            return None
        token = header[7:] if header.lower().startswith("bearer ") else header
        user = self.hub.state.tokens.get(token)
        if user is None:
            raise HubHTTPError(401, "Invalid credentials in Authorization header")
        return user

    def _repo(self, repo_type: str, repo_id: str, write: bool = False) -> Repo:
        user = self._user(required=write)
        repo = self.hub.state.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and user != repo.owner):
            # The Hub answers 401 to anonymous callers and 404 to authenticated ones, both with RepoNotFound.
            raise HubHTTPError(401 if user is None else 404, f"Repository {repo_id} not found", code="RepoNotFound")
        if write and user != repo.owner:
            raise HubHTTPError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    @staticmethod
    def _commit_at(repo: Repo, revision: str) -> Commit:
        oid = repo.branches.get(revision)
        if oid is None and COMMIT_OID.match(revision) and revision in repo.commits:
            oid = revision
        if oid is None:
            raise HubHTTPError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        return repo.commits[oid]

    # routing -------------------------------------------------------------------------------------------------------
    def _route(self, method: str, path: str, body: bytes) -> bool:
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if parts[:1] == ["api"]:
            return self._route_api(method, parts[1:], body)
        if parts[:1] == ["lfs-storage"] and len(parts) == 2 and method == "PUT":
            self._lfs_put(parts[1], body)
            return True
        repo_type = "model"
        if parts and parts[0] in ("datasets", "spaces"):
            repo_type, parts = REPO_TYPES[parts[0]], parts[1:]
        if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            self._resolve(repo_type, f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
            return True
        if len(parts) == 6 and parts[1].endswith(".git") and parts[2:5] == ["info", "lfs", "objects"]:
            repo_id = f"{parts[0]}/{parts[1][: -len('.git')]}"
            if parts[5] == "batch" and method == "POST":
                self._lfs_batch(repo_type, repo_id, body)
                return True
            if parts[5] == "verify" and method == "POST":
                self._lfs_verify(repo_type, repo_id, body)
                return True
        return False

    def _route_api(self, method: str, parts: list[str], body: bytes) -> bool:
        if parts == ["whoami-v2"] and method == "GET":
            self._whoami()
            return True
        if parts == ["repos", "create"] and method == "POST":
            self._create_repo(body)
            return True
        if parts == ["validate-yaml"] and method == "POST":
            self._validate_yaml(body)
            return True
        if parts == ["agent-harnesses"] and method == "GET":  # huggingface_hub's user-agent registry: none known
            self._json({"standardEnvVars": [], "harnesses": {}})
            return True
        if len(parts) < 3 or parts[0] not in REPO_TYPES:
            return False
        repo_type, repo_id, rest = REPO_TYPES[parts[0]], f"{parts[1]}/{parts[2]}", parts[3:]
        if method == "GET" and not rest:
            self._info(repo_type, repo_id, "main")
            return True
        if method == "GET" and len(rest) == 2 and rest[0] == "revision":
            self._info(repo_type, repo_id, rest[1])
            return True
        if method == "GET" and len(rest) >= 2 and rest[0] == "tree":
            self._tree(repo_type, repo_id, rest[1], "/".join(rest[2:]))
            return True
        if method == "POST" and len(rest) == 2 and rest[0] == "preupload":
            self._preupload(repo_type, repo_id, rest[1], body)
            return True
        if method == "POST" and len(rest) == 2 and rest[0] == "commit":
            self._commit(repo_type, repo_id, rest[1], body)
            return True
        return False

    # endpoints: account and repos ------------------------------------------------------------------------------------
    def _whoami(self) -> None:
        user = self._user(required=True)
        self._json(
            {
                "type": "user",
                "id": hashlib.sha1(user.encode()).hexdigest()[:24],
                "name": user,
                "fullname": user,
                "email": f"{user}@example.invalid",
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
            }
        )

    def _create_repo(self, body: bytes) -> None:
        user = self._user(required=True)
        data = self._body_json(body)
        name, namespace = data.get("name"), data.get("organization") or user
        repo_type = data.get("type") or "model"
        if not isinstance(name, str) or not REPO_NAME.match(name) or repo_type not in URL_PREFIXES:
            raise HubHTTPError(400, f"Invalid repo name or type: {name!r} ({repo_type!r})")
        if namespace != user:
            raise HubHTTPError(403, f"You don't have the rights to create a {repo_type} under the namespace {namespace}")
        repo_id = f"{namespace}/{name}"
        url = f"{self.hub.url}/{URL_PREFIXES[repo_type]}{repo_id}"
        state = self.hub.state
        with state.lock:
            if (repo_type, repo_id) in state.repos:
                raise HubHTTPError(409, f"You already created this {repo_type} repo: {repo_id}", headers={})
            private = data.get("visibility") == "private" or bool(data.get("private"))
            repo = Repo(repo_type, repo_id, private=private, created_at=_now())
            gitattributes = state.file_entry(".gitattributes", DEFAULT_GITATTRIBUTES.encode(), lfs=False)
            commit = state.new_commit(repo, None, {".gitattributes": gitattributes}, "initial commit", "", user)
            repo.branches["main"] = commit.oid
            state.repos[(repo_type, repo_id)] = repo
        self._json({"url": url, "name": repo_id, "id": hashlib.sha1(url.encode()).hexdigest()[:24]})

    def _validate_yaml(self, body: bytes) -> None:
        content = self._body_json(body).get("content", "")
        errors = [{"message": m} for m in validate_card_metadata(content)]
        self._json({"errors": errors, "warnings": []}, status=400 if errors else 200)

    def _info(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_type, repo_id)
        commit = self._commit_at(repo, revision)
        card_data = None
        if "README.md" in commit.files:
            card_data = _front_matter(self.hub.state.read_blob(commit.files["README.md"].sha256).decode())
        with_blobs = self.query.get("blobs", "").lower() in ("1", "true")
        siblings = []
        for path, entry in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                sibling.update(size=entry.size, blobId=entry.git_oid)
                if entry.lfs:
                    sibling["lfs"] = {"sha256": entry.sha256, "size": entry.size, "pointerSize": 134}
            siblings.append(sibling)
        self._json(
            {
                "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
                "id": repo_id,
                "modelId": repo_id,
                "author": repo.owner,
                "sha": commit.oid,
                "lastModified": commit.date,
                "createdAt": repo.created_at,
                "private": repo.private,
                "disabled": False,
                "gated": False,
                "downloads": 0,
                "likes": 0,
                "tags": list((card_data or {}).get("tags") or []),
                "library_name": (card_data or {}).get("library_name"),
                "pipeline_tag": (card_data or {}).get("pipeline_tag"),
                "cardData": card_data,
                "siblings": siblings,
            }
        )

    def _tree(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        repo = self._repo(repo_type, repo_id)
        commit = self._commit_at(repo, revision)
        recursive = self.query.get("recursive", "").lower() in ("1", "true")
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""
        files = {p: e for p, e in commit.files.items() if p.startswith(prefix)}
        if prefix and not files:
            raise HubHTTPError(404, f"{path} does not exist on {revision}", code="EntryNotFound",
                               headers={"X-Repo-Commit": commit.oid})
        entries: dict[str, dict[str, Any]] = {}
        for file_path, entry in sorted(files.items()):
            relative = file_path[len(prefix):].split("/")
            for depth in range(1, len(relative)):
                folder = prefix + "/".join(relative[:depth])
                if recursive or depth == 1:
                    entries.setdefault(folder, {"type": "directory", "oid": hashlib.sha1(folder.encode()).hexdigest(),
                                                "size": 0, "path": folder})
            if recursive or len(relative) == 1:
                item: dict[str, Any] = {"type": "file", "oid": entry.git_oid, "size": entry.size, "path": file_path}
                if entry.lfs:
                    item["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": 134}
                entries[file_path] = item
        self._json([entries[k] for k in sorted(entries)])

    # endpoints: upload -----------------------------------------------------------------------------------------------
    def _preupload(self, repo_type: str, repo_id: str, revision: str, body: bytes) -> None:
        repo = self._repo(repo_type, repo_id, write=True)
        commit = self._commit_at(repo, revision)
        patterns = _lfs_patterns(self.hub.state, commit)
        answers = []
        for item in self._body_json(body).get("files", []):
            path, size = item["path"], int(item["size"])
            sample = base64.b64decode(item.get("sample", ""))
            basename = path.rsplit("/", 1)[-1]
            lfs = (
                size > LFS_SIZE_THRESHOLD
                or b"\0" in sample
                or any(fnmatch.fnmatch(basename if "/" not in p else path, p) for p in patterns)
            )
            existing = commit.files.get(path)
            oid = None if existing is None else existing.sha256 if existing.lfs else existing.git_oid
            answers.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                            "oid": oid})
        self._json({"files": answers, "commitOid": commit.oid})

    def _lfs_batch(self, repo_type: str, repo_id: str, body: bytes) -> None:
        self._repo(repo_type, repo_id, write=True)
        data = self._body_json(body)
        if data.get("operation") != "upload":
            raise HubHTTPError(400, "Only the upload operation is implemented")
        objects = []
        verify = f"{self.hub.url}/{URL_PREFIXES[repo_type]}{repo_id}.git/info/lfs/objects/verify"
        for obj in data.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            if self.hub.state.has_blob(oid, size):
                objects.append({"oid": oid, "size": size})  # already stored: no actions -> client skips upload
                continue
            ticket = secrets.token_urlsafe(16)
            with self.hub.state.lock:
                self.hub.state.upload_tickets[ticket] = oid
            objects.append(
                {
                    "oid": oid,
                    "size": size,
                    "authenticated": True,
                    "actions": {
                        "upload": {"href": f"{self.hub.url}/lfs-storage/{oid}?ticket={ticket}"},
                        "verify": {"href": verify},
                    },
                }
            )
        self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                   content_type="application/vnd.git-lfs+json")

    def _lfs_put(self, oid: str, body: bytes) -> None:
        with self.hub.state.lock:
            expected = self.hub.state.upload_tickets.pop(self.query.get("ticket", ""), None)
        if expected != oid:
            raise HubHTTPError(403, "Invalid or expired upload URL")
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubHTTPError(400, f"Uploaded content does not match its sha256 {oid}")
        self.hub.state.put_blob(body)
        self._send(200)

    def _lfs_verify(self, repo_type: str, repo_id: str, body: bytes) -> None:
        self._repo(repo_type, repo_id, write=True)
        data = self._body_json(body)
        if not self.hub.state.has_blob(data.get("oid", ""), int(data.get("size", -1))):
            raise HubHTTPError(404, f"LFS object {data.get('oid')} was not uploaded")
        self._json({"success": True})

    def _commit(self, repo_type: str, repo_id: str, revision: str, body: bytes) -> None:
        repo = self._repo(repo_type, repo_id, write=True)
        user = self._user(required=True) or ""
        if self.query.get("create_pr"):
            raise HubHTTPError(400, "Pull requests (create_pr) are not implemented by the test Hub server")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubHTTPError(400, "The commit payload must start with a header line")
        header = lines[0]["value"]
        state = self.hub.state
        with state.lock:
            head = self._commit_at(repo, revision)
            if revision not in repo.branches:
                raise HubHTTPError(400, "Commits are only implemented on branches")
            parent = header.get("parentCommit")
            if parent and not head.oid.startswith(parent):
                raise HubHTTPError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(head.files)
            for line in lines[1:]:
                key, value = line.get("key"), line.get("value", {})
                path = value.get("path", "")
                if key == "file":
                    if value.get("encoding") != "base64":
                        raise HubHTTPError(400, f"Unsupported encoding for {path}")
                    files[path] = state.file_entry(path, base64.b64decode(value["content"]), lfs=False)
                elif key == "lfsFile":
                    oid = value.get("oid", "")
                    if not state.has_blob(oid):
                        raise HubHTTPError(422, f"Your push was rejected: LFS object {oid} for {path} was not uploaded")
                    size = state.blob_path(oid).stat().st_size
                    files[path] = FileEntry(oid, size, git_blob_oid(lfs_pointer(oid, size)), lfs=True)
                elif key == "deletedFile":
                    if files.pop(path, None) is None:
                        raise HubHTTPError(404, f"A file with this name doesn't exist: {path}", code="EntryNotFound")
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    for existing in [p for p in files if p.startswith(prefix)]:
                        del files[existing]
                else:
                    raise HubHTTPError(400, f"Unknown commit operation {key!r}")
            commit = state.new_commit(repo, head.oid, files, header.get("summary", ""),
                                      header.get("description", ""), user)
            repo.branches[revision] = commit.oid
        url = f"{self.hub.url}/{URL_PREFIXES[repo_type]}{repo_id}/commit/{commit.oid}"
        self._json({"success": True, "commitOid": commit.oid, "commitUrl": url, "pullRequestUrl": None})

    # endpoints: download ---------------------------------------------------------------------------------------------
    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        repo = self._repo(repo_type, repo_id)
        commit = self._commit_at(repo, revision)
        entry = commit.files.get(path)
        if entry is None:
            raise HubHTTPError(404, f"Entry not found: {path}", code="EntryNotFound",
                               headers={"X-Repo-Commit": commit.oid})
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{entry.etag()}"', "Accept-Ranges": "bytes"}
        if entry.lfs:
            headers.update({"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)})
        data = b"" if self.command == "HEAD" else self.hub.state.read_blob(entry.sha256)
        start, end, status = 0, entry.size - 1, 200
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
        if match and (match.group(1) or match.group(2)):
            if match.group(1):
                start = int(match.group(1))
                end = int(match.group(2)) if match.group(2) else entry.size - 1
            else:  # suffix range: the last N bytes
                start = max(0, entry.size - int(match.group(2)))
            end = min(end, entry.size - 1)
            if start > end:
                raise HubHTTPError(416, "Requested range not satisfiable",
                                   headers={"Content-Range": f"bytes */{entry.size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{entry.size}"
        body = data[start : end + 1] if data else b""
        self._send(status, body, content_type="application/octet-stream", headers=headers, length=end - start + 1)


def _lfs_patterns(state: HubState, commit: Commit) -> list[str]:
    entry = commit.files.get(".gitattributes")
    if entry is None:
        return []
    patterns = []
    for line in state.read_blob(entry.sha256).decode().splitlines():
        fields = line.split()
        if len(fields) > 1 and "filter=lfs" in fields[1:]:
            patterns.append(fields[0])
    return patterns


def _front_matter(content: str) -> dict[str, Any] | None:
    """The YAML metadata block of a README (``None`` when there is none)."""
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, flags=re.DOTALL)
    if not match:
        return None
    data = yaml.safe_load(match.group(1))
    return data if isinstance(data, dict) else None


def validate_card_metadata(content: str) -> list[str]:
    """The metadata checks the Hub applies on push that a pruned-model card can get wrong; returns error messages."""
    try:
        data = _front_matter(content)
    except yaml.YAMLError as exc:
        return [f"Invalid YAML in README.md front matter: {exc}"]
    if data is None:
        return []
    errors = []
    relation = data.get("base_model_relation")
    if relation is not None and relation not in BASE_MODEL_RELATIONS:
        errors.append(f'"base_model_relation" must be one of {", ".join(BASE_MODEL_RELATIONS)}')
    if relation is not None and data.get("base_model") is None:
        errors.append('"base_model_relation" requires "base_model"')
    base = data.get("base_model")
    for model_id in [base] if isinstance(base, str) else base or []:
        if not isinstance(model_id, str) or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", model_id):
            errors.append(f'"base_model" must be Hub model ids, got {model_id!r}')
    for key in ("tags", "datasets"):
        value = data.get(key)
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            errors.append(f'"{key}" must be a list of strings')
    for key in ("library_name", "pipeline_tag", "license"):
        if data.get(key) is not None and not isinstance(data[key], str):
            errors.append(f'"{key}" must be a string')
    index = data.get("model-index")
    if index is not None:
        if not isinstance(index, list):
            errors.append('"model-index" must be a list')
        else:
            for model in index:
                for result in (model or {}).get("results", []):
                    if not result.get("task", {}).get("type") or not result.get("dataset", {}).get("type"):
                        errors.append('"model-index" results need task.type and dataset.type')
                    for metric in result.get("metrics", []):
                        if "type" not in metric or "value" not in metric:
                            errors.append('"model-index" metrics need a type and a value')
    return errors


__all__ = ["HubServer", "git_blob_oid", "validate_card_metadata"]


if __name__ == "__main__":  # manual use: python tests/hub_server.py  (then HF_ENDPOINT=<printed url>)
    logging.basicConfig(level=logging.INFO)
    with HubServer() as hub:
        print(f"test Hub at {hub.url}  token: hf_test_token (user 'tester')", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
