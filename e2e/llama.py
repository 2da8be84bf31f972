"""Start/stop real llama.cpp ``llama-server`` processes for batchgate e2e tests.

Library (stdlib only; importable from the project venv)::

    from e2e.llama import LlamaServer
    with LlamaServer() as srv:          # builds/caches binary + model on first use
        srv.base_url                    # "http://127.0.0.1:<free port>"
        srv.metrics()                   # {"llamacpp:requests_processing": 0.0, ...}

CLI::

    python e2e/llama.py prepare           # build binary + model (cached), print paths
    python e2e/llama.py serve --port 8081 # run one server in the foreground (Ctrl-C stops)
    python e2e/llama.py smoke             # start a server, exercise the endpoints, stop it
    python e2e/llama.py keepalive         # show llama-server's close-after-stream quirk
                                          # (needs aiohttp, i.e. the project venv)

Everything binds/talks to 127.0.0.1 only. Cache: ``${BATCHGATE_CACHE:-~/.cache/batchgate}``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

HERE = Path(__file__).resolve().parent
HOST = "127.0.0.1"

# Metric names exported by this llama-server build with --metrics (gauges).
METRIC_PROCESSING = "llamacpp:requests_processing"
METRIC_DEFERRED = "llamacpp:requests_deferred"


def cache_dir() -> Path:
    env = os.environ.get("BATCHGATE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "batchgate"


def ensure_binary() -> Path:
    """Build llama-server if not cached (~4-5 min on 2 cores, once); return its path."""
    out = subprocess.run(
        ["bash", str(HERE / "build_llama_server.sh")],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    ).stdout
    return Path(out.strip().splitlines()[-1])


def ensure_model() -> Path:
    """Generate the tiny random GGUF model if not cached (<1 s); return its path."""
    out = subprocess.run(
        [sys.executable, str(HERE / "make_tiny_model.py")],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    ).stdout
    return Path(out.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return int(r.status), bytes(r.read())
    except urllib.error.HTTPError as e:
        return int(e.code), bytes(e.read())


def http_post_json(url: str, body: dict[str, Any], timeout: float = 30.0) -> Any:
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def parse_metrics(text: str) -> dict[str, float]:
    """Parse Prometheus text exposition (llama-server's metrics have no labels)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            out[name] = float(value)
    return out


class LlamaServer:
    """One llama-server on 127.0.0.1 with N slots (continuous batching is on by default).

    ``-c`` is ``n_parallel * ctx_per_slot``: every slot gets ``ctx_per_slot`` tokens,
    so prompt + max_tokens is capped there (longer generations stop with
    finish_reason "length" at the slot limit).
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        n_parallel: int = 4,
        ctx_per_slot: int = 512,
        threads: int = 1,
        model: Path | None = None,
        binary: Path | None = None,
        extra_args: tuple[str, ...] = (),
        log_path: Path | None = None,
    ) -> None:
        self.port = port or free_port()
        self.n_parallel = n_parallel
        self.ctx_per_slot = ctx_per_slot
        self.threads = threads
        self.model = model
        self.binary = binary
        self.extra_args = extra_args
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def command(self) -> list[str]:
        assert self.binary is not None and self.model is not None
        return [
            str(self.binary),
            "-m",
            str(self.model),
            "--host",
            HOST,
            "--port",
            str(self.port),
            "-np",
            str(self.n_parallel),
            "-c",
            str(self.n_parallel * self.ctx_per_slot),
            "-t",
            str(self.threads),
            "-tb",
            str(self.threads),
            "--metrics",
            "--no-webui",
            *self.extra_args,
        ]

    def start(self, timeout: float = 60.0) -> LlamaServer:
        if self.binary is None:
            self.binary = ensure_binary()
        if self.model is None:
            self.model = ensure_model()
        if self.log_path is None:
            self.log_path = cache_dir() / "logs" / f"llama-server-{self.port}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # Don't let LLAMA_ARG_* / LLAMA_API_KEY from the environment change behaviour.
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_")}
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # a Ctrl-C in the test runner is ours to handle
            )
        try:
            self.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_healthy(self, timeout: float = 60.0) -> None:
        """Poll GET /health until 200 (it answers 503 while the model loads)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"llama-server exited with {self.proc.returncode}; log: {self.log_path}\n"
                    + self.log_tail()
                )
            with contextlib.suppress(OSError):
                status, _ = http_get(self.base_url + "/health", timeout=1.0)
                if status == 200:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"llama-server not healthy after {timeout}s: {self.log_path}")
            time.sleep(0.05)

    def log_tail(self, n: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def metrics(self) -> dict[str, float]:
        status, body = http_get(self.base_url + "/metrics")
        if status != 200:
            raise RuntimeError(f"/metrics -> {status}")
        return parse_metrics(body.decode())

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def __enter__(self) -> LlamaServer:
        return self.start() if self.proc is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------- #
# CLI
# --------------------------------------------------------------------------- #


def _stream_sse(url: str, body: dict[str, Any]) -> tuple[list[dict[str, Any]], list[float]]:
    """POST with stream=true; return the parsed data events and their arrival times."""
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    events: list[dict[str, Any]] = []
    times: list[float] = []
    with urllib.request.urlopen(req, timeout=30) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            events.append(json.loads(line[6:]))
            times.append(time.perf_counter())
    return events, times


def smoke(srv: LlamaServer) -> None:
    b = srv.base_url
    status, body = http_get(b + "/v1/models")
    print("GET /v1/models:", status, [m["id"] for m in json.loads(body)["data"]])

    r = http_post_json(b + "/v1/completions", {"prompt": "Hello world", "max_tokens": 16})
    print(
        "POST /v1/completions:",
        r["usage"],
        r["choices"][0]["finish_reason"],
        repr(r["choices"][0]["text"]),
    )

    ev, _ = _stream_sse(
        b + "/v1/completions", {"prompt": "Hello", "max_tokens": 16, "stream": True}
    )
    print(f"POST /v1/completions stream: {len(ev)} events, last usage:", ev[-1].get("usage"))

    ev, _ = _stream_sse(
        b + "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "hi there"}],
            "max_tokens": 16,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    content = [e["choices"][0]["delta"].get("content") for e in ev if e["choices"]]
    print(
        f"POST /v1/chat/completions stream: {len(ev)} events; "
        f"{sum(1 for c in content if c)} content deltas; "
        f"final usage chunk: {ev[-1].get('usage')} (choices={ev[-1]['choices']})"
    )

    names = [k for k in srv.metrics() if k.startswith("llamacpp:")]
    print("GET /metrics names:", names)
    for n in (METRIC_PROCESSING, METRIC_DEFERRED):
        print(f"  {n}: {'present' if n in names else 'MISSING'}")

    speeds, walls = [], []
    for _ in range(5):
        t = time.perf_counter()
        r = http_post_json(b + "/v1/completions", {"prompt": "Hello", "max_tokens": 100})
        walls.append(time.perf_counter() - t)
        assert r["usage"]["completion_tokens"] == 100, r["usage"]
        speeds.append(r["timings"]["predicted_per_second"])
    ev, times = _stream_sse(
        b + "/v1/completions", {"prompt": "Hello", "max_tokens": 100, "stream": True}
    )
    gaps = [b2 - a for a, b2 in itertools.pairwise(times)]
    print(
        f"max_tokens=100: server-side {min(speeds):.0f}-{max(speeds):.0f} tok/s; "
        f"client wall {min(walls) * 1e3:.1f}-{max(walls) * 1e3:.1f} ms/request; "
        f"stream: {len(ev)} events, mean inter-event {sum(gaps) / len(gaps) * 1e3:.3f} ms"
    )


async def _keepalive_probe(base_url: str) -> None:
    import aiohttp  # only in the project venv

    body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    async with aiohttp.ClientSession() as s:
        async with s.post(base_url + "/v1/chat/completions", json={**body, "stream": True}) as r:
            print(
                "1st (stream) headers:",
                {k: v for k, v in r.headers.items() if k in ("Keep-Alive", "Connection")},
            )
            async for _ in r.content:
                pass
        try:  # immediately reuse the pooled connection
            async with s.post(base_url + "/v1/chat/completions", json=body) as r:
                print("2nd (plain) request OK:", r.status)
        except aiohttp.ClientError as e:
            print(
                f"2nd request on the pooled connection failed: "
                f"{type(e).__module__}.{type(e).__qualname__}: {e} "
                f"(cause: {e.__cause__!r})"
            )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="llama-server helper for batchgate e2e tests")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prepare", help="build/cache llama-server and the tiny model")
    for name in ("serve", "smoke", "keepalive"):
        p = sub.add_parser(name)
        p.add_argument("--port", type=int, default=None)
        p.add_argument("-np", "--parallel", type=int, default=4)
        p.add_argument("--ctx-per-slot", type=int, default=512)
        p.add_argument("-t", "--threads", type=int, default=1)
    args = ap.parse_args(argv)

    if args.cmd == "prepare":
        print(ensure_binary())
        print(ensure_model())
        return 0

    srv = LlamaServer(
        args.port, n_parallel=args.parallel, ctx_per_slot=args.ctx_per_slot, threads=args.threads
    )
    with srv:
        print(
            f"llama-server ready at {srv.base_url} (pid {srv.proc.pid if srv.proc else '?'}, "
            f"log {srv.log_path})",
            flush=True,
        )
        if args.cmd == "smoke":
            smoke(srv)
        elif args.cmd == "keepalive":
            import asyncio

            asyncio.run(_keepalive_probe(srv.base_url))
        else:
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            with contextlib.suppress(KeyboardInterrupt):
                assert srv.proc is not None
                srv.proc.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
