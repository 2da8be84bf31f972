"""``batchgate bench``: a load generator for any OpenAI-compatible endpoint.

Point it at an engine, or at batchgate in front of one, to see how throughput and latency
move with concurrency, and size a deployment from that. Closed loop (the default) runs, for
each ``--concurrency`` level, exactly that many callers sending back to back; by default each
sends one request, which is the seed table's measure: N requests at once, time until all have
finished. Open loop (``--rate``) sends Poisson arrivals at a fixed rate, unbounded.

The public API, for scripts: :func:`run_level`, :func:`percentiles`, :class:`BenchOptions`,
:class:`LevelResult`, :class:`RequestResult`; the JSON written by ``--json`` is described in
:mod:`proxy.bench.report`. :func:`add_parser` registers the subcommand with the CLI.

Exit codes: 0 when the benchmark ran (HTTP errors are in the table, not in the exit code);
1 when it could not run (no model found, missing matplotlib for ``--plot``, unwritable
output); 2 for bad arguments; 130 when interrupted (completed levels are still printed).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import resource
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

import uvloop

from proxy.bench.client import ModelNotFound, discover_model, new_session, run_level
from proxy.bench.core import (
    DEFAULT_PROMPT,
    BenchOptions,
    LevelResult,
    RequestResult,
    arrival_offsets,
    endpoint_url,
    percentiles,
)
from proxy.bench.report import (
    PlotUnavailable,
    check_plot_available,
    document,
    format_table,
    run_config,
    write_json,
    write_plot,
)

__all__ = [
    "BenchOptions",
    "LevelResult",
    "RequestResult",
    "add_parser",
    "arrival_offsets",
    "cmd_bench",
    "percentiles",
    "run_level",
]

DEFAULT_CONCURRENCY = (1, 2, 4, 8, 16, 32)
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def _list_of(item: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        parts = [part.strip() for part in text.split(",")]
        if not all(parts):
            raise argparse.ArgumentTypeError(f"must be a comma-separated list, got {text!r}")
        return [item(part) for part in parts]

    return parse


def _base_url(text: str) -> str:
    if not text.startswith(("http://", "https://")) or len(text.split("://", 1)[1]) == 0:
        raise argparse.ArgumentTypeError(f"must be an http:// or https:// URL, got {text!r}")
    return text.rstrip("/")


HELP = "load-test an OpenAI-compatible endpoint at several concurrency levels"


def add_parser(subparsers: Any, *, help: str = HELP) -> None:
    """Register ``bench`` on an ``ArgumentParser.add_subparsers()`` object."""
    bench: argparse.ArgumentParser = subparsers.add_parser(
        "bench",
        help=help,
        description=(
            "Measure tokens/s, TTFT, inter-token latency and end-to-end latency of an "
            "OpenAI-compatible endpoint (an engine, or batchgate in front of one)."
        ),
    )
    bench.add_argument(
        "--url",
        required=True,
        type=_base_url,
        help="base URL, e.g. http://127.0.0.1:8080 (a trailing /v1 is fine)",
    )
    load = bench.add_mutually_exclusive_group()
    load.add_argument(
        "--concurrency",
        type=_list_of(_positive_int),
        metavar="N[,N...]",
        help="closed loop: callers per level (default: 1,2,4,8,16,32)",
    )
    load.add_argument(
        "--rate",
        type=_list_of(_positive_float),
        metavar="R[,R...]",
        help="open loop: Poisson arrivals per second, one level per rate",
    )
    bench.add_argument(
        "--requests",
        type=_positive_int,
        metavar="N",
        help="requests per level (default: closed loop, one per caller)",
    )
    bench.add_argument(
        "--duration",
        type=_positive_float,
        metavar="S",
        help="stop starting requests in a level after S seconds",
    )
    bench.add_argument(
        "--max-tokens",
        type=_positive_int,
        default=100,
        metavar="N",
        help="max_tokens per request (default: %(default)s)",
    )
    bench.add_argument(
        "--stream", action="store_true", help="stream responses (SSE); needed for TTFT and ITL"
    )
    bench.add_argument("--chat", action="store_true", help="use /v1/chat/completions")
    bench.add_argument("--model", help="model name (default: the first of GET /v1/models)")
    bench.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt text")
    bench.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="send ignore_eos so exactly max_tokens are generated (vLLM, "
        "llama.cpp); turn off for APIs that reject unknown fields",
    )
    bench.add_argument("--seed", type=int, default=0, help="open-loop arrival seed (default: 0)")
    bench.add_argument(
        "--timeout",
        type=_positive_float,
        default=600.0,
        metavar="S",
        help="per-request timeout in seconds (default: %(default)s)",
    )
    bench.add_argument("--api-key", help="sent as a Bearer token (default: $OPENAI_API_KEY)")
    bench.add_argument("--json", type=Path, metavar="PATH", help="write all figures as JSON")
    bench.add_argument(
        "--plot",
        type=Path,
        metavar="PATH",
        help="plot tokens/s and latency to a PNG (needs batchgate[bench])",
    )
    bench.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (it is off anyway when stderr is not a terminal)",
    )
    bench.set_defaults(func=cmd_bench)


def _fail(message: str, code: int) -> int:
    print(f"batchgate bench: {message}", file=sys.stderr)
    return code


def _writable(path: Path) -> bool:
    return path.parent.is_dir() and os.access(path.parent, os.W_OK) and not path.is_dir()


def _raise_fd_limit(wanted: int) -> None:
    """Each in-flight request holds a socket; the usual soft limit of 1024 is too few."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    # Best effort: a level that runs out of sockets shows up as conn_error rows.
    with suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def cmd_bench(args: argparse.Namespace) -> int:
    """Run every level, print the table to stdout, write ``--json`` / ``--plot``."""
    rates: list[float] | None = args.rate
    levels_c: list[int] | None = None if rates else (args.concurrency or list(DEFAULT_CONCURRENCY))
    if rates and args.requests is None and args.duration is None:
        return _fail("--rate needs --requests or --duration to end each level", EXIT_USAGE)
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path is not None and not _writable(path):
            return _fail(f"{flag}: cannot write to {path}", EXIT_FAILED)
    if args.plot is not None:
        try:
            check_plot_available()
        except PlotUnavailable as exc:
            return _fail(str(exc), EXIT_FAILED)
    try:
        options = BenchOptions(
            max_tokens=args.max_tokens,
            stream=args.stream,
            chat=args.chat,
            model=args.model,
            prompt=args.prompt,
            ignore_eos=args.ignore_eos,
            duration_s=args.duration,
            seed=args.seed,
            timeout_s=args.timeout,
            api_key=args.api_key or os.environ.get("OPENAI_API_KEY") or None,
        )
    except ValueError as exc:
        return _fail(str(exc), EXIT_USAGE)
    _raise_fd_limit(max(levels_c or [4096]) + 256)
    progress = not args.no_progress and sys.stderr.isatty()
    run = _Run(options)
    code = 0
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        try:
            runner.run(run.levels_in_order(args.url, levels_c, rates, args.requests, progress))
        except ModelNotFound as exc:
            return _fail(f"{exc}: pass --model NAME", EXIT_FAILED)
        except KeyboardInterrupt:
            code = EXIT_INTERRUPTED
    options, done = run.options, run.done
    config = run_config(args.url, options, concurrency=levels_c, rate=rates, requests=args.requests)
    sys.stdout.write(_heading(args.url, options, config["mode"]) + format_table(done))
    sys.stdout.flush()
    if code:
        return _fail("interrupted", code)
    try:
        if args.json is not None:
            write_json(args.json, document(done, config))
        if args.plot is not None:
            write_plot(args.plot, done)
    except OSError as exc:
        return _fail(f"could not write results: {exc}", EXIT_FAILED)
    return 0


def _heading(url: str, options: BenchOptions, mode: str) -> str:
    stream = "streamed" if options.stream else "not streamed"
    return (
        f"# POST {endpoint_url(url, options)}  model={options.model}  "
        f"max_tokens={options.max_tokens}  {stream}  {mode} loop\n"
    )


class _Run:
    """The levels run so far and the options as sent; kept when a run is interrupted."""

    def __init__(self, options: BenchOptions) -> None:
        self.options = options
        self.done: list[LevelResult] = []

    async def levels_in_order(
        self,
        url: str,
        concurrency: list[int] | None,
        rates: list[float] | None,
        requests: int | None,
        progress: bool,
    ) -> None:
        async with new_session() as session:
            if self.options.model is None:
                model = await discover_model(session, url, self.options)
                self.options = replace(self.options, model=model)
            options = self.options
            plan: list[tuple[int | None, float | None]] = (
                [(None, rate) for rate in rates]
                if rates
                else [(c, None) for c in concurrency or []]
            )
            for level_c, level_rate in plan:
                count = requests
                if count is None and level_c is not None and options.duration_s is None:
                    count = level_c  # one request per caller: the seed table's measure
                label = f"rate {level_rate:g}/s" if level_rate else f"concurrency {level_c}"
                with progress_bar(label, count, enabled=progress) as tick:
                    level = await run_level(
                        url,
                        concurrency=level_c,
                        rate=level_rate,
                        requests=count,
                        options=options,
                        session=session,
                        on_result=lambda _: tick(),
                    )
                self.done.append(level)


@contextmanager
def progress_bar(
    label: str, total: int | None, *, enabled: bool, file: TextIO | None = None
) -> Iterator[Callable[[], None]]:
    """Yield a function to call once per finished request.

    tqdm draws the bar when it is installed (``batchgate[bench]``); without it a plain
    ``label: n/total req`` counter is rewritten in place. Disabled, nothing is written.
    """
    out = sys.stderr if file is None else file
    if not enabled:
        yield _nothing
        return
    try:
        from tqdm import tqdm  # here, not at the top: an extra, and `serve` never needs it
    except ImportError:
        yield from _plain_counter(label, total, out)
        return
    with tqdm(total=total, desc=label, unit="req", file=out, leave=True,
              dynamic_ncols=True) as bar:

        def tick() -> None:
            bar.update()

        yield tick


def _nothing() -> None:
    pass


def _plain_counter(label: str, total: int | None, out: TextIO) -> Iterator[Callable[[], None]]:
    done = 0
    of = "" if total is None else f"/{total}"

    def tick() -> None:
        nonlocal done
        done += 1
        out.write(f"\r{label}: {done}{of} req")
        out.flush()

    try:
        yield tick
    finally:
        if done:
            out.write("\n")
