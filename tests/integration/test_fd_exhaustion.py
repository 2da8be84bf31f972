"""Running out of file descriptors is batchgate's own overload, never a replica's fault.

The proxy runs as a subprocess whose RLIMIT_NOFILE (soft and hard) is small; the test holds
accepted caller connections until the process has no descriptor left (read from
/proc/<pid>/fd, not guessed), then asks for work on one of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import re
import socket
from pathlib import Path
from typing import Any

import pytest

from proxy.edge.app import HEALTH
from tests.integration.conftest import BOUND_S, FakeReplica, make_config
from tests.integration.test_shutdown import Factory, serving, write_config

LIMIT = 64

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")


class Conn:
    """One keep-alive HTTP/1.1 connection to the proxy over a bare socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, url: str) -> Conn:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), BOUND_S)
        return cls(reader, writer)

    async def call(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        self.writer.write(
            f"{method} {path} HTTP/1.1\r\nHost: batchgate\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode() + body
        )
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), BOUND_S)
        status = int(head.split(b" ", 2)[1])
        match = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        assert match is not None, head
        data = await asyncio.wait_for(self.reader.readexactly(int(match.group(1))), BOUND_S)
        return status, data

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def test_out_of_descriptors_is_503_overloaded_and_the_replica_stays_healthy(
    tmp_path: Path, replicas: Factory
) -> None:
    replica: FakeReplica = await replicas("r")
    config = write_config(tmp_path, replica, drain_timeout_s=1)
    async with serving(config, open_files=LIMIT) as served, contextlib.AsyncExitStack() as stack:
        pid = served.proc.pid
        held: list[Conn] = []

        async def hold() -> Conn:
            conn = await Conn.open(served.url)
            stack.push_async_callback(conn.close)
            status, _ = await conn.call("GET", "/healthz")  # answered: it was accepted
            assert status == 200
            held.append(conn)
            return conn

        await hold()
        # Each accepted connection takes one descriptor; stop when none is left.
        while open_fds(pid) < LIMIT:
            assert len(held) < LIMIT, "descriptors never ran out"
            await hold()
        assert open_fds(pid) == LIMIT

        status, data = await held[0].call("POST", "/v1/completions", b'{"max_tokens": 1}')
        error = json.loads(data)["error"]
        assert (status, error["code"], error["type"]) == (503, "overloaded",
                                                          "service_unavailable"), data
        assert replica.arrivals == 0

        status, data = await held[1].call("GET", "/metrics")
        text = data.decode()
        assert status == 200
        assert 'batchgate_replica_healthy{replica="r"} 1.0' in text, text
        assert 'batchgate_rejected_requests_total{reason="overloaded"} 1.0' in text, text
        assert 'kind="connect"} 1' not in text, text

        # Descriptors back: the same proxy serves again, from the same replica.
        for conn in held[2:6]:
            await conn.close()
        status, data = await held[0].call("POST", "/v1/completions", b'{"max_tokens": 1}')
        assert status == 200, data
        assert json.loads(data)["replica"] == "r"


@pytest.mark.parametrize(
    ("code", "verdict"), [(errno.EMFILE, None), (errno.ENFILE, None), (errno.ECONNREFUSED, False)]
)
async def test_a_probe_that_cannot_get_a_socket_says_nothing_about_the_replica(
    replicas: Factory, proxy: Factory, monkeypatch: pytest.MonkeyPatch, code: int,
    verdict: bool | None,
) -> None:
    replica: FakeReplica = await replicas("r")
    handle = await proxy(make_config(("r", replica.url, 1)))
    checker = handle.app[HEALTH]
    real_socket = socket.socket

    def no_socket(*args: Any, **kwargs: Any) -> socket.socket:
        if kwargs.get("fileno") is None:  # a new descriptor: what the limit refuses
            raise OSError(code, os.strerror(code))
        return real_socket(*args, **kwargs)

    # socket() is where the process meets its descriptor limit.
    monkeypatch.setattr(socket, "socket", no_socket)
    target = handle.scheduler.replicas[0]
    assert await checker.probe(target) is verdict
    monkeypatch.undo()
    assert await checker.probe(target) is True
