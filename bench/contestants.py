"""The contestants and what they sit in front of: the bench upstream, ``batchgate sim``,
batchgate, HAProxy 2.6 and the aiohttp passthrough floor, each started pinned to the
system-under-test core, with its config written to the run's temporary directory.

``direct`` is a contestant without a process: the load goes straight to the upstream.
"""

from __future__ import annotations

import string
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml
from procs import SUT_CPU, Proc, Procs, fd_hard_limit, free_port, wait_http

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BIN = Path(sys.executable).parent
#: In run order within a round; run.py rotates it from round to round.
NAMES = ("direct", "batchgate", "haproxy", "passthrough")


@dataclass(frozen=True)
class ProxySettings:
    """What batchgate's config says and HAProxy's mirrors (see bench/haproxy.cfg)."""

    max_concurrency: int
    queue_max: int
    queue_timeout_s: float


#: Raw-rate tests (P1-P3): enough slots that nothing ever queues, so the request path is
#: measured, not the queue. P3 holds up to 2,000 streams at once.
RAW = ProxySettings(max_concurrency=4096, queue_max=1000, queue_timeout_s=30)
#: P5: one slot held by an unanswered request, 10,000 callers queued behind it.
QUEUED = ProxySettings(max_concurrency=1, queue_max=20000, queue_timeout_s=300)


@dataclass
class Target:
    name: str
    port: int
    proc: Proc | None  # the proxy process; None for direct

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_upstream(procs: Procs, *, cpu: int = SUT_CPU, name: str = "upstream") -> Target:
    port = free_port()
    proc = procs.start(name, [sys.executable, str(HERE / "upstream.py"), "--port", str(port)],
                       cpu=cpu)
    wait_http(f"http://127.0.0.1:{port}/health", proc)
    return Target("upstream", port, proc)


def start_sim(procs: Procs, max_batch: int = 32, time_scale: float = 1.0) -> Target:
    port = free_port()
    proc = procs.start(
        "sim",
        [str(BIN / "batchgate"), "sim", "--max-batch", str(max_batch), "--port", str(port),
         "--time-scale", f"{time_scale:g}"],
    )
    wait_http(f"http://127.0.0.1:{port}/health", proc)
    return Target("sim", port, proc)


def batchgate_config(upstream_port: int, port: int, settings: ProxySettings) -> dict[str, object]:
    return {
        # max_connections: P5 holds 10,000 callers open at once, the default's bound (HAProxy's
        # maxconn is raised the same way, see haproxy_maxconn).
        "server": {"host": "127.0.0.1", "port": port, "drain_timeout_s": 2,
                   "max_connections": 30000},
        "replicas": [
            {
                "name": "bench",
                "url": f"http://127.0.0.1:{upstream_port}",
                "max_concurrency": settings.max_concurrency,
            }
        ],
        "queue": {"max_size": settings.queue_max, "timeout_s": settings.queue_timeout_s},
        "health": {"path": "/health", "interval_s": 5, "timeout_s": 2},
        "upstream": {"connect_timeout_s": 5, "read_timeout_s": 600, "retries": 2},
        "logging": {"format": "text", "level": "warning"},
    }


def start_batchgate(
    procs: Procs, tmp: Path, upstream_port: int, settings: ProxySettings, name: str = "batchgate"
) -> Target:
    port = free_port()
    config = tmp / f"{name}.yaml"
    config.write_text(
        yaml.safe_dump(batchgate_config(upstream_port, port, settings), sort_keys=False)
    )
    proc = procs.start(name, [str(BIN / "batchgate"), "serve", "--config", str(config)])
    wait_http(f"http://127.0.0.1:{port}/readyz", proc)
    return Target("batchgate", port, proc)


def haproxy_config(upstream_port: int, port: int, settings: ProxySettings) -> str:
    template = string.Template((HERE / "haproxy.cfg").read_text())
    return template.substitute(
        port=port,
        upstream_port=upstream_port,
        max_concurrency=settings.max_concurrency,
        queue_max=settings.queue_max,
        queue_timeout_s=f"{settings.queue_timeout_s:g}",
        global_maxconn=haproxy_maxconn(),
    )


def haproxy_maxconn() -> int:
    """HAProxy reserves two descriptors per connection and refuses to start past the limit."""
    return min(30000, (fd_hard_limit() - 200) // 2)


def start_haproxy(procs: Procs, tmp: Path, upstream_port: int, settings: ProxySettings) -> Target:
    port = free_port()
    config = tmp / "haproxy.cfg"
    config.write_text(haproxy_config(upstream_port, port, settings))
    # -db: stay in the foreground (no daemon, no master process): the pid is the worker.
    proc = procs.start("haproxy", ["haproxy", "-db", "-f", str(config)])
    wait_http(f"http://127.0.0.1:{port}/health", proc)
    return Target("haproxy", port, proc)


def start_passthrough(procs: Procs, upstream_port: int) -> Target:
    port = free_port()
    proc = procs.start(
        "passthrough",
        [sys.executable, str(HERE / "passthrough.py"), f"http://127.0.0.1:{upstream_port}",
         str(port)],
    )
    wait_http(f"http://127.0.0.1:{port}/health", proc)
    return Target("passthrough", port, proc)


def start_all(
    procs: Procs, tmp: Path, upstream: Target, settings: ProxySettings
) -> dict[str, Target]:
    """The four contestants in front of ``upstream`` (``direct`` is ``upstream`` itself)."""
    return {
        "direct": Target("direct", upstream.port, None),
        "batchgate": start_batchgate(procs, tmp, upstream.port, settings),
        "haproxy": start_haproxy(procs, tmp, upstream.port, settings),
        "passthrough": start_passthrough(procs, upstream.port),
    }


def stop_all(procs: Procs, targets: dict[str, Target]) -> None:
    for target in targets.values():
        if target.proc is not None:
            procs.stop(target.proc)
