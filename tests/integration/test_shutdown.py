"""Graceful shutdown of a real ``python -m proxy serve`` process, driven by SIGTERM.

The proxy runs as a subprocess (its own signal handling, exit code and logs are what is under
test); the replica it fronts is a FakeReplica in this process, so the test decides when a
stream may finish. Every wait is for a state (first SSE event, ``/readyz`` 503, queue depth),
bounded, and the subprocess is killed in ``finally`` whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import resource
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.integration.conftest import BOUND_S, FakeReplica, sse_event, until
from tests.integration.raw import Caller

Factory = Callable[..., Any]

LISTENING = re.compile(rb"batchgate listening on (http://127\.0\.0\.1:\d+)")


@dataclass
class Served:
    """A running proxy subprocess: its URL and everything it has logged so far."""

    proc: asyncio.subprocess.Process
    url: str
    stdout: list[bytes] = field(default_factory=list)

    def logged(self, text: str) -> bool:
        return any(text.encode() in line for line in self.stdout)

    async def exit_code(self, bound: float = BOUND_S) -> int:
        return await asyncio.wait_for(self.proc.wait(), bound)


def write_config(
    tmp_path: Path, replica: FakeReplica, *, drain_timeout_s: float, drain_quiet_s: float = 0
) -> Path:
    """``drain_quiet_s`` 0 unless asked: most tests here are about what follows the quiet
    period, which real time would otherwise have to wait out."""
    path = tmp_path / "batchgate.yaml"
    server = {"host": "127.0.0.1", "port": 0, "drain_timeout_s": drain_timeout_s,
              "drain_quiet_s": drain_quiet_s}
    config = {
        "server": server,
        "replicas": [{"name": replica.name, "url": replica.url, "max_concurrency": 1}],
        "health": {"interval_s": 60},
        "logging": {"format": "text"},
    }
    path.write_text(yaml.safe_dump(config))
    return path


@contextlib.asynccontextmanager
async def serving(config: Path, *, open_files: int | None = None) -> AsyncIterator[Served]:
    """Start ``python -m proxy serve``; learn its port from the log; kill it at the end.

    ``open_files`` sets both RLIMIT_NOFILE limits of the process (so it cannot raise them).
    """

    def limit_files() -> None:
        if open_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "--config", str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        preexec_fn=limit_files,
    )
    assert proc.stdout is not None
    lines: list[bytes] = []
    pump: asyncio.Task[None] | None = None
    try:
        async def until_listening() -> str:
            assert proc.stdout is not None
            while line := await proc.stdout.readline():
                lines.append(line)
                if match := LISTENING.search(line):
                    return match.group(1).decode()
            raise AssertionError(f"proxy exited before listening: {b''.join(lines)!r}")

        url = await asyncio.wait_for(until_listening(), BOUND_S)

        async def keep_reading() -> None:  # so a full pipe can never block the proxy
            assert proc.stdout is not None
            while line := await proc.stdout.readline():
                lines.append(line)

        pump = asyncio.create_task(keep_reading())
        yield Served(proc, url, lines)
    finally:
        if proc.returncode is None:
            proc.kill()
        await asyncio.wait_for(proc.wait(), BOUND_S)
        if pump is not None:
            await asyncio.wait_for(pump, BOUND_S)


async def poll(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """``until`` for a condition that needs I/O to observe (bounded)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + BOUND_S
    while not await asyncio.wait_for(check(), BOUND_S):
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.01)


def fresh_connections() -> aiohttp.ClientSession:
    """A client that opens a new TCP connection per request: proves the listener accepts."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True),
        timeout=aiohttp.ClientTimeout(total=BOUND_S),
    )


async def queue_depth(probe: aiohttp.ClientSession, url: str) -> float:
    async with probe.get(url + "/metrics") as r:
        text = await r.text()
    match = re.search(r'^batchgate_queue_depth\{class="standard",model=""\} (\S+)$', text,
                      re.MULTILINE)
    assert match is not None, text
    return float(match.group(1))


async def queue_behind(
    served: Served, replica: FakeReplica, client: aiohttp.ClientSession,
    probe: aiohttp.ClientSession, stack: contextlib.AsyncExitStack,
) -> asyncio.Task[tuple[int, dict[str, Any]]]:
    """A request that has to wait: the replica's only slot is held by a stream."""

    async def queued_call() -> tuple[int, dict[str, Any]]:
        async with client.post(served.url + "/v1/completions", json={"i": 1}) as r:
            return r.status, await r.json()

    queued = asyncio.create_task(queued_call())
    stack.push_async_callback(_cancel, queued)

    async def is_queued() -> bool:
        return await queue_depth(probe, served.url) == 1.0

    await poll(is_queued, "second request queued behind the stream (batchgate_queue_depth 1.0)")
    assert replica.arrivals == 1
    return queued


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


async def terminate_and_see_draining(served: Served, probe: aiohttp.ClientSession) -> None:
    served.proc.send_signal(signal.SIGTERM)

    async def not_ready() -> bool:
        async with probe.get(served.url + "/readyz") as r:
            return r.status == 503

    # A new connection answered after SIGTERM: the listener is still open while draining.
    await poll(not_ready, "/readyz to answer 503 after SIGTERM")
    async with probe.post(served.url + "/v1/completions", json={"i": 2}) as r:
        assert r.status == 503
        assert int(r.headers["Retry-After"]) >= 1
        # Off this pod's connections, and a gateway in front may send it elsewhere.
        assert r.headers["Connection"] == "close"
        assert r.headers["X-Batchgate-Rejected"] == "draining"
        body = await r.json()
    assert body["error"]["code"] == "draining"
    assert body["error"]["type"] == "service_unavailable"
    assert body["error"]["message"]


async def test_sigterm_drains_stream_and_queue_then_exits_0(
    tmp_path: Path, replicas: Factory
) -> None:
    replica: FakeReplica = await replicas("r")
    config = write_config(tmp_path, replica, drain_timeout_s=30)
    async with (
        serving(config) as served,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=BOUND_S * 2)) as client,
        fresh_connections() as probe,
        contextlib.AsyncExitStack() as stack,
    ):
        stream = await stack.enter_async_context(
            client.post(served.url + "/v1/completions",
                        json={"stream": True, "hold": True, "events": 4})
        )
        assert stream.status == 200
        first = await asyncio.wait_for(stream.content.readuntil(b"\n\n"), BOUND_S)
        assert first == sse_event(0)
        queued = await queue_behind(served, replica, client, probe, stack)
        await terminate_and_see_draining(served, probe)
        # Still draining: the stream and the queued request are both being held open.
        assert served.proc.returncode is None and not queued.done()
        assert replica.arrivals == 1  # the refused request never reached the replica

        replica.gate.set()
        rest = await asyncio.wait_for(stream.content.read(), BOUND_S)
        assert rest == sse_event(1) + sse_event(2) + sse_event(3) + b"data: [DONE]\n\n"
        status, body = await asyncio.wait_for(queued, BOUND_S)
        assert (status, body["replica"]) == (200, "r")

        assert await served.exit_code() == 0
        assert served.logged("drained") and served.logged("batchgate stopped")
        assert not served.logged("Traceback"), b"".join(served.stdout).decode()
        assert not served.logged("cutting")
        assert (replica.completed, replica.aborted) == (2, 0)


class RawStream:
    """An HTTP/1.1 streaming POST over a bare socket, decoding the chunked body by hand.

    A cut stream ends with its error event and then a closed connection, without the
    terminal chunk. aiohttp's client may then raise "payload is not completed" before it
    hands over the last bytes, so the last event is read here instead.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.body = b""

    @classmethod
    async def post(cls, url: str, path: str, payload: dict[str, Any]) -> RawStream:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        data = json.dumps(payload).encode()
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode()
            + data
        )
        stream = cls(reader, writer)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), BOUND_S)
        assert head.startswith(b"HTTP/1.1 200 "), head
        assert b"transfer-encoding: chunked" in head.lower(), head
        return stream

    async def _next_chunk(self) -> bool:
        """Read one chunk into ``body``; False at the end (terminal chunk or EOF)."""
        size_line = await self.reader.readline()
        if not size_line.endswith(b"\r\n"):
            return False  # the connection closed between chunks
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return False
        try:
            self.body += await self.reader.readexactly(size + 2)
        except asyncio.IncompleteReadError as err:
            self.body += err.partial
            return False
        self.body = self.body.removesuffix(b"\r\n")
        return True

    async def read_until_event(self) -> bytes:
        async def read() -> None:
            while b"\n\n" not in self.body:
                assert await self._next_chunk(), self.body

        await asyncio.wait_for(read(), BOUND_S)
        event, _, self.body = self.body.partition(b"\n\n")
        return event + b"\n\n"

    async def read_to_end(self) -> bytes:
        async def read() -> None:
            while await self._next_chunk():
                pass

        await asyncio.wait_for(read(), BOUND_S)
        return self.body

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


async def test_sigterm_deadline_cuts_stream_and_queue_then_exits_0(
    tmp_path: Path, replicas: Factory
) -> None:
    replica: FakeReplica = await replicas("r")
    config = write_config(tmp_path, replica, drain_timeout_s=0.5)
    async with (
        serving(config) as served,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=BOUND_S * 2)) as client,
        fresh_connections() as probe,
        contextlib.AsyncExitStack() as stack,
    ):
        stream = await RawStream.post(
            served.url, "/v1/completions", {"stream": True, "hold": True, "events": 4}
        )
        stack.push_async_callback(stream.close)
        assert await stream.read_until_event() == sse_event(0)
        queued = await queue_behind(served, replica, client, probe, stack)
        await terminate_and_see_draining(served, probe)

        # The replica's gate is never set: the deadline has to cut the stream.
        rest = await stream.read_to_end()
        events = [e for e in rest.split(b"\n\n") if e]
        assert len(events) == 1, rest
        name, data = events[0].split(b"\n")
        assert name == b"event: error"
        assert data.startswith(b"data: ")
        error = json.loads(data[len(b"data: "):])["error"]
        assert error["code"] == "draining"
        assert error["type"] == "service_unavailable"

        status, body = await asyncio.wait_for(queued, BOUND_S)
        assert status == 503
        assert body["error"]["code"] == "draining"

        assert await served.exit_code() == 0
        assert served.logged("cutting 2 requests") and served.logged("batchgate stopped")
        assert not served.logged("Traceback"), b"".join(served.stdout).decode()
        # The upstream connection was closed, so the engine saw its client leave.
        await until(lambda: replica.aborted == 1, "the replica to see its client leave")
        assert replica.completed == 0


async def test_second_sigterm_exits_at_once_without_waiting_for_the_drain(
    tmp_path: Path, replicas: Factory
) -> None:
    replica: FakeReplica = await replicas("r")
    # A drain far longer than the bound of every wait below: only a forced exit can pass.
    config = write_config(tmp_path, replica, drain_timeout_s=BOUND_S * 6)
    async with (
        serving(config) as served,
        fresh_connections() as probe,
        contextlib.AsyncExitStack() as stack,
    ):
        stream = await RawStream.post(
            served.url, "/v1/completions", {"stream": True, "hold": True, "events": 4}
        )
        stack.push_async_callback(stream.close)
        assert await stream.read_until_event() == sse_event(0)
        await terminate_and_see_draining(served, probe)
        assert served.proc.returncode is None  # draining: the held stream keeps it alive

        served.proc.send_signal(signal.SIGTERM)
        assert await served.exit_code() == 128 + signal.SIGTERM
        assert served.logged("second SIGTERM during the drain: exiting now")
        # Its sockets died with it: the engine saw its client leave.
        await until(lambda: replica.aborted == 1, "the replica to see its client leave")
        assert replica.completed == 0


async def test_sigterm_quiet_period_serves_keep_alive_callers_and_closes_their_connections(
    tmp_path: Path, replicas: Factory
) -> None:
    replica: FakeReplica = await replicas("r")
    # A quiet period far longer than the bound of every wait below: it lasts the whole test.
    config = write_config(tmp_path, replica, drain_timeout_s=BOUND_S * 12,
                          drain_quiet_s=BOUND_S * 6)
    body = json.dumps({"i": 1}).encode()
    async with serving(config) as served, fresh_connections() as probe:
        kept = await Caller.open(served.url)
        try:
            before = await kept.request("POST", "/v1/completions", body)
            assert before.status == 200 and before.header("Connection") is None
            served.proc.send_signal(signal.SIGTERM)

            async def not_ready() -> bool:
                async with probe.get(served.url + "/readyz") as r:
                    return r.status == 503

            await poll(not_ready, "/readyz to answer 503 after SIGTERM")
            # Served on the connection that was open at SIGTERM, then that connection closes.
            during = await kept.request("POST", "/v1/completions", body)
            assert during.status == 200, during.body
            assert json.loads(during.body)["replica"] == "r"
            assert during.header("Connection") == "close"
            assert await kept.at_eof()
        finally:
            kept.close()
        # A new connection is served too.
        async with probe.post(served.url + "/v1/completions", json={"i": 2}) as r:
            assert (r.status, r.headers["Connection"]) == (200, "close")
        assert replica.arrivals == 3
        assert served.proc.returncode is None  # still in its quiet period

        async def logged() -> bool:  # stdout is read as it comes: the line may trail
            return served.logged("draining (SIGTERM)")

        await poll(logged, "the drain's log line")


async def test_wait_for_drain_drains_then_the_process_exits_0(
    tmp_path: Path, replicas: Factory
) -> None:
    """What the engine's preStop hook does: the drain begins, the hook gets its 200 once the
    stream is over, and batchgate exits as after SIGTERM."""
    replica: FakeReplica = await replicas("r")
    config = write_config(tmp_path, replica, drain_timeout_s=30)
    async with (
        serving(config) as served,
        fresh_connections() as probe,
        contextlib.AsyncExitStack() as stack,
    ):
        stream = await RawStream.post(
            served.url, "/v1/completions", {"stream": True, "hold": True, "events": 2}
        )
        stack.push_async_callback(stream.close)
        assert await stream.read_until_event() == sse_event(0)

        async def pre_stop() -> tuple[int, dict[str, Any]]:
            async with probe.get(served.url + "/wait-for-drain") as r:
                return r.status, await r.json()

        hook = asyncio.create_task(pre_stop())
        stack.push_async_callback(_cancel, hook)

        async def not_ready() -> bool:
            async with probe.get(served.url + "/readyz") as r:
                return r.status == 503

        await poll(not_ready, "/readyz to answer 503 once /wait-for-drain is called")
        assert not hook.done() and served.proc.returncode is None

        replica.gate.set()
        assert await stream.read_to_end() == sse_event(1) + b"data: [DONE]\n\n"
        assert await asyncio.wait_for(hook, BOUND_S) == (200, {"drained": True, "cut": 0})
        assert await served.exit_code() == 0
        assert served.logged("draining (GET /wait-for-drain)") and served.logged("drained")
        assert not served.logged("Traceback"), b"".join(served.stdout).decode()
        assert (replica.completed, replica.aborted) == (1, 0)


async def test_sigterm_during_a_wait_for_drain_drain_joins_it_and_is_not_a_second_signal(
    tmp_path: Path, replicas: Factory
) -> None:
    replica: FakeReplica = await replicas("r")
    config = write_config(tmp_path, replica, drain_timeout_s=BOUND_S * 6)
    async with (
        serving(config) as served,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=BOUND_S * 2)) as client,
        fresh_connections() as probe,
        contextlib.AsyncExitStack() as stack,
    ):
        async def held_call() -> int:
            async with client.post(served.url + "/v1/completions", json={"hold": True}) as r:
                await r.read()
                return r.status

        held = asyncio.create_task(held_call())
        stack.push_async_callback(_cancel, held)
        await until(lambda: replica.in_flight == 1, "a request held by the replica")
        hook = asyncio.create_task(probe.get(served.url + "/wait-for-drain"))
        stack.push_async_callback(_cancel, hook)
        await poll(lambda: _logged(served, "draining (GET /wait-for-drain)"), "the drain")

        served.proc.send_signal(signal.SIGTERM)
        async with probe.post(served.url + "/v1/completions", json={"i": 2}) as r:
            assert r.status == 503  # answered: the process did not exit at the signal
        assert served.proc.returncode is None and not hook.done()
        assert not served.logged("second SIGTERM")

        replica.gate.set()
        assert await asyncio.wait_for(held, BOUND_S) == 200
        answer = await asyncio.wait_for(hook, BOUND_S)
        assert answer.status == 200
        answer.release()
        assert await served.exit_code() == 0
        assert served.logged("drained") and served.logged("batchgate stopped")


async def _logged(served: Served, text: str) -> bool:
    return served.logged(text)


async def test_a_reloaded_drain_quiet_s_applies_to_the_next_sigterm(
    tmp_path: Path, replicas: Factory
) -> None:
    replica: FakeReplica = await replicas("r")
    config = write_config(tmp_path, replica, drain_timeout_s=BOUND_S * 12)  # no quiet period
    async with serving(config) as served, fresh_connections() as probe:
        write_config(tmp_path, replica, drain_timeout_s=BOUND_S * 12, drain_quiet_s=BOUND_S * 6)
        served.proc.send_signal(signal.SIGHUP)

        async def reloaded() -> bool:
            async with probe.get(served.url + "/metrics") as r:
                text = await r.text()
            return 'batchgate_config_reloads_total{result="success"} 1.0' in text

        await poll(reloaded, "the reload to apply")
        served.proc.send_signal(signal.SIGTERM)

        async def not_ready() -> bool:
            async with probe.get(served.url + "/readyz") as r:
                return r.status == 503

        await poll(not_ready, "/readyz to answer 503 after SIGTERM")
        async with probe.post(served.url + "/v1/completions", json={"i": 1}) as r:
            assert (r.status, r.headers["Connection"]) == (200, "close")  # quiet period
        # Its stdout is read as it comes: the drain's log line may trail the answer.
        async def quiet_logged() -> bool:
            return served.logged(f"quiet period {BOUND_S * 6:g}s")

        await poll(quiet_logged, "the drain's log line naming the reloaded quiet period")
