"""The sync client's settings: server URL, token and the user's opt-in, in an owner-only file.

``<user data dir>/sync.json`` (see :func:`dafne_logic.core.paths.user_data_dir`): mode 0600 on POSIX; on
Windows the user's application data folder, whose access list admits only the user (file modes there
only toggle read-only).
Sync is **off** until the user opts in; a missing file means "not opted in".
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

from dafne_logic.core.atomic import atomic_path
from dafne_logic.core.errors import DafneError
from dafne_logic.core.paths import user_data_dir

CONFIG_NAME = "sync.json"


@dataclass
class ClientConfig:
    server_url: str = ""
    token: str = ""
    opt_in: bool = False  # nothing is ever sent while this is False
    verify_tls: bool | str = True  # or the path of a CA bundle (PEM) for a server with a private CA
    timeout_s: float = 30.0

    def __repr__(self) -> str:  # keep the token out of logs and tracebacks
        token = "set" if self.token else "unset"
        return f"ClientConfig(server_url={self.server_url!r}, opt_in={self.opt_in}, token={token})"


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def check_server_url(url: str) -> str:
    """``url`` without a trailing slash, if the token may travel to it: https, or plain http to this
    machine only. The host is parsed, not prefix-matched: ``http://localhost.evil.example`` and
    ``http://localhost@evil.example`` are other machines.

    Raises:
        DafneError: another scheme, plain http to another host, or no host.
    """
    from urllib.parse import urlsplit

    url = url.strip().rstrip("/")
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        raise DafneError(f"{url!r} is not a valid server URL") from None
    if parts.scheme not in ("https", "http") or not host or parts.username is not None:
        raise DafneError(f"{url!r} is not a server URL like https://dafne.example.org")
    if parts.scheme == "http" and host not in LOOPBACK_HOSTS:
        raise DafneError("the server URL must use https:// (plain http only for localhost)")
    return url


def check_token(token: str) -> str:
    """``token`` without surrounding blanks or a byte-order mark (Windows editors add one), if it can
    travel in an HTTP header: printable ASCII, no spaces. Empty means unset.

    Raises:
        DafneError: other characters (a token copied with an ellipsis, saved as UTF-16, ...).
    """
    token = token.strip().lstrip("\ufeff").strip()
    if token and not all("!" <= ch <= "~" for ch in token):
        raise DafneError("the token holds characters a token never has (spaces, accents or a text-editor "
                         "encoding mark): copy it again exactly as it was issued, saved as plain UTF-8 text")
    return token


def config_path() -> Path:
    return user_data_dir() / CONFIG_NAME


def load_config(path: Path | None = None) -> ClientConfig:
    """The saved settings, or defaults (not opted in) when there is no file.

    Raises:
        DafneError: the file is unreadable, not owner-only, or malformed.
    """
    path = path or config_path()
    if not path.is_file():
        return ClientConfig()
    mode = stat.S_IMODE(path.stat().st_mode)
    if os.name == "posix" and mode & 0o077:
        raise ConfigExposedError(f"{path} is readable by other users (mode {mode:o}); run `chmod 600 {path}`")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))  # Notepad's UTF-8 begins with a byte-order mark
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DafneError(f"{path} is not a valid sync configuration ({exc}); save it as UTF-8 JSON, "
                         "or write it again with `dafne-slicer sync setup`") from exc
    if not isinstance(data, dict):
        raise DafneError(f"{path} is not a valid sync configuration (not a JSON object)")
    problem = _wrong_field(data)
    if problem:
        raise DafneError(f"{path} is not a valid sync configuration: {problem}; "
                         "write it again with `dafne-slicer sync setup`")
    return ClientConfig(**{k: data[k] for k in ClientConfig.__dataclass_fields__ if k in data})


class ConfigExposedError(DafneError):
    """The settings file (which holds the token) is readable by other users: never read or rewritten
    until its owner has seen to it."""


def salvage_config(path: Path | None = None) -> tuple[ClientConfig, list[str]]:
    """The fields of a damaged ``sync.json`` that pass their checks, and the names of those dropped
    (``["the whole file"]`` when it is no JSON object in UTF-8 or UTF-16). For ``sync setup``, which
    mends the file: a token is issued once, so a file with one bad field must not lose it."""
    path = path or config_path()
    try:
        raw = path.read_bytes()
    except OSError as exc:  # unreadable (another owner, after sudo): not damage, and never replaced
        raise DafneError(f"cannot read {path}: {exc.strerror or exc}; fix its owner or permissions first") from exc
    # UTF-16 only with its byte-order mark (without one it decodes anything into garbage); else UTF-8, else
    # the Windows "ANSI" code page older Notepads saved in (an accented user name in a CA bundle path).
    encodings = ("utf-16",) if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ("utf-8-sig", "cp1252")
    data = None
    for encoding in encodings:
        try:
            data = json.loads(raw.decode(encoding))
            break
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
    if not isinstance(data, dict):
        return ClientConfig(), ["the whole file"]
    kept = {k: data[k] for k in ClientConfig.__dataclass_fields__ if k in data and _wrong_field({k: data[k]}) is None}
    dropped = sorted(k for k in ClientConfig.__dataclass_fields__ if k in data and k not in kept)
    return ClientConfig(**kept), dropped


def _wrong_field(data: dict) -> str | None:
    """The first field of a hand-edited ``sync.json`` with a wrong type, described; None when all fit.

    Types are checked, not converted: ``"opt_in": "false"`` is a non-empty string, true to Python,
    and must not turn sharing on.
    """
    for name in ("server_url", "token"):
        if name in data and not isinstance(data[name], str):
            return f"{name} must be text"
    if "opt_in" in data and not isinstance(data["opt_in"], bool):
        return f"opt_in must be true or false (without quotes), not {json.dumps(data['opt_in'])}"
    if "verify_tls" in data and not isinstance(data["verify_tls"], (bool, str)):
        return "verify_tls must be true, false or the path of a CA bundle"
    timeout = data.get("timeout_s", 30.0)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 3600:
        return "timeout_s must be a number of seconds from 0 to 3600"
    return None


def save_config(config: ClientConfig, path: Path | None = None) -> Path:
    """Write the settings atomically, owner-only from the file's creation on (see :func:`atomic_path`)."""
    path = path or config_path()
    with atomic_path(path, owner_only=True) as tmp:
        tmp.write_text(json.dumps(asdict(config), indent=2) + "\n", encoding="utf-8")
    return path
