"""Command line: the only module that may exit the process."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import Sequence

import uvloop
import yaml

from proxy import __version__
from proxy.config import Config, ConfigError, LoggingConfig, config_to_dict, load_config

EXIT_CONFIG = 2


class JsonFormatter(logging.Formatter):
    """One JSON object per line: what log pipelines (Loki, CloudWatch, ...) ingest as is."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(config: LoggingConfig) -> None:
    handler = logging.StreamHandler(sys.stdout)
    if config.format == "json":
        formatter: logging.Formatter = JsonFormatter()
        formatter.converter = time.gmtime
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.level.upper())
    # aiohttp logs every disconnect at error level with a traceback; we count them instead.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)


def _load(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as err:
        # Exactly one line, naming the file, the key and the bad value; no traceback.
        print(err, file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def cmd_serve(args: argparse.Namespace) -> int:
    config = _load(args.config)
    setup_logging(config.logging)
    from proxy.server import serve  # heavy imports only for the commands that need them

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        try:
            runner.run(serve(config))
        except OSError as err:  # the listener could not bind: say so in one line
            host, port = config.server.host, config.server.port
            reason = err.strerror or err
            print(f"cannot listen on {host}:{port} (server.host, server.port): {reason}",
                  file=sys.stderr)
            return 1
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args.config)
    sys.stdout.write(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchgate",
        description="Async request-batching proxy for LLM inference servers.",
    )
    parser.add_argument("--version", action="version", version=f"batchgate {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", default="config.yaml", help="YAML config (default: %(default)s)")
    serve.set_defaults(func=cmd_serve)

    check = commands.add_parser("check-config", help="validate a config and print it in effect")
    check.add_argument("--config", default="config.yaml", help="YAML config (default: %(default)s)")
    check.set_defaults(func=cmd_check_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
