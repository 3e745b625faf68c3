"""Command line: `resolverd run -c FILE`, `check-config FILE`, `version`, and
the API client commands `resolve`, `status`, `register`, `deregister`."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from resolverd import __version__

if TYPE_CHECKING:
    from resolverd.client import Client, Endpoint

CLIENT_COMMANDS = ("resolve", "status", "register", "deregister")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resolverd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("-c", "--config", required=True, help="YAML config file")
    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("file")
    sub.add_parser("version", help="print the version")

    api = argparse.ArgumentParser(add_help=False)
    api.add_argument(
        "--api",
        metavar="TARGET",
        default=os.environ.get("RESOLVERD_API", "127.0.0.1:50051"),
        help="gRPC API: host:port or unix:/path (default: $RESOLVERD_API or %(default)s)",
    )
    api.add_argument(
        "--token",
        default=os.environ.get("RESOLVERD_TOKEN"),
        help="bearer token for changes (default: $RESOLVERD_TOKEN)",
    )
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON")

    resolve = sub.add_parser(
        "resolve", parents=[api, as_json], help="print a service's endpoints, best first"
    )
    resolve.add_argument("service")
    resolve.add_argument("--version", default="", help="exact version to select")
    resolve.add_argument(
        "--tag",
        action="append",
        default=[],
        dest="tags",
        metavar="TAG",
        help="required tag (repeatable)",
    )
    resolve.add_argument("--session", default="", metavar="KEY", help="sticky-session key")
    resolve.add_argument("--address", default="", metavar="IP", help="client IP for ip_hash")
    resolve.add_argument("--limit", type=int, default=0, metavar="N", help="at most N endpoints")

    sub.add_parser("status", parents=[api, as_json], help="instance health counts per service")

    register = sub.add_parser("register", parents=[api], help="register an instance")
    register.add_argument("--id", required=True)
    register.add_argument("--name", required=True, help="service name")
    register.add_argument("--address", required=True)
    register.add_argument("--port", required=True, type=int)
    register.add_argument("--version", default="")
    register.add_argument(
        "--tag", action="append", default=[], dest="tags", metavar="TAG", help="repeatable"
    )
    register.add_argument(
        "--meta", action="append", default=[], type=_key_value, metavar="K=V", help="repeatable"
    )
    register.add_argument(
        "--health", choices=("healthy", "unhealthy", "critical"), default="healthy"
    )

    deregister = sub.add_parser("deregister", parents=[api], help="remove a registration")
    deregister.add_argument("id")
    return parser


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(f"resolverd {__version__}")
        return 0
    if args.command in CLIENT_COMMANDS:
        try:
            return asyncio.run(_client_command(args))
        except BrokenPipeError:
            # `resolverd status | head`: the reader left; not an error of ours.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0

    from resolverd.config import ConfigError, load_config

    path = args.file if args.command == "check-config" else args.config
    try:
        config = load_config(path)
    except ConfigError as err:
        print(f"resolverd: {err}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        print(f"{path}: ok ({len(config.providers)} provider(s))")
        return 0
    return _run(config)


def _run(config: object) -> int:
    import uvloop

    from resolverd import log
    from resolverd.config import Config
    from resolverd.daemon import serve
    from resolverd.providers import ProviderUnavailableError
    from resolverd.providers.registrations import StateFileError

    assert isinstance(config, Config)
    log.configure(level=config.log.level, fmt=config.log.format)
    try:
        uvloop.run(serve(config))
    except StateFileError as err:
        print(f"resolverd: {err}", file=sys.stderr)
        return 2
    except ProviderUnavailableError as err:
        print(f"resolverd: {config.file}: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"resolverd: cannot listen: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


async def _client_command(args: argparse.Namespace) -> int:
    from resolverd.client import Client, ResolverError

    try:
        async with Client(args.api, token=args.token) as client:
            if args.command == "resolve":
                await _resolve(client, args)
            elif args.command == "status":
                await _status(client, args)
            elif args.command == "register":
                await _register(client, args)
            else:
                revision = await client.deregister(args.id)
                print(f"deregistered {args.id} (revision {revision})")
    except ResolverError as err:
        print(f"resolverd: {err}", file=sys.stderr)
        return 1
    return 0


async def _resolve(client: Client, args: argparse.Namespace) -> None:
    res = await client.resolve(
        args.service,
        version=args.version,
        tags=args.tags,
        session_key=args.session,
        address=args.address,
        limit=args.limit,
    )
    if args.json:
        endpoints = [_endpoint_json(e) for e in res.endpoints]
        print(json.dumps({"revision": res.revision, "ttl": res.ttl, "endpoints": endpoints}))
        return
    rows = [
        [
            str(rank),
            e.id,
            f"[{e.address}]:{e.port}" if ":" in e.address else f"{e.address}:{e.port}",
            f"v{e.version}" if e.version else "-",
            e.health.value,
            f"weight={e.weight}",
            f"[{','.join(e.tags)}]",
        ]
        for rank, e in enumerate(res.endpoints, 1)
    ]
    _print_table(rows)


def _endpoint_json(e: Endpoint) -> dict[str, object]:
    return {
        "id": e.id,
        "address": e.address,
        "port": e.port,
        "version": e.version,
        "tags": list(e.tags),
        "metadata": dict(e.metadata),
        "health": e.health.value,
        "weight": e.weight,
        "provider": e.provider,
        "target": e.target,
        "open_connections": e.open_connections,
        "successes": e.successes,
        "failures": e.failures,
        "average_latency_ms": e.average_latency_ms,
    }


async def _status(client: Client, args: argparse.Namespace) -> None:
    status = await client.health_status()
    providers = await client.provider_status()
    if args.json:
        print(
            json.dumps(
                {
                    "services": status,
                    "providers": [dataclasses.asdict(p) for p in providers],
                }
            )
        )
        return
    columns = ("total", "healthy", "unhealthy", "critical")
    rows = [["SERVICE", *(c.upper() for c in columns)]]
    rows += [[name, *(str(counts[c]) for c in columns)] for name, counts in status.items()]
    _print_table(rows)
    print()
    rows = [["PROVIDER", "TYPE", "STATE", "INSTANCES", "AGE", "ERROR"]]
    for p in providers:
        state = "stale" if p.stale else "synced" if p.synced else "starting"
        rows.append(
            [p.name, p.type, state, str(p.instances), f"{p.age_seconds:.0f}s", p.error or "-"]
        )
    _print_table(rows)


async def _register(client: Client, args: argparse.Namespace) -> None:
    from resolverd.model import Health

    revision = await client.register(
        id=args.id,
        name=args.name,
        address=args.address,
        port=args.port,
        version=args.version,
        tags=args.tags,
        metadata=dict(args.meta),
        health=Health(args.health),
    )
    print(f"registered {args.id} (revision {revision})")


def _print_table(rows: Sequence[Sequence[str]]) -> None:
    """Columns padded to their widest cell, two spaces apart (the last one unpadded)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))] if rows else []
    for row in rows:
        cells = [cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=False)]
        print("  ".join([*cells, row[-1]]))
