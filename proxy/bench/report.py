"""What ``batchgate bench`` makes of its levels: an aligned table, a JSON document, a plot.

The JSON document (``--json``) is a stable interface for scripts; keys are only ever added:

``schema``
    ``1``.
``date``
    When the run finished, UTC, ISO 8601 (``2025-01-31T12:00:00Z``).
``tool``
    ``"batchgate <version>"``.
``config``
    The run as asked: ``url``, ``endpoint`` (``/v1/completions`` or ``/v1/chat/completions``),
    ``mode`` (``"closed"`` or ``"open"``), ``concurrency`` (list, closed loop; else null),
    ``rate`` (list of req/s, open loop; else null), ``requests`` (per level; null: one per
    caller in closed loop, or bounded by ``duration_s``), ``duration_s``, ``max_tokens``,
    ``stream``, ``chat``, ``model``, ``ignore_eos``, ``prompt``, ``seed``, ``timeout_s``.
``levels``
    One object per level, in run order:

    ``concurrency`` (int, or null in open loop), ``rate`` (req/s, or null in closed loop),
    ``max_concurrency`` (most requests in flight at once), ``requests`` (sent), ``ok``,
    ``errors`` (``{"429": 3, "conn_error": 1}``; keys are status codes, ``body_error``,
    ``timeout``, ``conn_error``), ``total_time_ms`` (first send to last completion),
    ``tokens`` (completion tokens of the ok requests), ``tokens_per_s``, ``speedup``
    (tokens/s over the first level's when that level is concurrency 1, else null),
    ``ttft_ms``, ``itl_ms``, ``e2e_ms`` (each ``{"p50", "p95", "p99"}``, null when there is no
    value), ``itl_count`` (gaps behind ``itl_ms``), ``no_usage`` (ok requests whose server
    reported no token usage), ``dispatch_lag_ms`` (open loop: the latest a send left after its
    scheduled time; null in closed loop).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from proxy import __version__
from proxy.bench.core import BenchOptions, LevelResult

SCHEMA = 1
_INSTALL_HINT = "pip install 'batchgate[bench]'"


class PlotUnavailable(Exception):
    """``--plot`` was asked for but matplotlib is not installed; the message says what to do."""


def speedups(levels: Sequence[LevelResult]) -> list[float | None]:
    """Each level's tokens/s over the first level's, if the first ran at concurrency 1."""
    if not levels or levels[0].concurrency != 1 or levels[0].tokens_per_s <= 0:
        return [None] * len(levels)
    base = levels[0].tokens_per_s
    return [level.tokens_per_s / base for level in levels]


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1f}"


def _errors(errors: dict[str, int]) -> str:
    return ", ".join(f"{key}:{count}" for key, count in errors.items()) or "-"


def format_table(levels: Sequence[LevelResult]) -> str:
    """The seed table's columns (concurrency, total time, tokens), then throughput, latency
    percentiles and errors; right-aligned, one line per level."""
    open_loop = any(level.rate is not None for level in levels)
    head = ["rate/s", "max conc"] if open_loop else ["concurrency"]
    head += ["total ms", "tokens", "tokens/s", "speed-up"]
    for name in ("TTFT", "ITL", "e2e"):
        head += [f"{name} p50", f"{name} p95", f"{name} p99"]
    if open_loop:
        head.append("send lag ms")
    head.append("errors")
    rows = [head]
    for level, speedup in zip(levels, speedups(levels), strict=True):
        if open_loop:
            row = [f"{level.rate:g}", str(level.max_concurrency)]
        else:
            row = [str(level.concurrency)]
        row += [
            f"{level.total_time_s * 1000:.0f}",
            str(level.tokens),
            f"{level.tokens_per_s:.1f}",
            "" if speedup is None else f"{speedup:.2f}x",
        ]
        for figures in (level.ttft_ms, level.itl_ms, level.e2e_ms):
            row += [_ms(figures[f"p{p}"]) for p in (50, 95, 99)]
        if open_loop:
            row.append(_ms(level.dispatch_lag_ms or 0.0))
        row.append(_errors(level.errors))
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = []
    for row in rows:
        cells = [cell.rjust(width) for cell, width in zip(row[:-1], widths, strict=False)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    no_usage = sum(level.no_usage for level in levels)
    if no_usage:
        lines.append(
            f"note: {no_usage} ok requests came without usage figures: their tokens are the "
            "number of content events (streamed) or 0 (not streamed)"
        )
    return "\n".join(lines) + "\n"


def run_config(
    url: str,
    options: BenchOptions,
    *,
    concurrency: Sequence[int] | None,
    rate: Sequence[float] | None,
    requests: int | None,
) -> dict[str, Any]:
    """The ``config`` object of the JSON document (the API key is never written)."""
    return {
        "url": url,
        "endpoint": options.path,
        "mode": "open" if rate is not None else "closed",
        "concurrency": None if concurrency is None else list(concurrency),
        "rate": None if rate is None else list(rate),
        "requests": requests,
        "duration_s": options.duration_s,
        "max_tokens": options.max_tokens,
        "stream": options.stream,
        "chat": options.chat,
        "model": options.model,
        "ignore_eos": options.ignore_eos,
        "prompt": options.prompt,
        "seed": options.seed,
        "timeout_s": options.timeout_s,
    }


def _figures(values: dict[str, float]) -> dict[str, float | None]:
    return {key: None if math.isnan(value) else value for key, value in values.items()}


def level_dict(level: LevelResult, speedup: float | None) -> dict[str, Any]:
    return {
        "concurrency": level.concurrency,
        "rate": level.rate,
        "max_concurrency": level.max_concurrency,
        "requests": level.requests,
        "ok": level.ok,
        "errors": dict(level.errors),
        "total_time_ms": level.total_time_s * 1000,
        "tokens": level.tokens,
        "tokens_per_s": level.tokens_per_s,
        "speedup": speedup,
        "ttft_ms": _figures(level.ttft_ms),
        "itl_ms": _figures(level.itl_ms),
        "e2e_ms": _figures(level.e2e_ms),
        "itl_count": level.itl_count,
        "no_usage": level.no_usage,
        "dispatch_lag_ms": level.dispatch_lag_ms,
    }


def document(
    levels: Sequence[LevelResult], config: dict[str, Any], *, date: datetime | None = None
) -> dict[str, Any]:
    """The whole ``--json`` document (see the module docstring for its keys)."""
    when = (date or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)
    return {
        "schema": SCHEMA,
        "date": when.isoformat().replace("+00:00", "Z"),
        "tool": f"batchgate {__version__}",
        "config": config,
        "levels": [
            level_dict(level, speedup)
            for level, speedup in zip(levels, speedups(levels), strict=True)
        ],
    }


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")


def check_plot_available() -> None:
    """Raise :class:`PlotUnavailable` now, before a long run, rather than after it."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotUnavailable(f"--plot needs matplotlib: {_INSTALL_HINT}") from None


def write_plot(path: Path, levels: Sequence[LevelResult]) -> None:
    """Tokens/s, and e2e and TTFT medians, against concurrency (or rate), side by side.

    Uses the object API (``Figure``), not pyplot: no GUI backend, no global figure state.
    """
    check_plot_available()
    from matplotlib.figure import Figure

    open_loop = any(level.rate is not None for level in levels)
    xs = [float((level.rate if open_loop else level.concurrency) or 0) for level in levels]
    xlabel = "arrival rate (req/s)" if open_loop else "concurrent requests"
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    throughput, latency = fig.subplots(1, 2)
    throughput.plot(xs, [level.tokens_per_s for level in levels], marker="o")
    throughput.set_ylabel("tokens/s")
    throughput.set_title("Throughput")
    latency.plot(xs, [level.e2e_ms["p50"] for level in levels], marker="o", label="e2e p50")
    latency.plot(xs, [level.ttft_ms["p50"] for level in levels], marker="s", label="TTFT p50")
    latency.set_ylabel("ms")
    latency.set_title("Latency")
    latency.legend()
    for ax in (throughput, latency):
        if len(xs) > 1 and min(xs) > 0:
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.minorticks_off()
        ax.set_xlabel(xlabel)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    fig.savefig(path, dpi=120)
