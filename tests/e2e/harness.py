"""A real stack on 127.0.0.1: llama.cpp ``llama-server`` engines behind ``python -m proxy serve``.

batchgate runs as a subprocess from a YAML config, the way users run it; the engines are
``e2e.llama.LlamaServer`` processes. Tests observe both sides only through HTTP: the engines'
``/metrics`` (``llamacpp:*``, unlabelled) and batchgate's ``/metrics``. Every wait is for a
state, bounded by ``BOUND_S``; nothing sleeps and hopes.
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from prometheus_client.parser import text_string_to_metric_families

from e2e.llama import METRIC_DEFERRED, METRIC_PROCESSING, LlamaServer, parse_metrics

REPO = Path(__file__).resolve().parents[2]
BOUND_S = 20.0  # deadlock guard for every wait: a failing test fails, it does not hang
SLOTS = 4  # llama-server -np, and batchgate's max_concurrency for each replica
CTX_PER_SLOT = 4096  # the tiny model's n_ctx_train: a slot never holds more

REPLICAS = ("llama-0", "llama-1")  # batchgate's names for the two engines, in order

LISTENING = re.compile(r"batchgate listening on (http://127\.0\.0\.1:\d+)")

__all__ = [
    "BOUND_S", "CTX_PER_SLOT", "METRIC_DEFERRED", "METRIC_PROCESSING", "REPLICAS", "SLOTS",
    "Batchgate", "Observation", "Scrape", "Stack", "engine_metrics", "observe", "scrape",
    "wait_for",
]


@dataclass(frozen=True)
class Stack:
    """The engines, in the order of ``REPLICAS``, and the batchgate in front of them."""

    engines: tuple[LlamaServer, ...]
    batchgate: Batchgate


async def wait_for(
    check: Callable[[], Awaitable[bool]], what: str, bound: float = BOUND_S
) -> None:
    """Poll an I/O-observed condition until it holds (bounded; 10 ms between looks)."""
    deadline = time.monotonic() + bound
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {bound:g}s waiting for: {what}")
        await asyncio.sleep(0.01)


@dataclass(frozen=True)
class Scrape:
    """One scrape of batchgate's ``/metrics``: sample name + labels -> value."""

    samples: Mapping[tuple[str, frozenset[tuple[str, str]]], float]

    @classmethod
    def parse(cls, text: str) -> Scrape:
        samples = {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        return cls(samples)

    def get(self, name: str, **labels: str) -> float:
        """The sample's value; 0 for a labelled counter that was never incremented."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def total(self, name: str, **labels: str) -> float:
        """Sum over every sample of ``name`` whose labels include ``labels``."""
        want = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and want <= ls)


async def scrape(session: aiohttp.ClientSession, base_url: str) -> Scrape:
    async with session.get(base_url + "/metrics") as r:
        assert r.status == 200, f"GET {base_url}/metrics -> {r.status}"
        return Scrape.parse(await r.text())


async def engine_metrics(session: aiohttp.ClientSession, engine: LlamaServer) -> dict[str, float]:
    async with session.get(engine.base_url + "/metrics") as r:
        assert r.status == 200, f"GET {engine.base_url}/metrics -> {r.status}"
        return parse_metrics(await r.text())


@dataclass(frozen=True)
class Observation:
    """batchgate's metrics and every engine's (in the order of ``Stack.engines``), scraped
    concurrently: close together in time, never atomically."""

    batchgate: Scrape
    engines: tuple[dict[str, float], ...]


async def observe(session: aiohttp.ClientSession, stack: Stack) -> Observation:
    bg, engines = await asyncio.gather(
        scrape(session, stack.batchgate.url),
        asyncio.gather(*(engine_metrics(session, e) for e in stack.engines)),
    )
    return Observation(bg, tuple(engines))


def batchgate_config(
    replicas: Mapping[str, str], *, max_concurrency: int = SLOTS
) -> dict[str, Any]:
    """A config for real engines: ``replicas`` maps each name to its engine URL."""
    return {
        "server": {"host": "127.0.0.1", "port": 0, "drain_timeout_s": 5},
        "replicas": [
            {"name": name, "url": url, "max_concurrency": max_concurrency}
            for name, url in replicas.items()
        ],
        # Callers beyond capacity must wait in batchgate for as long as a test runs.
        "queue": {"max_size": 1000, "timeout_s": 60},
        "health": {"path": "/health", "interval_s": 2, "timeout_s": 2},
        "upstream": {"connect_timeout_s": 2, "read_timeout_s": 30, "retries": 2},
        "logging": {"format": "text", "level": "info"},
    }


class Batchgate:
    """``python -m proxy serve --config <yaml>`` as a subprocess, on a port the OS picks.

    Its output goes to ``log_path`` (a file, so a full pipe can never block the proxy); the
    URL is read from the "listening" line. :meth:`stop` sends SIGTERM (the drain path users
    get) and kills the process if it has not exited within the bound.
    """

    def __init__(self, config: Mapping[str, Any], workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "batchgate.yaml"
        self.config_path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
        self.log_path = workdir / "batchgate.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, bound: float = BOUND_S) -> Batchgate:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "proxy", "serve", "--config", str(self.config_path)],
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + bound
        while not (match := LISTENING.search(self.log())):
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"batchgate exited with {self.proc.returncode} before listening:\n{self.log()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"batchgate not listening after {bound:g}s:\n{self.log()}")
            time.sleep(0.02)
        self.url = match.group(1)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, bound: float = BOUND_S) -> int | None:
        """SIGTERM, wait, SIGKILL if needed; the exit code (None if it had to be killed)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is not None:
            return proc.returncode
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(bound)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(bound)
            return None
