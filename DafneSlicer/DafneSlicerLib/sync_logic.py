"""Share: opt-in settings and the calls to the federated server, through ``dafne_logic.federated_client``.

Nothing leaves the computer unless the user ticked the opt-in box: every network call checks it
first. What is sent is stated in :data:`WHAT_IS_SENT`, shown verbatim in the module panel.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from dafne_logic.errors import DafneError

from .jobs import CancelCheck, ProgressCallback

WHAT_IS_SENT = (
    "When you click Contribute, DafneSlicer sends the server: the weight difference between your improved "
    "model and the version it started from, that parent version, the number of slices you corrected, and "
    "the Dice overlap between the automatic and your corrected segmentation per muscle. Images, "
    "segmentations, names and any other patient data never leave this computer. Check for updates only "
    "downloads models. Nothing is sent while the box is unticked."
)
TOKEN_WARNING = ("The token is stored in Slicer's settings file in plain text; anyone who can read your "
                 "user account's files can use it.")


class SyncError(DafneError):
    """The server is unreachable, refused the token, or sharing is not enabled."""


class SettingsStore(Protocol):
    """``qt.QSettings`` in Slicer, a dict-backed fake in tests."""

    def value(self, key: str, default: Any = None) -> Any: ...
    def setValue(self, key: str, value: Any) -> None: ...  # noqa: N802 - Qt's name


@dataclass(frozen=True)
class SyncSettings:
    opted_in: bool = False
    server_url: str = ""
    token: str = ""


@dataclass(frozen=True)
class SyncOutcome:
    message: str  # the "last sync status" line
    model_name: str | None = None  # a newly pulled model to select


class SyncLogic:
    """Reads/writes the share settings and runs pull/push (on whatever thread calls them)."""

    PREFIX = "DafneSlicer/Share/"

    def __init__(self, store: SettingsStore):
        self.store = store

    def load(self) -> SyncSettings:
        opted = self.store.value(self.PREFIX + "OptedIn", False)
        return SyncSettings(
            opted_in=opted in (True, "true", "True", 1, "1"),  # QSettings returns strings from ini files
            server_url=str(self.store.value(self.PREFIX + "ServerURL", "") or ""),
            token=str(self.store.value(self.PREFIX + "Token", "") or ""),
        )

    def save(self, settings: SyncSettings) -> None:
        url = settings.server_url.strip()
        if url and not url.startswith(("https://", "http://localhost", "http://127.0.0.1")):
            raise SyncError("The server URL must start with https:// (plain http only for localhost).")
        self.store.setValue(self.PREFIX + "OptedIn", bool(settings.opted_in))
        self.store.setValue(self.PREFIX + "ServerURL", url)
        self.store.setValue(self.PREFIX + "Token", settings.token.strip())

    def _client(self) -> Any:
        settings = self.load()
        if not settings.opted_in:
            raise SyncError("Sharing is off: tick 'Share my improvements' first (nothing was sent).")
        if not settings.server_url or not settings.token:
            raise SyncError("Enter the server URL and your token first.")
        from dafne_logic import federated_client

        return federated_client.FederatedClient(settings.server_url, settings.token)

    def pull(self, progress: ProgressCallback, cancel: CancelCheck) -> SyncOutcome:
        """Download the server's newest versions of the model families; report what changed."""
        client = self._client()
        progress(0.1, "asking the server for new versions")
        pulled = client.pull(progress=progress, cancel=cancel)
        if not pulled:
            return SyncOutcome("Up to date: no newer model on the server.")
        names = ", ".join(f"{p.name} {p.version}" for p in pulled)
        return SyncOutcome(f"Downloaded {names}.", model_name=pulled[-1].name)

    def push(self, model_dir: Path, progress: ProgressCallback, cancel: CancelCheck) -> SyncOutcome:
        """Upload the delta saved beside an improved model (``delta.safetensors.zz`` + ``delta.json``)."""
        client = self._client()
        progress(0.1, "uploading the weight difference")
        receipt = client.push(model_dir, progress=progress, cancel=cancel)
        return SyncOutcome(f"Contributed {Path(model_dir).name}: {receipt}.")
