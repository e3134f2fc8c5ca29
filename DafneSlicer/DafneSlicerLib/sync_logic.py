"""Share: the opt-in settings and the calls to the federated server, through ``dafne_logic.learning.federated_client``.

Settings live in the same owner-only file the command line uses (``dafne_logic.core.client_config``):
server URL, token, opt-in. Nothing leaves the computer unless the user ticked the opt-in box; the
client refuses every request otherwise, and this layer checks first to say so plainly. What is
sent is :data:`WHAT_IS_SENT`, shown verbatim in the module panel.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from dafne_logic.core.errors import DafneError

from .jobs import CancelCheck, ProgressCallback

if TYPE_CHECKING:
    from dafne_logic.core.client_config import ClientConfig

WHAT_IS_SENT = (
    "When you click Contribute, DafneSlicer sends the server: the weight difference between your improved "
    "model and the version it started from, that parent version, the number of slices you corrected, and "
    "the Dice overlap between the automatic and your corrected segmentation per muscle. Images, "
    "segmentations, names and any other patient data never leave this computer. Check for updates only "
    "downloads models. Nothing is sent while the box is unticked."
)
TOKEN_NOTE = ("The URL and token are kept in a settings file only your user account can read (the same file "
              "the dafne-slicer command line uses).")


class ShareError(DafneError):
    """Sharing is not enabled or not configured (nothing was sent)."""


@dataclass(frozen=True)
class SyncOutcome:
    message: str  # the "last sync" line
    new_models: tuple[str, ...] = ()  # newly pulled models (registry names), in the order pulled


class SyncLogic:
    """Reads/writes the share settings and runs pull/push (on whatever thread calls them)."""

    def __init__(self, config_path: Path | None = None):
        self.config_path = config_path  # None: the user's sync.json

    def load(self) -> ClientConfig:
        from dafne_logic.core.client_config import load_config

        return load_config(self.config_path)

    def save(self, opted_in: bool, server_url: str, token: str) -> None:
        from dafne_logic.core.client_config import check_server_url, check_token, save_config
        from dafne_logic.core.errors import DafneError

        url = server_url.strip().rstrip("/")
        try:
            if url:
                url = check_server_url(url)
            # A byte-order mark pasted from a Windows editor goes; accents are refused, unless sharing
            # is being turned off (an older saved token must not stand in the way of opting out).
            token = check_token(token) if opted_in else token.strip()
        except DafneError as exc:
            raise ShareError(f"{str(exc)[:1].upper()}{str(exc)[1:]}.") from None
        save_config(replace(self.load(), opt_in=bool(opted_in), server_url=url, token=token), self.config_path)

    def _client(self):
        config = self.load()
        if not config.opt_in:
            raise ShareError("Sharing is off: tick 'Share my improvements' first (nothing was sent).")
        if not config.server_url or not config.token:
            raise ShareError("Enter the server URL and your token first (nothing was sent).")
        from dafne_logic.learning.federated_client import FederatedClient

        return FederatedClient(config)

    def pull(self, families: list[str], progress: ProgressCallback, cancel: CancelCheck) -> SyncOutcome:
        """Download the server's active version of each model family (already present ones are skipped)."""
        from dafne_logic.core.paths import user_models_dir

        client = self._client()
        before = {p.name for p in user_models_dir().iterdir()} if user_models_dir().is_dir() else set()
        new = []
        for i, family in enumerate(families):
            if cancel():
                break
            progress(i / max(len(families), 1), f"checking {family}")
            folder = client.pull(family)
            if folder.name not in before:
                new.append(folder.name)
        if not new:
            return SyncOutcome(f"Up to date ({', '.join(families)}).")
        return SyncOutcome(f"Downloaded {', '.join(new)}.", new_models=tuple(new))

    def push(self, model_dir: Path, progress: ProgressCallback, cancel: CancelCheck) -> SyncOutcome:
        """Upload the delta saved beside an improved model (``delta.safetensors.zz`` + ``delta.json``)."""
        client = self._client()
        progress(0.1, "uploading the weight difference")
        receipt = client.push_folder(model_dir)
        seen = " (the server already had it)" if receipt.get("duplicate") else ""
        return SyncOutcome(f"Contributed {Path(model_dir).name}: update {receipt.get('id')} is "
                           f"{receipt.get('status')}{seen}.")
