"""A tiny DNS server on 127.0.0.1 (UDP and TCP, one ephemeral port) whose records a test changes.

Answers A and AAAA from ``records`` (name -> addresses; a name that is absent is NXDOMAIN, an
empty list is an answer with no record). ``mode`` makes it misbehave: ``servfail`` answers
SERVFAIL, ``drop`` never answers (a lookup times out). A UDP answer larger than the query's
EDNS payload (512 without EDNS) is sent truncated, so the client asks again over TCP.
"""

from __future__ import annotations

import asyncio
import ipaddress
import struct
from dataclasses import dataclass, field
from typing import cast

from dnslib import AAAA, QTYPE, RCODE, RR, A, DNSRecord

ANSWER, SERVFAIL, DROP = "answer", "servfail", "drop"


@dataclass
class FakeDns:
    records: dict[str, list[str]] = field(default_factory=dict)
    mode: str = ANSWER
    queries: list[tuple[str, str, str]] = field(default_factory=list)  # (transport, name, type)
    port: int = 0
    _udp: asyncio.DatagramTransport | None = None
    _tcp: asyncio.Server | None = None

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set(self, name: str, *addresses: str) -> None:
        self.records[name] = list(addresses)

    def answer(self, data: bytes, transport: str) -> bytes | None:
        request = DNSRecord.parse(data)
        reply = request.reply()
        question = request.q
        name = str(question.qname).rstrip(".").lower()
        kind = QTYPE[question.qtype]
        self.queries.append((transport, name, kind))
        if self.mode == DROP:
            return None
        if self.mode == SERVFAIL:
            reply.header.rcode = RCODE.SERVFAIL
            return bytes(reply.pack())
        addresses = self.records.get(name)
        if addresses is None:
            reply.header.rcode = RCODE.NXDOMAIN
            return bytes(reply.pack())
        for text in addresses:
            address = ipaddress.ip_address(text)
            if kind == "A" and address.version == 4:
                reply.add_answer(RR(question.qname, QTYPE.A, rdata=A(text), ttl=5))
            elif kind == "AAAA" and address.version == 6:
                reply.add_answer(RR(question.qname, QTYPE.AAAA, rdata=AAAA(text), ttl=5))
        packed = bytes(reply.pack())
        limit = max((rr.rclass for rr in request.ar if rr.rtype == QTYPE.OPT), default=512)
        if transport == "udp" and len(packed) > limit:
            truncated = request.reply()
            truncated.header.tc = 1
            return bytes(truncated.pack())
        return packed

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        server = self

        class Udp(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = cast(asyncio.DatagramTransport, transport)

            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                out = server.answer(data, "udp")
                if out is not None:
                    self.transport.sendto(out, addr)

        # The TCP port first (ephemeral), then UDP on the same number, as a DNS server has.
        self._tcp = await asyncio.start_server(self._serve_tcp, "127.0.0.1", 0)
        self.port = self._tcp.sockets[0].getsockname()[1]
        udp, _ = await loop.create_datagram_endpoint(Udp, local_addr=("127.0.0.1", self.port))
        self._udp = udp

    async def _serve_tcp(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                (size,) = struct.unpack("!H", await reader.readexactly(2))
                out = self.answer(await reader.readexactly(size), "tcp")
                if out is None:
                    continue
                writer.write(struct.pack("!H", len(out)) + out)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()
