"""Command line: the only module that may exit the process."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import queue
import resource
import signal
import sys
import time
from collections.abc import Sequence
from logging.handlers import QueueHandler, QueueListener

import uvloop
import yaml

from proxy import __version__
from proxy.config import Config, ConfigError, LoggingConfig, config_to_dict, load_config

EXIT_CONFIG = 2
BENCH_HELP = "load-test an OpenAI-compatible endpoint at several concurrency levels"


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


def _formatter(config: LoggingConfig) -> logging.Formatter:
    if config.format == "json":
        formatter: logging.Formatter = JsonFormatter()
        formatter.converter = time.gmtime
        return formatter
    return logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")


def setup_logging(config: LoggingConfig) -> QueueListener:
    """Logs go through a queue to a writer thread: a slow stdout never stalls the event loop.

    Returns the listener; stop it before exiting so every line is flushed.
    """
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_formatter(config))
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    root = logging.getLogger()
    root.handlers[:] = [QueueHandler(records)]
    root.setLevel(config.level.upper())
    # aiohttp logs every disconnect at error level with a traceback; we count them instead.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    listener = QueueListener(records, handler)
    listener.start()
    return listener


def reconfigure_logging(listener: QueueListener, config: LoggingConfig) -> None:
    """A reload changed ``logging``: the level applies to the next record, the format to the
    next line written (setFormatter takes the handler's lock, as the writer thread does)."""
    logging.getLogger().setLevel(config.level.upper())
    for handler in listener.handlers:
        handler.setFormatter(_formatter(config))


def _load(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as err:
        # Exactly one line, naming the file, the key and the bad value; no traceback.
        print(err, file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def raise_open_files_limit() -> tuple[int, int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns (soft before, soft now, hard).

    The common default soft limit is 1,024: a proxy holding a caller's connection, an upstream
    connection and a queued request per client runs out of descriptors long before the
    machine does, and the failures then look like broken replicas.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # An unlimited hard limit cannot be the soft one for files on Linux (fs.nr_open caps it).
    target = hard if hard != resource.RLIM_INFINITY else _NR_OPEN_FALLBACK
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft, soft, hard
        return soft, target, hard
    return soft, soft, hard


_NR_OPEN_FALLBACK = 1 << 20  # Linux's default fs.nr_open


def _exit_now(sig: signal.Signals) -> None:
    # Asked twice: the operator wants the process gone, not drained. Said on stderr directly
    # (the logging thread would not get to write it), then gone without cleanup; the kernel
    # closes every socket, so callers and replicas see their connections end.
    sys.stderr.write(f"batchgate: second {sig.name} during the drain: exiting now\n")
    sys.stderr.flush()
    os._exit(128 + int(sig))


def cmd_serve(args: argparse.Namespace) -> int:
    config = _load(args.config)
    listener = setup_logging(config.logging)
    before, now, hard = raise_open_files_limit()
    shown_hard = "unlimited" if hard == resource.RLIM_INFINITY else hard
    # A warning when it could not be raised to the hard limit: then it is worth knowing even
    # with `logging.level: warning`.
    level = logging.INFO if now in (hard, _NR_OPEN_FALLBACK) else logging.WARNING
    logging.getLogger("batchgate").log(
        level, "open files limit: soft %s -> %s (hard %s)", before, now, shown_hard)
    # heavy imports only for the commands that need them
    from proxy.server import CannotListen, serve

    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve(
                config,
                on_second_signal=_exit_now,
                # A reload reads the same file again (SIGHUP, POST /admin/reload); a bad one
                # is refused with the same one-line error as here at startup.
                load=lambda: load_config(args.config),
                on_reload=[lambda new: reconfigure_logging(listener, new.logging)],
            ))
    except CannotListen as err:  # a listener could not bind: say so in one line
        print(err, file=sys.stderr)
        return 1
    except OSError as err:  # e.g. an embedded engine could not start
        print(f"batchgate: {err.strerror or err}", file=sys.stderr)
        return 1
    finally:
        listener.stop()
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args.config)
    sys.stdout.write(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    return 0


def cmd_sim(args: argparse.Namespace) -> int:
    from proxy.config import SimulatedConfig
    from proxy.sim.server import serve_sim

    config = SimulatedConfig(
        max_batch=args.max_batch,
        profile=args.profile,
        time_scale=args.time_scale,
        prompt_ms_per_token=args.prompt_ms_per_token,
        default_max_tokens=args.default_max_tokens,
        kv_tokens=args.kv_tokens,
    )
    listener = setup_logging(LoggingConfig(format="text", level="info"))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        try:
            runner.run(serve_sim(config, args.host, args.port, model=args.model))
        except KeyboardInterrupt:
            pass
        except ValueError as err:  # the engine validates its settings
            print(f"batchgate sim: {err}", file=sys.stderr)
            return EXIT_CONFIG
        except OSError as err:
            print(f"cannot listen on {args.host}:{args.port}: {err.strerror or err}",
                  file=sys.stderr)
            return 1
        finally:
            listener.stop()
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The whole command line. ``bench`` gets its real arguments only when ``argv`` names it:
    the load generator (and tqdm) stay unloaded for every other command, ``serve`` first."""
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

    sim = commands.add_parser(
        "sim",
        help="run a simulated OpenAI-compatible engine (continuous batching, seed profile)",
        description="A fake vLLM: every step each running request gets one token; a step takes "
        "longer the more requests run (the seed profile: 17.8 ms at 1 .. 49.4 ms at 32); "
        "requests beyond --max-batch wait inside the engine.",
    )
    sim.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    sim.add_argument("--port", type=int, default=8001, help="port (default: %(default)s)")
    sim.add_argument("--max-batch", type=_positive_int, default=32,
                     help="requests generated at once (default: %(default)s)")
    sim.add_argument("--profile", default="seed", choices=["seed"],
                     help="per-step latency curve (default: %(default)s)")
    sim.add_argument("--prompt-ms-per-token", type=_non_negative_float, default=0.0,
                     help="prefill cost per prompt token (default: %(default)s)")
    sim.add_argument("--time-scale", type=float, default=1.0,
                     help="multiply every delay (default: %(default)s)")
    sim.add_argument("--default-max-tokens", type=_positive_int, default=100,
                     help="tokens generated when a request names no max_tokens")
    sim.add_argument("--kv-tokens", type=_non_negative_int, default=0,
                     help="KV-cache budget in tokens (prompt + generated, over the batch); "
                     "past it the newest request is preempted (default: 0, unlimited)")
    sim.add_argument("--model", default="batchgate-sim", help="model name it reports")
    sim.set_defaults(func=cmd_sim)

    if list(argv[:1]) == ["bench"]:
        from proxy.bench.cli import add_parser as add_bench_parser

        add_bench_parser(commands, help=BENCH_HELP)
    else:
        commands.add_parser("bench", help=BENCH_HELP)  # listed in --help; never run as is
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
