"""The access log: values quoted and escaped, one bad line costs no other, bounded queue."""

from __future__ import annotations

import io
import json
import shlex
import threading
import time

from proxy.observe.accesslog import AccessLog
from proxy.observe.exchange import Exchange


def exchange(request_id: str = "rid", path: str = "/v1/models") -> Exchange:
    return Exchange(request_id=request_id, method="GET", path=path, route="other",
                    arrival=0.0, started=time.monotonic(), replica="r", status=200)


def test_text_values_are_quoted_and_escaped_so_no_field_can_be_forged() -> None:
    forged = 'x replica=evil status=500 "q" \\ \n\x00 \udcff é'
    out = io.BytesIO()
    log = AccessLog(out, "text")
    log.record(exchange(request_id=forged, path="/v1/a b replica=evil"))
    log.record(exchange(request_id="plain"))
    log.close()
    text = out.getvalue().decode("ascii")  # escaped: nothing but ASCII reaches the stream
    first, second = text.splitlines()
    words = shlex.split(first)  # read as logfmt tools do: quotes honoured
    assert words[1:5] == ["GET", "/v1/a b replica=evil", "200", "ok"]
    assert [w.split("=", 1)[0] for w in words[5:]] == [
        "request_id", "replica", "duration_ms", "stream", "attempts", "bytes_in", "bytes_out"]
    assert words[5].startswith("request_id=x replica=evil status=500")
    assert words[6] == "replica=r"
    # Plain values stay unquoted, as before.
    assert " GET /v1/models 200 ok request_id=plain replica=r duration_ms=" in second
    assert second.endswith(" stream=false attempts=0 bytes_in=0 bytes_out=0")


def test_one_bad_line_never_costs_another() -> None:
    out = io.BytesIO()
    log = AccessLog(out, "text")
    for i in range(63):
        bad = "\udcff\ud800" if i % 3 == 0 else ""
        log.record(exchange(request_id=f"rid-{i}{bad}"))
    log.close()
    lines = out.getvalue().decode().splitlines()
    assert len(lines) == 63
    for i, line in enumerate(lines):
        quote = '"' if i % 3 == 0 else ""
        assert f"request_id={quote}rid-{i}" in line


class BlockedStream(io.BytesIO):
    """A stdout that blocks its first write until released (a stalled log pipeline)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def write(self, data: object) -> int:
        self.entered.set()
        assert self.release.wait(10), "deadlock guard"
        return super().write(data)  # type: ignore[arg-type]


def test_queue_is_bounded_and_drops_are_counted() -> None:
    stream = BlockedStream()
    drops: list[int] = []
    log = AccessLog(stream, "json", max_pending=10)
    log.on_drop(drops.append)
    log.record(exchange(request_id="first"))
    assert stream.entered.wait(10)  # the writer holds "first" and is stuck writing it
    for i in range(13):
        log.record(exchange(request_id=f"queued-{i}"))
    assert sum(drops) == 3  # 10 wait, 3 are dropped rather than grow the queue
    assert log.dropped == 3
    stream.release.set()
    log.close()
    ids = [json.loads(line)["request_id"] for line in stream.getvalue().decode().splitlines()]
    assert ids == ["first"] + [f"queued-{i}" for i in range(10)]


class BrokenStream(io.BytesIO):
    """A stdout whose reader went away: every write fails."""

    def write(self, data: object) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_lines_a_broken_stdout_could_not_take_are_counted_as_dropped() -> None:
    drops: list[int] = []
    log = AccessLog(BrokenStream(), "json")
    log.on_drop(drops.append)
    for i in range(5):
        log.record(exchange(request_id=f"rid-{i}"))
    log.close()
    assert sum(drops) == 5 and log.dropped == 5
