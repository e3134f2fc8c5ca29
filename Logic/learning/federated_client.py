"""Opt-in client of the federated server: pull model versions, push fine-tuning deltas.

**Nothing is sent unless the user has opted in** (:class:`~dafne_logic.core.client_config.ClientConfig`
``opt_in``): every request goes through :meth:`FederatedClient._request`, which refuses first.
What a push sends: the weight delta (fp16 safetensors, zlib), its parent version, the number of
corrected slices and the Dice between automatic and corrected masks per label; no image, no
patient data.

Transport: ``requests`` with TLS verification, timeouts, retries with exponential backoff on
connection errors, 429 and 5xx; downloads resume with HTTP ranges and are checked against their
sha256; uploads carry an idempotency key derived from their content, so a retried or repeated
push is accepted once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import requests
from filelock import FileLock

from dafne_logic.core.atomic import atomic_directory
from dafne_logic.core.client_config import ClientConfig, check_server_url, check_token, load_config
from dafne_logic.core.errors import DafneError
from dafne_logic.core.paths import user_data_dir, user_models_dir
from dafne_logic.inference.manifest import MANIFEST_NAME, WEIGHTS_NAME
from dafne_logic.inference.model_package import PACKAGE_FOLDER, ModelPackage
from dafne_logic.learning.delta import DELTA_METADATA_NAME, DELTA_NAME, DeltaMetadata

log = logging.getLogger(__name__)

RETRY_STATUS = {429, 500, 502, 503, 504}
CHUNK = 1 << 20


class SyncError(DafneError):
    """The server refused a request or could not be reached; the message says why."""


class SyncDisabled(SyncError):
    """The user has not opted in to sync."""


class FederatedClient:
    """One server, one user token (from the user's sync configuration by default)."""

    def __init__(self, config: ClientConfig | None = None, session: requests.Session | None = None,
                 retries: int = 4, backoff_s: float = 0.5, downloads_dir: Path | None = None) -> None:
        self.config = config or load_config()
        self.downloads_dir = downloads_dir or user_data_dir() / "downloads"  # partial downloads, kept to resume
        self.http = session or requests.Session()
        self.retries = retries
        self.backoff_s = backoff_s

    # --- transport ---------------------------------------------------------------------------

    def _request(self, method: str, path: str, *, stream: bool = False, ok: tuple[int, ...] = (200,),
                 headers: dict[str, str] | None = None, **kwargs: Any) -> requests.Response:
        if not self.config.opt_in:
            raise SyncDisabled("sync is off: nothing is sent until you opt in (`dafne-slicer sync setup --opt-in`)")
        if not self.config.server_url or not self.config.token:
            raise SyncError("no server URL or token configured (`dafne-slicer sync setup`)")
        try:  # again here: a hand-edited sync.json must not send the token in the clear either
            url = check_server_url(self.config.server_url) + path
        except DafneError as exc:
            raise SyncError(f"{exc} (`dafne-slicer sync setup --server`)") from None
        try:  # and must not reach requests with a character no header may hold
            token = check_token(self.config.token)
        except DafneError as exc:
            raise SyncError(f"{exc} (`dafne-slicer sync setup --token-file`)") from None
        headers = {"Authorization": f"Bearer {token}", **(headers or {})}
        for attempt in range(self.retries + 1):
            try:
                response = self.http.request(method, url, headers=headers, timeout=self.config.timeout_s,
                                             verify=self.config.verify_tls, stream=stream, **kwargs)
            except requests.exceptions.SSLError:  # retrying cannot help
                raise SyncError(f"the TLS certificate of {self.config.server_url} is not trusted; if the server "
                                "uses a private CA, give its certificate with `dafne-slicer sync setup --ca-bundle`"
                                ) from None
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
                if attempt == self.retries:  # unreachable, timed out, or closed in the middle of a reply
                    raise SyncError(f"cannot reach {self.config.server_url} ({type(exc).__name__})") from None
                self._sleep(attempt, None)
                continue
            except requests.RequestException as exc:  # an invalid header value (a token with a newline), ...
                raise SyncError(f"the request to {self.config.server_url} could not be made ({type(exc).__name__})"
                                ) from None
            if response.status_code in RETRY_STATUS and attempt < self.retries:
                self._sleep(attempt, response.headers.get("Retry-After"))
                continue
            if response.status_code not in ok:
                raise SyncError(f"server refused {method} {path}: {response.status_code} {self._detail(response)}")
            return response
        raise AssertionError("unreachable")

    def _sleep(self, attempt: int, retry_after: str | None) -> None:
        delay = self.backoff_s * (2 ** attempt)
        if retry_after and retry_after.isdigit():
            delay = max(delay, min(float(retry_after), 60.0))
        time.sleep(delay)

    @staticmethod
    def _detail(response: requests.Response) -> str:
        try:
            detail = response.json().get("detail")
        except (ValueError, AttributeError):
            detail = None
        if isinstance(detail, list):  # FastAPI validation errors
            detail = "; ".join(str(d.get("msg", d) if isinstance(d, dict) else d) for d in detail)
        return str(detail or response.reason)

    def _json(self, path: str) -> Any:
        return _json_of(self._request("GET", path), path)

    # --- queries -----------------------------------------------------------------------------

    def me(self) -> dict[str, Any]:
        return _fields(self._json("/v1/me"), "/v1/me", name=str, scope=str, updates=int)

    def families(self) -> list[dict[str, Any]]:
        reply = self._json("/v1/models")
        if not isinstance(reply, list):
            raise SyncError(_ANOTHER_SERVER.format(path="/v1/models", what="a list of model families"))
        return [_fields(f, "/v1/models", name=str, active_version=(int, type(None)), buffered_updates=int) for f in reply]

    def versions(self, family: str, page: int = 1000) -> list[dict[str, Any]]:
        """Every version of ``family``, oldest first, read newest page first (``page`` a request)."""
        found: list[dict[str, Any]] = []
        before: int | None = None
        while True:
            query = f"?limit={page}" + (f"&before={before}" if before is not None else "")
            batch = self._json(f"/v1/models/{family}/versions{query}")
            if not isinstance(batch, list):
                raise SyncError(f"the server's version list of {family} is not a list")
            # A server older than paging ignores the query and sends everything: stop at no progress.
            batch = [_fields(v, f"/v1/models/{family}/versions", number=int) for v in batch]
            batch = [v for v in batch if before is None or v["number"] < before]
            found = batch + found
            if len(batch) < page or not batch:
                return found
            before = batch[0]["number"]

    def update_status(self, update_id: str) -> dict[str, Any]:
        path = f"/v1/updates/{update_id}"
        return _fields(self._json(path), path, id=str, status=str, reason=str, merged_into=(int, type(None)))

    def wait_for_update(self, update_id: str, timeout_s: float = 60.0, poll_s: float = 0.5) -> dict[str, Any]:
        """Poll until the update is merged or rejected (or ``timeout_s`` passes; then its last state)."""
        deadline = time.monotonic() + timeout_s
        while True:
            info = self.update_status(update_id)
            if info["status"] != "buffered" or time.monotonic() >= deadline:
                return info
            time.sleep(poll_s)

    # --- pull --------------------------------------------------------------------------------

    def pull(self, family: str, version: str = "active", models_dir: Path | None = None) -> Path:
        """Download a version into ``<models>/<family>-v<N>`` (skipped when already there).

        Returns the package folder; it loads with :meth:`ModelPackage.load` (sha256 checked).
        """
        info = self._json(f"/v1/models/{family}/versions/{version}/package")
        number = info.get("version") if isinstance(info, dict) else None
        manifest = info.get("manifest") if isinstance(info, dict) else None
        # The folder name and the package come from the server: a number, and the family and version asked for.
        sha = info.get("weights_sha256") if isinstance(info, dict) else None
        size = info.get("weights_size") if isinstance(info, dict) else None
        if (isinstance(number, bool) or not isinstance(number, int) or number < 1 or not isinstance(manifest, dict)
                or manifest.get("name") != family or str(manifest.get("version")) != str(number)
                or not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha)
                or not isinstance(info.get("weights_url"), str) or isinstance(size, bool) or not isinstance(size, int)
                or size < 0):
            raise SyncError(f"the server's description of {family} version {version} is not a valid package")
        target = (models_dir or user_models_dir()) / f"{family}-v{number}"
        part = self.downloads_dir / f"{info['weights_sha256']}.part"
        part.parent.mkdir(parents=True, exist_ok=True)
        # One download of a given file at a time, across threads and processes (Slicer + CLI).
        with FileLock(f"{part}.lock"):
            if _has_package(target, info["weights_sha256"]):
                return target
            self._download(part, info["weights_url"], info["weights_sha256"], info["weights_size"])
            with atomic_directory(target, marker=MANIFEST_NAME, what=PACKAGE_FOLDER) as tmp:
                part.replace(tmp / WEIGHTS_NAME)
                (tmp / MANIFEST_NAME).write_text(json.dumps(info["manifest"], indent=2) + "\n", encoding="utf-8")
                ModelPackage.load(tmp)  # schema, sha256, names and shapes, before the folder appears
        return target

    def _download(self, part: Path, path: str, sha256: str, size: int) -> None:
        """Fetch ``path`` into ``part``, resuming from what a previous attempt left there."""
        for _ in range(self.retries + 1):
            have = part.stat().st_size if part.exists() else 0
            if have > size:
                part.unlink()
                have = 0
            if have < size:
                headers = {"Range": f"bytes={have}-", "If-Range": f'"{sha256}"'} if have else {}
                try:
                    response = self._request("GET", path, stream=True, ok=(200, 206), headers=headers)
                    mode = "ab" if response.status_code == 206 else "wb"
                    with open(part, mode) as out:
                        for chunk in response.iter_content(CHUNK):
                            out.write(chunk)
                except requests.RequestException as exc:  # broken mid-stream: resume from what arrived
                    log.info("download interrupted (%s); resuming", type(exc).__name__)
                    continue
            if part.stat().st_size == size and _sha256_file(part) == sha256:
                return
            part.unlink(missing_ok=True)  # complete but wrong: start over
        raise SyncError(f"could not download {path} intact (sha256 {sha256[:12]}…)")

    # --- push --------------------------------------------------------------------------------

    def push(self, delta_blob: bytes, metadata: DeltaMetadata, idempotency_key: str | None = None) -> dict[str, Any]:
        """Upload one delta; returns ``{"id", "status", "duplicate"}`` (202 new, 200 seen before)."""
        if not metadata.parent_version.isdigit():
            raise SyncError(f"parent version {metadata.parent_version!r} is not a server version: only "
                            "deltas of models pulled from the server (or the bundled ones) can be pushed")
        response = self._request(
            "POST", f"/v1/models/{metadata.family}/updates", ok=(200, 202),
            files={"delta": (DELTA_NAME, delta_blob, "application/octet-stream")},
            data={"metadata": json.dumps(metadata.to_wire(delta_blob, idempotency_key))})
        path = f"/v1/models/{metadata.family}/updates"
        return _fields(_json_of(response, path), path, id=str, status=str)

    def push_folder(self, folder: str | Path) -> dict[str, Any]:
        """Push what ``dafne-slicer finetune`` wrote: ``delta.safetensors.zz`` + ``delta.json``."""
        folder = Path(folder)
        if not (folder / DELTA_NAME).is_file() or not (folder / DELTA_METADATA_NAME).is_file():
            raise SyncError(f"{folder} has no {DELTA_NAME} + {DELTA_METADATA_NAME} (the output of `finetune`)")
        try:
            metadata = DeltaMetadata.from_json(json.loads((folder / DELTA_METADATA_NAME).read_text(encoding="utf-8")))
        except (ValueError, TypeError, AttributeError, KeyError) as exc:  # hand-edited or truncated
            raise SyncError(f"{folder / DELTA_METADATA_NAME} is not a valid delta description ({type(exc).__name__}: "
                            f"{(str(exc).splitlines() or [''])[0]}); fine-tune again to write it") from None
        return self.push((folder / DELTA_NAME).read_bytes(), metadata)


def _has_package(folder: Path, sha256: str) -> bool:
    if not (folder / MANIFEST_NAME).is_file():
        return False
    try:
        return ModelPackage.load(folder).manifest.weights_sha256 == sha256
    except DafneError:
        log.warning("replacing the damaged local copy %s", folder)
        return False


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def push_update(config: ClientConfig, delta_blob: bytes, metadata: DeltaMetadata) -> dict[str, Any]:
    """One-call push (for scripts and the demo)."""
    return FederatedClient(config).push(delta_blob, metadata)


def pull_latest(config: ClientConfig, family: str, models_dir: Path | None = None) -> Path:
    """One-call pull of a family's active version; returns the package folder."""
    return FederatedClient(config).pull(family, "active", models_dir)


_ANOTHER_SERVER = "the server's reply to {path} is not {what} (a server of another kind or version?)"


def _fields(reply: Any, path: str, **kinds: type | tuple[type, ...]) -> dict[str, Any]:
    """``reply`` if it is an object holding each named field with a value of its kind (bool is not int);
    otherwise one sentence, not a KeyError from the caller."""
    def fits(value: Any, kind: type | tuple[type, ...]) -> bool:
        allowed = kind if isinstance(kind, tuple) else (kind,)
        return isinstance(value, allowed) and (not isinstance(value, bool) or bool in allowed)

    if not isinstance(reply, dict):
        raise SyncError(_ANOTHER_SERVER.format(path=path, what="an object"))
    wrong = [name for name, kind in kinds.items() if name not in reply or not fits(reply[name], kind)]
    if wrong:
        raise SyncError(_ANOTHER_SERVER.format(path=path, what=f"what this client expects ({', '.join(wrong)})"))
    return reply


def _json_of(response: requests.Response, path: str) -> Any:
    """The JSON body of a reply, or one sentence: a proxy's or captive portal's HTML page comes with 200 too."""
    try:
        return response.json()
    except ValueError:
        raise SyncError(f"the reply to {path} is not JSON (a proxy or login page in the way?)") from None

