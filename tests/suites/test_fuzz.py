"""Fuzz: hostile HTTP/1.1 from a raw socket against a running proxy (hypothesis, loopback).

Each case is one connection carrying up to three requests, pipelined, built from hostile
pieces: bad request lines and methods, odd targets (absolute-form, userinfo, ``*``, dot
segments, control bytes), huge, many, folded or control-byte headers, and every framing an
attacker tries (duplicate or huge ``Content-Length``, ``Content-Length`` next to
``Transfer-Encoding``, odd codings, bad chunked bodies, bodies cut short). After every case:

- batchgate answered no 5xx of its own (the replica's answers carry :data:`wire.MARK`, and the
  replica only answers 200) and logged no error; the proxy is still serving;
- nothing was smuggled: every request the replica parsed is one the caller sent as a request
  (each carries its case's id in its target and in ``X-Fuzz-Id``), never one whose bytes sat
  inside another request's body (those carry a ``sm`` id), and none is seen twice; on a
  connection the caller did not cut, the replica saw exactly as many requests as the caller
  got answers from it;
- a normal request on a fresh connection succeeds, and every gauge is back to 0 (the
  scheduler's slots and queue, in /metrics too, the slot-free bound, handlers, pooled
  connections).

A request with ambiguous framing is the last on its connection (and says ``Connection:
close``), as a server must close after answering one (RFC 9112 6.1, 6.3): anything after it
may be read either way. A caller that gets neither an answer nor a close within
:data:`PATIENCE_S` half-closes, as one whose declared body never comes would. The properties
hold whether batchgate answers hostile input with aiohttp's 400 or with its own limits (408,
431, 405): any 4xx is fine.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TypeVar

import pytest
from aiohttp.http_exceptions import HttpProcessingError
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from proxy.observe.metrics import INTERNAL_ERROR_SITES
from tests.integration.conftest import BOUND_S, make_config
from tests.suites.harness import RunningProxy, running_proxy
from tests.suites.wire import RecordingReplica, Reply, read_replies, recording_replica

#: The fixed profile: the same cases on every run and machine, bounded in count and time.
#: No shrinking: the cases share one proxy, so once a case has broken it (a leaked slot) every
#: later one fails too, and shrinking would replay hundreds of them, each up to its bound;
#: the first failing case is reported as it was generated.
FUZZ = settings(
    derandomize=True, database=None, deadline=None, max_examples=400,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

T = TypeVar("T")
_ID = re.compile(r"fz\d+x(?:\d+|ok)")
_SMUGGLED = re.compile(r"sm\d+x\d+")

# -- the pieces of a hostile request -------------------------------------------------------

#: A target piece that a proxy decoding the target before forwarding would split into a
#: second request (CRLF injection): filled in with the case's smuggled request, %-encoded.
SPLIT = b"{split}"

# Each dimension of a request has benign values and hostile ones; a request is benign but
# for a few hostile dimensions (mostly one), so that cases get past the first check and
# pipelined requests after them are read too.
METHODS = st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH"])
HOSTILE_METHODS = st.sampled_from([
    b"TRACE", b"CONNECT", b"get", b"P\x00ST", b"G ET", b"", b"\xc3\x9cBER", b"PRI",
    b"X" * 4000, b"POST\t", b"M-SEARCH", b"PROPFIND",
])
VERSIONS = st.just(b"HTTP/1.1")
#: Request lines aiohttp parses but batchgate does not serve (once forwarded, and answered with
#: an "HTTP/0.9 200" status line: found by this fuzz): refused, test_unsupported_versions.
UNSUPPORTED_VERSIONS = (b"HTTP/0.9", b"HTTP/2.0")
HOSTILE_VERSIONS = st.sampled_from([
    *UNSUPPORTED_VERSIONS, b"HTTP/1.0", b"http/1.1", b"HTTP/1.1 extra", b"HTTP/1.10",
    b"HTTP/1.2", b"HTTP/3.1",
    b"HTTP/1.1\x00", b"", b"HTTP/1", b"HTTP/1.1\r",
])
EOLS = st.just(b"\r\n")
HOSTILE_EOLS = st.sampled_from([b"\n", b"\r", b"\r\r\n", b"\n\r"])
SPACES = st.just(b" ")
HOSTILE_SPACES = st.sampled_from([b"  ", b"\t", b" \t", b"\x0b"])
SUFFIXES = st.lists(st.sampled_from([
    b"", b"/v1/completions", b"/v1/chat/completions", b"?q=1", b"/a/../b", b"/./x", b"//x",
    b"%20", b"?a=%zz", b";p=1",
]), max_size=2).map(b"".join)
HOSTILE_SUFFIXES = st.lists(st.sampled_from([
    b"/%2e%2e/x", b"#frag", b"%00", b"\x00", b"\x7f", b" ", b"\t", b"\xc3\xa9", b"\xff",
    b"x" * 9000, b"x" * 70000, b"\r", b"@evil", SPLIT, b"/../../../..", b"%0d%0a",
]), min_size=1, max_size=3).map(b"".join)
TARGETS = st.sampled_from(["origin", "origin", "absolute", "userinfo", "empty-path"])
HOSTILE_TARGETS = st.sampled_from(["https", "asterisk", "authority", "relative", "empty"])
HEADERS = st.lists(st.sampled_from([
    (b"Content-Type", b"application/json"),
    (b"Accept", b"text/event-stream"),
    (b"Connection", b"keep-alive"),
    (b"X-Request-Id", b"abc-123"),
    (b"X-Forwarded-For", b"1.2.3.4"),
    (b"User-Agent", b"fuzz/1.0"),
    (b"Accept-Encoding", b"gzip"),
]), max_size=3, unique=True)
HOSTILE_HEADERS = st.lists(st.sampled_from([
    (b"Connection", b"close"),
    (b"Connection", b"upgrade, te, x-other"),
    (b"Upgrade", b"h2c"),
    (b"Upgrade", b"websocket"),
    (b"Expect", b"100-continue"),
    (b"Expect", b"bogus"),
    (b"X-Request-Id", b"../../etc/passwd\x01"),
    (b"X-Forwarded-For", b"1.2.3.4, evil"),
    (b"Bad Name", b"v"),
    (b"Nul\x00Name", b"v"),
    (b"", b"no name"),
    (b"X-Nul", b"a\x00b"),
    (b"X-Cr", b"a\rb"),
    (b"X-Lf", b"a\nInjected: 1"),
    (b"X-Crlf", b"a\r\nX-Injected: 1"),
    (b"X-Fold", b"a\r\n folded"),
    (b"X-Fold-Tab", b"a\r\n\tfolded"),
    (b"X-Big", b"b" * 9000),
    (b"X-Huge", b"h" * 70000),
    (b"X-Utf8", b"\xc3\xa9\xe2\x82\xac"),
    (b"X-Latin", b"\xff\xfe"),
    (b"X-Space-Before-Colon ", b"v"),
    (b"Proxy-Authorization", b"Basic Zm9vOmJhcg=="),
    (b"Te", b"trailers"),
    (b"Trailer", b"X-Late"),
    (b"Content-Encoding", b"gzip"),
    (b"X-Empty", b""),
    (b"X-Colons", b"::::"),
    (b"\xc3\xa9", b"non-ascii name"),
]), min_size=1, max_size=4)
HOSTS = st.just("ok")
HOSTILE_HOSTS = st.sampled_from(
    ["none", "dup", "empty", "space", "userinfo", "huge", "port-bad", "nul", "at"])
MANY = st.just(0)
HOSTILE_MANY = st.sampled_from([50, 99, 101, 129, 300, 2000])
WELL_FRAMED = ["none", "none", "cl", "cl", "chunked", "chunked-ext"]
FRAMINGS = st.sampled_from(WELL_FRAMED)
HOSTILE_FRAMINGS = st.sampled_from([
    "cl-dup-same", "cl-list",  # the same length twice: may be taken (RFC 9110 8.6) or refused
    "cl-dup-diff", "cl-huge", "cl-bad", "chunked-bad", "cl+te", "te+cl", "te-odd",
    "te-fold", "cl-fold",  # ambiguous: nothing is sent after them
])
AMBIGUOUS = frozenset(
    {"cl-dup-diff", "cl-huge", "cl-bad", "chunked-bad", "cl+te", "te+cl", "te-odd",
     "te-fold", "cl-fold"})
TE_ODD = st.sampled_from([
    b"chunked, identity", b"identity", b"gzip", b"gzip, chunked", b"Chunked", b"chunked\x0b",
    b" chunked", b"xchunked", b"chunked;x=1", b"chunked, chunked", b"",
])
CL_BAD = st.sampled_from([b"-1", b"+5", b"0x5", b"5 5", b"\xef\xbc\x95", b"", b"5,6", b"1e3"])
CL_HUGE = st.sampled_from(
    [b"99999999999999999999999", b"18446744073709551616", b"9223372036854775807",
     b"67108865", b"1000000"])
CHUNK_BAD = st.sampled_from([
    b"zz\r\nabc\r\n0\r\n\r\n", b"-1\r\nabc\r\n0\r\n\r\n", b"ffffffffffffffffff\r\nabc\r\n",
    b"3\r\nabcdef\r\n0\r\n\r\n", b"3\nabc\n0\n\n", b"10\r\nabc\r\n", b"3\r\nabc0\r\n\r\n",
    b"3 ;x\r\nabc\r\n0\r\n\r\n", b"3\r\nabc\r\n0\r\nX-Trailer: 1\r\n", b"\r\n\r\n",
])
@dataclass(frozen=True)
class Part:
    """One request on the wire, before its ids are filled in (they depend on the case)."""

    method: bytes
    target: str
    suffix: bytes
    version: bytes
    eol: bytes
    spaces: bytes
    host: str
    headers: tuple[tuple[bytes, bytes], ...]
    many_headers: int
    framing: str
    body: bytes
    smuggle: bool
    odd: bytes  # the framing's odd value (a coding, a bad length or a bad chunked body)


DIMENSIONS = ("method", "target", "suffix", "version", "eol", "spaces", "host", "headers",
              "many_headers", "framing")


@st.composite
def parts(draw: st.DrawFn) -> Part:
    # Mostly none or one hostile dimension, sometimes two.
    count = draw(st.sampled_from([0, 0, 1, 1, 1, 2]))
    hostile = draw(st.sets(st.sampled_from(DIMENSIONS), min_size=count, max_size=count))

    def pick(benign: st.SearchStrategy[T], bad: st.SearchStrategy[T], dimension: str) -> T:
        return draw(bad if dimension in hostile else benign)

    framing = pick(FRAMINGS, HOSTILE_FRAMINGS, "framing")
    odd = b""
    if framing == "te-odd":
        odd = draw(TE_ODD)
    elif framing == "cl-bad":
        odd = draw(CL_BAD)
    elif framing == "cl-huge":
        odd = draw(CL_HUGE)
    elif framing == "chunked-bad":
        odd = draw(CHUNK_BAD)
    return Part(
        method=pick(METHODS, HOSTILE_METHODS, "method"),
        target=pick(TARGETS, HOSTILE_TARGETS, "target"),
        suffix=pick(SUFFIXES, HOSTILE_SUFFIXES, "suffix"),
        version=pick(VERSIONS, HOSTILE_VERSIONS, "version"),
        eol=pick(EOLS, HOSTILE_EOLS, "eol"),
        spaces=pick(SPACES, HOSTILE_SPACES, "spaces"),
        host=pick(HOSTS, HOSTILE_HOSTS, "host"),
        headers=tuple(draw(HEADERS) + pick(st.just([]), HOSTILE_HEADERS, "headers")),
        many_headers=pick(MANY, HOSTILE_MANY, "many_headers"),
        framing=framing,
        body=draw(st.binary(max_size=64)),
        smuggle=draw(st.booleans()),
        odd=odd,
    )


@dataclass(frozen=True)
class Case:
    parts: tuple[Part, ...]
    cut: float | None  # the last part is cut at this fraction of its bytes, then half-closed

    @property
    def ambiguous(self) -> bool:
        return self.parts[-1].framing in AMBIGUOUS


@st.composite
def cases(draw: st.DrawFn) -> Case:
    drawn = draw(st.lists(parts(), min_size=1, max_size=3))
    # Nothing goes after an ambiguous request: a correct server may read it either way.
    first_ambiguous = next((i for i, p in enumerate(drawn) if p.framing in AMBIGUOUS), None)
    if first_ambiguous is not None:
        drawn = drawn[: first_ambiguous + 1]
    # One case in ten is cut short and half-closed (a caller that hangs up mid-request).
    cut = draw(st.floats(0.0, 0.999)) if draw(st.sampled_from([False] * 9 + [True])) else None
    return Case(tuple(drawn), cut)


def smuggled(tag: str) -> bytes:
    """A whole request that must only ever reach a replica as body bytes."""
    return f"GET /{tag} HTTP/1.1\r\nHost: fuzz\r\nX-Fuzz-Id: {tag}\r\n\r\n".encode()


def encode(part: Part, tag: str, replica_netloc: str) -> bytes:
    """The bytes of one request; ``tag`` (``fz<case>x<i>``) names it in target and header."""
    eol = part.eol
    token = tag.encode()
    target = {
        "origin": b"/" + token + part.suffix,
        "absolute": b"http://fuzz.example/" + token + part.suffix,
        "userinfo": b"http://user:secret@fuzz.example:8000/" + token + part.suffix,
        "empty-path": b"http://fuzz.example:8000?" + token,
        "https": b"https://" + replica_netloc.encode() + b"/" + token + part.suffix,
        "asterisk": b"*",
        "authority": b"fuzz.example:443",
        "relative": token + part.suffix,
        "empty": b"",
    }[part.target]
    inner = smuggled("sm" + tag.removeprefix("fz"))
    if SPLIT in target:
        split = b" HTTP/1.1\r\nHost: fuzz\r\n\r\n" + inner.removesuffix(b"\r\n\r\n") + b"\r\nX:"
        target = target.replace(SPLIT, urllib.parse.quote_from_bytes(split).encode())
    line = part.method + part.spaces + target + part.spaces + part.version
    headers: list[bytes] = []
    host = {
        "ok": [b"Host: fuzz.example"], "none": [], "dup": [b"Host: a", b"Host: b"],
        "empty": [b"Host:"], "space": [b"Host: a b"], "userinfo": [b"Host: u:p@fuzz"],
        "huge": [b"Host: " + b"h" * 9000], "port-bad": [b"Host: fuzz:99999999"],
        "nul": [b"Host: fu\x00zz"], "at": [b"Host: @"],
    }[part.host]
    headers += host
    headers.append(b"X-Fuzz-Id: " + token)
    headers += [name + b": " + value for name, value in part.headers]
    headers += [b"X-Many-%d: %d" % (i, i) for i in range(part.many_headers)]
    inner = inner if part.smuggle else b""
    body = part.body + inner
    framing = part.framing
    if framing == "cl":
        headers.append(b"Content-Length: %d" % len(body))
    elif framing == "cl-dup-same":
        headers += [b"Content-Length: %d" % len(body)] * 2
    elif framing == "cl-list":
        headers.append(b"Content-Length: %d, %d" % (len(body), len(body)))
    elif framing in ("chunked", "chunked-ext"):
        headers.append(b"Transfer-Encoding: chunked")
        ext = b";name=value" if framing == "chunked-ext" else b""
        body = b"".join(b"%x%s\r\n%s\r\n" % (len(c), ext, c)
                        for c in (body[:7], body[7:]) if c) + b"0\r\n\r\n"
    elif framing == "cl-dup-diff":
        # Inside the body by the larger length, a request of its own by the smaller one.
        headers += [b"Content-Length: %d" % len(part.body),
                    b"Content-Length: %d" % (len(part.body) + len(inner))]
    elif framing in ("cl-huge", "cl-bad"):
        headers.append(b"Content-Length: " + part.odd)
    elif framing == "chunked-bad":
        headers.append(b"Transfer-Encoding: chunked")
        body = part.odd + inner
    elif framing == "cl+te":
        # CL.TE: by Content-Length the smuggled request is body; by chunked it comes after.
        body = b"0\r\n\r\n" + inner
        headers += [b"Content-Length: %d" % len(body), b"Transfer-Encoding: chunked"]
    elif framing == "te+cl":
        # TE.CL: by chunked the smuggled request is chunk data; by Content-Length it follows.
        chunk = inner or b"x"
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(chunk), chunk)
        headers += [b"Transfer-Encoding: chunked", b"Content-Length: 3"]
    elif framing == "te-odd":
        chunk = inner or b"x"
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(chunk), chunk)
        headers += [b"Transfer-Encoding: " + part.odd, b"Content-Length: %d" % len(body)]
    elif framing == "te-fold":
        body = b"0\r\n\r\n" + inner
        headers += [b"Content-Length: %d" % len(body), b"Transfer-Encoding:", b" chunked"]
    elif framing == "cl-fold":
        headers += [b"Content-Length:", b" %d" % len(part.body)]
    else:  # "none": no body at all (a smuggled request would be the next one: leave it out)
        body = b""
    if framing in AMBIGUOUS:
        headers.append(b"Connection: close")  # a server that accepts it closes after it too
    return line + eol + b"".join(h + eol for h in headers) + eol + body


# -- running a case ------------------------------------------------------------------------


class Fuzz:
    """One proxy and its replica for all the cases, and what the replica may still see."""

    def __init__(
        self, proxy: RunningProxy, replica: RecordingReplica, errors: list[logging.LogRecord]
    ) -> None:
        self.proxy = proxy
        self.replica = replica
        self.errors = errors
        self.counter = itertools.count()
        self.allowed: set[str] = set()  # ids the replica may see, each once
        self.checked = 0  # replica requests already checked

    def __repr__(self) -> str:  # hypothesis prints the fixture with a failing case
        return f"<Fuzz {self.proxy.url}, {len(self.replica.requests)} requests seen>"

    def check_replica(self) -> None:
        """Every request the replica parsed was sent as a request, once; nothing smuggled.

        Each record is checked once (a failing case does not fail the ones hypothesis runs
        after it, while it shrinks)."""
        garbage, self.replica.garbage = self.replica.garbage, []
        new, self.checked = self.replica.requests[self.checked:], len(self.replica.requests)
        assert not garbage, f"the replica got bytes it could not frame: {garbage!r:.2000}"
        for seen in new:
            fuzz_id = dict(seen.headers).get("x-fuzz-id", "")
            where = f"{seen.method} {seen.target!r:.300} (X-Fuzz-Id {fuzz_id!r})"
            assert not _SMUGGLED.search(seen.target + " " + fuzz_id), f"smuggled: {where}"
            match = _ID.search(seen.target) or _ID.fullmatch(fuzz_id)
            assert match, f"the replica got a request nobody sent: {where}"
            assert match.group(0) in self.allowed, f"not sent as a whole request, or twice: {where}"
            self.allowed.discard(match.group(0))


@pytest.fixture
async def fuzz() -> AsyncIterator[Fuzz]:
    errors: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            # aiohttp logs each request its parser refused (a 400) at ERROR: not a crash.
            exc = record.exc_info[1] if record.exc_info else None
            if not isinstance(exc, HttpProcessingError):
                errors.append(record)

    handler = Collect(level=logging.ERROR)
    logging.getLogger().addHandler(handler)
    try:
        async with recording_replica() as replica, running_proxy(
            make_config(("fz", replica.url, 4))
        ) as proxy:
            fuzz = Fuzz(proxy, replica, errors)
            yield fuzz
            await proxy.settled("at the end")
            fuzz.check_replica()  # requests the replica read after their case was over
    finally:
        logging.getLogger().removeHandler(handler)


#: How long a caller waits for an answer or a close before it gives up and half-closes: a
#: request the proxy reads as unfinished (its declared body never came) waits for bytes that
#: will never come. The caller's behaviour, not a synchronisation: no property depends on it.
PATIENCE_S = 0.3


async def exchange(
    url: str, data: bytes, methods: list[str], *, cut: bool = False
) -> tuple[list[Reply], bool]:
    """Send ``data`` on a fresh connection; the answers up to EOF, and whether the caller had
    to half-close to get there (at once if ``cut``, else after :data:`PATIENCE_S`)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port), limit=1 << 22)
    try:
        writer.write(data)
        if cut:
            writer.write_eof()
        reading = asyncio.create_task(read_replies(reader, methods))
        done, _ = await asyncio.wait({reading}, timeout=None if cut else PATIENCE_S)
        gave_up = not done
        if gave_up:
            writer.write_eof()
        return await asyncio.wait_for(reading, BOUND_S), cut or gave_up
    finally:
        writer.close()


async def normal_request(fuzz: Fuzz, tag: str) -> None:
    fuzz.allowed.add(tag)
    body = b'{"prompt": "hi", "max_tokens": 1}'
    data = (f"POST /v1/completions?{tag} HTTP/1.1\r\nHost: fuzz\r\nX-Fuzz-Id: {tag}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode() + body
    replies, _ = await exchange(fuzz.proxy.url, data, ["POST"])
    assert [(r.status, r.from_replica) for r in replies] == [(200, True)], replies


async def scrape_gauges(fuzz: Fuzz) -> dict[str, float]:
    data = b"GET /metrics HTTP/1.1\r\nHost: fuzz\r\nConnection: close\r\n\r\n"
    [reply], _ = await exchange(fuzz.proxy.url, data, ["GET"])
    wanted = ("batchgate_queue_depth{", 'batchgate_replica_in_flight{replica="fz"}')
    gauges: dict[str, float] = {}
    for line in reply.body.decode().splitlines():
        if line.startswith(wanted):
            name, value = line.rsplit(" ", 1)
            if name.startswith("batchgate_queue_depth"):  # per class and model: the sum
                name = "batchgate_queue_depth"
            gauges[name] = gauges.get(name, 0.0) + float(value)
    return gauges


@FUZZ
@given(case=cases())
async def test_hostile_requests(fuzz: Fuzz, case: Case) -> None:
    n = next(fuzz.counter)
    netloc = fuzz.replica.url.removeprefix("http://")
    tags = [f"fz{n}x{i}" for i in range(len(case.parts))]
    wire = [encode(p, t, netloc) for p, t in zip(case.parts, tags, strict=True)]
    methods = [p.method.decode("latin-1") for p in case.parts]
    if case.cut is not None:
        wire[-1] = wire[-1][: int(len(wire[-1]) * case.cut)]
        tags = tags[:-1]  # a request cut short must never reach the replica
    if case.cut is None and not case.ambiguous:
        tags.append(sentinel := f"fz{n}x{len(case.parts)}")
        wire.append(f"GET /{sentinel} HTTP/1.1\r\nHost: fuzz\r\nX-Fuzz-Id: {sentinel}\r\n"
                    "Connection: close\r\n\r\n".encode())
        methods.append("GET")
    fuzz.allowed.update(tags)
    before = len(fuzz.replica.requests)

    replies, half_closed = await exchange(
        fuzz.proxy.url, b"".join(wire), methods, cut=case.cut is not None)

    event(f"answers {sorted({r.status for r in replies})}")
    event(f"half-closed: {'cut' if case.cut is not None else half_closed}")
    event(f"forwarded {len(fuzz.replica.requests) - before} of {len(case.parts)}")
    own_5xx = [r for r in replies if r.status >= 500 and not r.from_replica]
    assert not own_5xx, f"batchgate answered {[(r.status, r.body[:200]) for r in own_5xx]}"
    await fuzz.proxy.settled("after the case")
    fuzz.check_replica()
    tunnel = bool(replies) and replies[-1].tunnel  # the answers after it are not HTTP
    event(f"tunnel: {tunnel}")
    if not half_closed and not tunnel:  # each request the replica got was answered
        got = len(fuzz.replica.requests) - before
        answered = sum(r.from_replica for r in replies)
        seen = [(r.method, r.target[:80]) for r in fuzz.replica.requests[before:]]
        assert got == answered, (
            f"the replica saw {got} requests {seen}, the caller got {answered} answers: "
            f"{[(r.status, r.headers, r.body[:100]) for r in replies]}")
    await normal_request(fuzz, f"fz{n}xok")
    await fuzz.proxy.settled("after the normal request")
    assert await scrape_gauges(fuzz) == {
        "batchgate_queue_depth": 0.0, 'batchgate_replica_in_flight{replica="fz"}': 0.0}
    assert sum(fuzz.proxy.metric("batchgate_internal_errors_total", where=w)
               for w in INTERNAL_ERROR_SITES) == 0
    logged, fuzz.errors[:] = list(fuzz.errors), []
    assert not logged, [r.getMessage() for r in logged]


@pytest.mark.parametrize("version", UNSUPPORTED_VERSIONS)
async def test_unsupported_versions(fuzz: Fuzz, version: bytes) -> None:
    fuzz.allowed.add("fz0x0")  # the fixture's own check at the end is not this test's
    data = b"POST /fz0x0 " + version + (
        b"\r\nHost: fuzz\r\nX-Fuzz-Id: fz0x0\r\nContent-Length: 0\r\n\r\n")
    replies, _ = await exchange(fuzz.proxy.url, data, ["POST"])
    assert [r.status // 100 for r in replies] in ([4], [5]), replies
    assert not replies[0].from_replica and not fuzz.replica.requests
