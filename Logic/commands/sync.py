"""``dafne-slicer sync``: opt-in exchange with a federated server (nothing is sent before opting in)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="sync_command", metavar="ACTION", required=True)
    p = sub.add_parser("setup", help="set the server, token and opt-in (saved owner-only)")
    p.add_argument("--server", help="server URL, e.g. https://dafne.example.org")
    p.add_argument("--token", help="your token (it stays in the shell's history: --token-file - is safer)")
    p.add_argument("--token-file", help="read the token from this file; '-' reads it from standard input "
                                        "(a prompt that does not echo on a terminal)")
    p.add_argument("--ca-bundle", help="CA certificates (PEM) that sign the server's certificate, if private")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--opt-in", action="store_true", help="allow sending updates and fetching models")
    group.add_argument("--opt-out", action="store_true", help="stop all communication with the server")
    p.set_defaults(func=run_setup)

    p = sub.add_parser("status", help="configuration, your account and the server's model families")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_status)

    p = sub.add_parser("pull", help="download a family's active (or given) version into your models")
    p.add_argument("family")
    p.add_argument("--version", default="active")
    p.set_defaults(func=run_pull)

    p = sub.add_parser("push", help="upload the delta written by `dafne-slicer finetune` (folder)")
    p.add_argument("folder", help="output folder of `finetune` (delta.safetensors.zz + delta.json)")
    p.add_argument("--wait", type=float, default=0.0, help="seconds to wait for the merge outcome")
    p.set_defaults(func=run_push)


def run_setup(args: argparse.Namespace) -> int:
    from dafne_logic.core.client_config import (
        ConfigExposedError,
        check_server_url,
        check_token,
        load_config,
        salvage_config,
        save_config,
    )
    from dafne_logic.core.errors import DafneError

    try:
        config = load_config()
    except ConfigExposedError:  # readable by others: its owner must see to it first (the message says how)
        raise
    except DafneError as exc:  # setup is how a damaged file is mended: what passes its checks is kept
        config, dropped = salvage_config()
        print(f"warning: {exc}; kept what was valid, dropped: {', '.join(dropped) or 'nothing'}", file=sys.stderr)
    if args.server:
        config.server_url = check_server_url(args.server)
    if args.token_file == "-":
        import getpass

        config.token = (getpass.getpass("token: ") if sys.stdin.isatty() else sys.stdin.readline()).strip()
    elif args.token_file:
        try:  # utf-8-sig: Windows editors may start the file with a byte-order mark
            with open(args.token_file, encoding="utf-8-sig") as f:
                config.token = f.read().strip()
        except UnicodeDecodeError:
            raise DafneError(f"{args.token_file} is not UTF-8 text (PowerShell's `>` writes UTF-16): save the token "
                             "as UTF-8, e.g. `Set-Content token.txt TOKEN -Encoding utf8`") from None
    elif args.token:
        config.token = args.token
    if args.token_file or args.token:  # a new token only: opting out works whatever an older one holds
        config.token = check_token(config.token)
    if args.ca_bundle:
        config.verify_tls = str(Path(args.ca_bundle).resolve())
    if args.opt_in:
        config.opt_in = True
    if args.opt_out:
        config.opt_in = False
    path = save_config(config)
    print(f"saved {path}: server {config.server_url or '-'}, token {'set' if config.token else 'unset'}, "
          f"sync {'ON' if config.opt_in else 'OFF'}")
    return 0


def run_status(args: argparse.Namespace) -> int:
    from dafne_logic.core.client_config import config_path, load_config
    from dafne_logic.learning.federated_client import FederatedClient

    config = load_config()
    status = {"config": str(config_path()), "server": config.server_url, "opt_in": config.opt_in,
              "token": "set" if config.token else "unset"}
    if config.opt_in:
        client = FederatedClient(config)
        status["me"] = client.me()
        status["families"] = client.families()
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(f"config {status['config']}: server {status['server'] or '-'}, token {status['token']}, "
          f"sync {'ON' if config.opt_in else 'OFF (nothing is sent)'}")
    if config.opt_in:
        print(f"signed in as {status['me']['name']} ({status['me']['scope']}), {status['me']['updates']} uploads")
        for f in status["families"]:
            print(f"  {f['name']:<12} active version {f['active_version']}  buffered updates {f['buffered_updates']}")
    return 0


def run_pull(args: argparse.Namespace) -> int:
    from dafne_logic.learning.federated_client import FederatedClient

    path = FederatedClient().pull(args.family, args.version)
    print(f"{args.family} version {args.version} in {path}")
    return 0


def run_push(args: argparse.Namespace) -> int:
    from dafne_logic.learning.federated_client import FederatedClient

    client = FederatedClient()
    result = client.push_folder(args.folder)
    print(f"update {result['id']}: {result['status']}{' (already uploaded)' if result.get('duplicate') else ''}")
    if args.wait > 0:
        info = client.wait_for_update(result["id"], args.wait)
        print(f"update {info['id']}: {info['status']}"
              + (f" into version {info['merged_into']}" if info["merged_into"] else "")
              + (f" ({info['reason']})" if info["reason"] else ""))
    return 0
