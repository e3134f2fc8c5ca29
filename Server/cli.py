"""``dafne-server``: initialise, run and administer the federated server (see Docs/server.md).

Needs the ``server`` extra (``pip install dafne-slicer[server]``). Heavy modules are imported by the
action that needs them, so ``dafne-server --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from dafne_logic.cli import run_parsed
from dafne_logic.core.errors import DafneError


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", required=True, help="server folder: SQLite database and blobs")
    parser.add_argument("--database-url", default="",
                        help="SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db (default: SQLite in --data-dir)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dafne-server", description="The DafneSlicer federated server.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks and debug logging")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser("init", help="create the database and seed families from the bundled models")
    _common(p)
    p.add_argument("--family", help="seed this family from --package instead of the bundled models")
    p.add_argument("--package", help="model package folder for --family")
    p.add_argument("--buffer-size", type=int, help="default K (updates per merge) for new families")
    p.set_defaults(func=run_init)

    p = sub.add_parser("run", help="serve the API with a merge worker")
    _common(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8642)
    p.add_argument("--workers", type=int, default=1, help="uvicorn API processes")
    p.add_argument("--no-merge-worker", action="store_true", help="API only (a merge worker runs elsewhere)")
    p.add_argument("--validation", default="phantom",
                   help='"phantom" (default), "none", or a folder with <family>/<case>_image.*, <case>_labels.*')
    p.add_argument("--validation-cases", type=int, default=2)
    p.add_argument("--validation-shape", type=int, nargs=3, metavar=("Z", "Y", "X"), default=(12, 96, 128))
    p.add_argument("--max-upload-mb", type=float, default=32.0)
    p.add_argument("--uploads-per-hour", type=int, default=30, help="accepted uploads per user and hour")
    p.add_argument("--refused-uploads-per-hour", type=int, default=60,
                   help="refused uploads per user and hour before further uploads are not checked")
    p.add_argument("--max-concurrent-uploads", type=int, default=8,
                   help="uploads checked at once per API process (more wait for a 429 and retry)")
    p.add_argument("--max-concurrent-uploads-per-user", type=int, default=2)
    p.add_argument("--lease-ttl", type=float, default=60.0, help="seconds before a dead merge's lease expires")
    p.add_argument("--poll-interval", type=float, default=1.0)
    p.add_argument("--ssl-certfile", help="serve HTTPS with this certificate (PEM)")
    p.add_argument("--ssl-keyfile", help="private key of --ssl-certfile (PEM)")
    p.add_argument("--merge-hold", type=float, default=0.0, help=argparse.SUPPRESS)  # fault-injection tests
    p.set_defaults(func=run_serve)

    p = sub.add_parser("worker", help="run only a merge worker")
    _common(p)
    p.add_argument("--validation", default="phantom")
    p.set_defaults(func=run_worker)

    p = sub.add_parser("gc", help="remove blobs no version or update references (also done at every start)")
    _common(p)
    p.add_argument("--older-than-hours", type=float, default=1.0,
                   help="keep younger blobs: an upload writes its blob just before committing its row")
    p.set_defaults(func=run_gc)

    p = sub.add_parser("add-user", help="add a user and print their token (shown once)")
    _common(p)
    p.add_argument("name")
    p.add_argument("--admin", action="store_true")
    p.add_argument("--expires-days", type=float)
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


def _storage(args: argparse.Namespace, **extra):
    from dafne_server.runner import prepare

    return prepare(_settings(args, **extra))


def run_init(args: argparse.Namespace) -> int:
    from dafne_logic.inference.model_package import ModelPackage

    merge = {"buffer_size": args.buffer_size} if args.buffer_size else {}
    storage = _storage(args, merge=merge)
    try:
        if args.family or args.package:
            if not (args.family and args.package):
                raise DafneError("--family and --package go together")
            with storage.session.begin() as session:
                try:
                    storage.add_family(session, args.family, ModelPackage.load(args.package), "cli")
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

    settings = _settings(args, validation=args.validation, validation_cases=args.validation_cases,
                         validation_shape=tuple(args.validation_shape),
                         max_upload_bytes=int(args.max_upload_mb * (1 << 20)),
                         uploads_per_hour=args.uploads_per_hour,
                         refused_uploads_per_hour=args.refused_uploads_per_hour,
                         max_concurrent_uploads=args.max_concurrent_uploads,
                         max_concurrent_uploads_per_user=args.max_concurrent_uploads_per_user, lease_ttl_s=args.lease_ttl,
                         poll_interval_s=args.poll_interval, merge_hold_s=args.merge_hold)
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        raise DafneError("--ssl-certfile and --ssl-keyfile go together")
    serve(settings, args.host, args.port, args.workers, merge_worker=not args.no_merge_worker,
          log_level="debug" if args.verbose else "info", ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile)
    return 0


def run_worker(args: argparse.Namespace) -> int:
    from dafne_server.worker import run_worker as worker_loop

    settings = _settings(args, validation=args.validation)
    _storage(args).dispose()
    logging.getLogger().setLevel(logging.INFO)
    worker_loop(settings)
    return 0


def run_gc(args: argparse.Namespace) -> int:
    from dafne_server.storage import Storage

    storage = Storage(_settings(args))
    try:
        storage.migrate()
        removed = storage.collect_blobs(older_than_s=args.older_than_hours * 3600)
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
