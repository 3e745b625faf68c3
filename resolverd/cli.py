"""Command line: `resolverd run -c FILE`, `check-config FILE`, `version`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from resolverd import __version__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resolverd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("-c", "--config", required=True, help="YAML config file")
    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("file")
    sub.add_parser("version", help="print the version")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(f"resolverd {__version__}")
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
