"""The contestants and what they sit in front of: the bench upstream, ``batchgate sim``,
batchgate, HAProxy 2.6 and the aiohttp passthrough floor, each started pinned to the
system-under-test core, with its config written to the run's temporary directory.

``direct`` is a contestant without a process: the load goes straight to the upstream.
``baseline`` (``make bench BASELINE=<commit>``) is batchgate again, the commit's ``proxy/``
run with this tree's virtualenv: "no worse than before" measured side by side, not against a
table from another day's machine.
"""

from __future__ import annotations

import string
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import yaml
from procs import SUT_CPU, Proc, Procs, fd_hard_limit, free_port, wait_http

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BIN = Path(sys.executable).parent
#: In run order within a round; run.py rotates it from round to round.
NAMES = ("direct", "batchgate", "baseline", "haproxy", "passthrough")


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


def start_upstream(
    procs: Procs, *, cpu: int | None = SUT_CPU, name: str = "upstream"
) -> Target:
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
    procs: Procs, tmp: Path, upstream_port: int, settings: ProxySettings, name: str = "batchgate",
    tree: Path | None = None,
) -> Target:
    """batchgate, this tree's, or the ``proxy/`` of an older commit extracted at ``tree``."""
    port = free_port()
    config = tmp / f"{name}.yaml"
    settings_of = batchgate_config(upstream_port, port, settings)
    command = [str(BIN / "batchgate"), "serve", "--config", str(config)]
    if tree is not None:
        settings_of["server"] = older_server(settings_of["server"])
        # cwd and PYTHONPATH are the tree: `python -m` puts the cwd first on sys.path.
        command = ["env", "-C", str(tree), f"PYTHONPATH={tree}", sys.executable, "-m", "proxy",
                   "serve", "--config", str(config)]
    config.write_text(yaml.safe_dump(settings_of, sort_keys=False))
    proc = procs.start(name, command)
    wait_http(f"http://127.0.0.1:{port}/readyz", proc)
    return Target(name, port, proc)


def older_server(server: object) -> dict[str, object]:
    """The ``server`` keys every batchgate since the first bench knows (an older commit
    refuses the ones added since, such as ``max_connections``; it had no such bound)."""
    assert isinstance(server, dict)
    return {k: server[k] for k in ("host", "port", "drain_timeout_s")}


def tree_label() -> str:
    """This tree's commit, and whether ``proxy/`` differs from it (the code measured)."""
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "proxy"],
                           capture_output=True, text=True, check=True).stdout.strip()
    return f"{head}{' + uncommitted changes' if dirty else ''}"


def baseline_tree(rev: str, into: Path) -> Path:
    """The ``proxy/`` package of commit ``rev``, extracted under ``into``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "proxy"],
                             capture_output=True, check=True).stdout
    into.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


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
    procs: Procs, tmp: Path, upstream: Target, settings: ProxySettings,
    baseline: Path | None = None,
) -> dict[str, Target]:
    """The four contestants in front of ``upstream`` (``direct`` is ``upstream`` itself), and
    the baseline commit's batchgate when ``baseline`` is its extracted tree."""
    targets = {
        "direct": Target("direct", upstream.port, None),
        "batchgate": start_batchgate(procs, tmp, upstream.port, settings),
    }
    if baseline is not None:  # next to batchgate in each round's order: the pair is close
        targets["baseline"] = start_batchgate(procs, tmp, upstream.port, settings,
                                              name="baseline", tree=baseline)
    targets["haproxy"] = start_haproxy(procs, tmp, upstream.port, settings)
    targets["passthrough"] = start_passthrough(procs, upstream.port)
    return targets


def stop_all(procs: Procs, targets: dict[str, Target]) -> None:
    for target in targets.values():
        if target.proc is not None:
            procs.stop(target.proc)
