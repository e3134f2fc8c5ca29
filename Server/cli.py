"""``dafne-server``: initialise, run and administer the federated server (see Docs/server.md).

Needs the ``server`` extra (``pip install dafne-slicer[server]``). Heavy modules are imported by the
action that needs them, so ``dafne-server --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence

from dafne_logic.cli import run_parsed
from dafne_logic.core.errors import DafneError


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", required=True, help="server folder: SQLite database and blobs")
    parser.add_argument("--database-url", default="",
                        help="SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db (default: SQLite in --data-dir)")


def _number(low: float, high: float = math.inf, low_open: bool = True, integer: bool = False):
    """An argparse type: a finite number in (low, high] (or [low, high]), else one sentence, exit 2."""
    def parse(text: str) -> float:
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if integer else ' number'}") from None
        below = value <= low if low_open else value < low
        if (not integer and not math.isfinite(value)) or below or value > high:  # isfinite overflows on huge ints
            bounds = f"{'above' if low_open else 'at least'} {low:g}" + ("" if high == math.inf else f" and at most {high:g}")
            raise argparse.ArgumentTypeError(f"{text} must be a finite number {bounds}")
        return value
    return parse


POSITIVE = _number(0.0)
NON_NEGATIVE = _number(0.0, low_open=False)
POSITIVE_INT = _number(0.0, 1e9, integer=True)
NON_NEGATIVE_INT = _number(0.0, 1e9, low_open=False, integer=True)


def _shared_options(parser: argparse.ArgumentParser) -> None:
    """Settings every merge worker of the server must share: stored in the data folder when given."""
    group = parser.add_argument_group("merge settings shared by every merge worker (stored in --data-dir; "
                                      "omitted: as stored, else the default)")
    group.add_argument("--validation",
                       help='"phantom" (default), "none", or a folder with <family>/<case>_image.*, <case>_labels.*')
    group.add_argument("--validation-cases", type=POSITIVE_INT, help="phantoms per family (default 2)")
    group.add_argument("--validation-shape", type=POSITIVE_INT, nargs=3, metavar=("Z", "Y", "X"),
                       help="phantom voxels (default 12 96 128)")
    group.add_argument("--lease-ttl", type=POSITIVE, help="seconds before a dead merge's lease expires (default 60)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dafne-server", description="The DafneSlicer federated server.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks and debug logging")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser("init", help="create the database and seed families from the bundled models")
    _common(p)
    p.add_argument("--family", help="seed this family from --package instead of the bundled models")
    p.add_argument("--package", help="model package folder for --family")
    p.add_argument("--buffer-size", type=POSITIVE_INT, help="default K (updates per merge) for new families")
    _shared_options(p)
    p.set_defaults(func=run_init)

    p = sub.add_parser("run", help="serve the API with a merge worker")
    _common(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8642)
    p.add_argument("--workers", type=POSITIVE_INT, default=1, help="uvicorn API processes")
    p.add_argument("--no-merge-worker", action="store_true", help="API only (a merge worker runs elsewhere)")
    _shared_options(p)
    p.add_argument("--max-upload-mb", type=_number(0.0, 4096.0), default=32.0)
    p.add_argument("--uploads-per-hour", type=NON_NEGATIVE_INT, default=30, help="accepted uploads per user and hour")
    p.add_argument("--refused-uploads-per-hour", type=NON_NEGATIVE_INT, default=60,
                   help="refused uploads per user and hour before further uploads are not checked")
    p.add_argument("--max-concurrent-uploads", type=POSITIVE_INT, default=8,
                   help="uploads checked at once per API process (more wait for a 429 and retry)")
    p.add_argument("--max-concurrent-uploads-per-user", type=POSITIVE_INT, default=2)
    p.add_argument("--poll-interval", type=POSITIVE, default=1.0)
    p.add_argument("--header-timeout", type=POSITIVE, default=10.0,
                   help="seconds a client has to send a request's headers (then 408)")
    p.add_argument("--body-timeout", type=POSITIVE, default=30.0,
                   help="seconds a client has to send a request's body, plus 1 s per 50 kB received (then 408)")
    p.add_argument("--max-connections", type=POSITIVE_INT, default=200,
                   help="open connections per API process; beyond this, 503")
    p.add_argument("--public-dashboard", action="store_true",
                   help="show the dashboard at / without a login (it shows aggregates only)")
    p.add_argument("--worker-missing-after", type=POSITIVE, default=15.0,
                   help="seconds without a merge worker's heartbeat before /healthz reports it missing")
    p.add_argument("--worker-stuck-after", type=POSITIVE, default=1800.0,
                   help="seconds a merge worker may spend on one step (a merge) before it is replaced")
    p.add_argument("--ssl-certfile", help="serve HTTPS with this certificate (PEM)")
    p.add_argument("--ssl-keyfile", help="private key of --ssl-certfile (PEM)")
    p.add_argument("--merge-hold", type=NON_NEGATIVE, default=0.0, help=argparse.SUPPRESS)  # fault-injection tests
    p.set_defaults(func=run_serve)

    p = sub.add_parser("worker", help="run only a merge worker (with the merge settings its server stored)")
    _common(p)
    p.set_defaults(func=run_worker)

    p = sub.add_parser("gc", help="remove blobs nothing needs any more (orphans are also removed at every start)")
    _common(p)
    p.add_argument("--older-than-hours", type=NON_NEGATIVE, default=1.0,
                   help="keep younger blobs: an upload writes its blob just before committing its row")
    p.add_argument("--keep-update-deltas-days", type=NON_NEGATIVE, default=30.0,
                   help="collect the deltas of updates merged or rejected longer ago than this (default 30; their "
                        "rows stay); only gc does this, never a start")
    p.set_defaults(func=run_gc)

    p = sub.add_parser("add-user", help="add a user and print their token (shown once)")
    _common(p)
    p.add_argument("name")
    p.add_argument("--admin", action="store_true")
    p.add_argument("--expires-days", type=_number(0.0, 3650.0), help="token lifetime (default: no expiry)")
    p.set_defaults(func=run_add_user)

    p = sub.add_parser("revoke", help="revoke a token by its id (the number after dft_)")
    _common(p)
    p.add_argument("token_id", type=int)
    p.set_defaults(func=run_revoke)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    return run_parsed(args, f"dafne-server {args.action}")


def _settings(args: argparse.Namespace, **extra):
    from dafne_server.config import ServerSettings

    return ServerSettings(data_dir=args.data_dir, database_url=args.database_url, **extra)


def _shared_settings(args: argparse.Namespace, **extra):
    """This data folder's settings: the stored shared ones, changed by the flags given, stored back."""
    from dataclasses import replace

    from dafne_server.config import load_shared, store_shared
    from dafne_server.runner import check_data_folder

    check_data_folder(args.data_dir)  # before settings.json would make any folder look like a data folder
    given = {"validation": args.validation, "validation_cases": args.validation_cases,
             "validation_shape": tuple(args.validation_shape) if args.validation_shape else None,
             "lease_ttl_s": args.lease_ttl}
    settings = replace(load_shared(_settings(args, **extra)), **{k: v for k, v in given.items() if v is not None})
    store_shared(settings)
    return settings


def _storage(args: argparse.Namespace, **extra):
    from dafne_server.runner import prepare

    return prepare(_settings(args, **extra))


def run_init(args: argparse.Namespace) -> int:
    from dafne_logic.inference.model_package import ModelPackage
    from dafne_server.runner import prepare
    from dafne_server.storage import check_family_name

    if bool(args.family) != bool(args.package):
        raise DafneError("--family and --package go together")
    if args.family:
        try:
            check_family_name(args.family)  # before the shared settings are stored
        except ValueError as exc:
            raise DafneError(str(exc)) from exc
    package = ModelPackage.load(args.package) if args.package else None  # a bad package stores no settings
    merge = {"buffer_size": args.buffer_size} if args.buffer_size else {}
    storage = prepare(_shared_settings(args, merge=merge))
    try:
        if package is not None:
            with storage.session.begin() as session:
                try:
                    storage.add_family(session, args.family, package, "cli")
                except ValueError as exc:
                    raise DafneError(str(exc)) from exc
            added = [args.family]
        else:
            added = storage.seed_bundled()
    finally:
        storage.dispose()
    print(f"server data in {args.data_dir}; families added: {', '.join(added) or 'none'}")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from dafne_server.runner import serve

    settings = _shared_settings(args, max_upload_bytes=int(args.max_upload_mb * (1 << 20)),
                                uploads_per_hour=args.uploads_per_hour,
                                refused_uploads_per_hour=args.refused_uploads_per_hour,
                                max_concurrent_uploads=args.max_concurrent_uploads,
                                max_concurrent_uploads_per_user=args.max_concurrent_uploads_per_user,
                                poll_interval_s=args.poll_interval, merge_hold_s=args.merge_hold,
                                worker_missing_after_s=args.worker_missing_after,
                                worker_heartbeat_s=min(2.0, args.worker_missing_after / 4),
                                worker_stuck_after_s=args.worker_stuck_after,
                                header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout,
                                max_connections=args.max_connections, public_dashboard=args.public_dashboard)
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        raise DafneError("--ssl-certfile and --ssl-keyfile go together")
    serve(settings, args.host, args.port, args.workers, merge_worker=not args.no_merge_worker,
          log_level="debug" if args.verbose else "info", ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile)
    return 0


def run_worker(args: argparse.Namespace) -> int:
    from dafne_server.config import load_shared
    from dafne_server.worker import run_worker as worker_loop

    settings = load_shared(_settings(args))
    _storage(args).dispose()
    logging.getLogger().setLevel(logging.INFO)
    worker_loop(settings)
    return 0


def run_gc(args: argparse.Namespace) -> int:
    from dafne_server.storage import Storage

    storage = Storage(_settings(args))
    try:
        storage.migrate()
        removed = storage.collect_blobs(older_than_s=args.older_than_hours * 3600,
                                        update_delta_days=args.keep_update_deltas_days)
    finally:
        storage.dispose()
    print(f"{removed} unreferenced blob(s) removed")
    return 0


def run_add_user(args: argparse.Namespace) -> int:
    from dafne_server.auth import create_user

    storage = _storage(args)
    try:
        with storage.session.begin() as session:
            token = create_user(session, args.name, args.admin, "cli",
                                None if args.expires_days is None else args.expires_days * 86400)
    except ValueError as exc:
        raise DafneError(str(exc)) from exc
    finally:
        storage.dispose()
    print(json.dumps({"user": args.name, "admin": args.admin, "token": token}))
    return 0


def run_revoke(args: argparse.Namespace) -> int:
    from dafne_server.auth import revoke_token

    storage = _storage(args)
    try:
        with storage.session.begin() as session:
            if not revoke_token(session, args.token_id, "cli"):
                raise DafneError(f"no live token {args.token_id}")
    finally:
        storage.dispose()
    print(f"token {args.token_id} revoked")
    return 0


if __name__ == "__main__":
    sys.exit(main())
