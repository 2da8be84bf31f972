"""Discovery: replicas found in DNS (a Kubernetes headless Service), kept in step with it.

Each ``discovery`` entry is looked up every ``interval_s`` (±10 %, so several gateways do not
ask in lock-step), A and AAAA together; every address is a replica named
``<name_prefix>-<address>`` at ``http://<address>:<port>`` (IPv6 in brackets in the URL, in
its RFC 5952 form in the name: ``vllm-fd00::a``).

What always holds:

* a new address takes no work before its first passing probe (it is added unhealthy, whatever
  ``health.assume_healthy_at_start`` says: a pod that just appeared in DNS may not serve yet);
* a vanished address takes no new work and finishes what it holds, then goes (pools, probes,
  series), exactly as a replica a reload removes (the changes are the Reloader's own steps,
  :meth:`proxy.control.reload.Reloader.add_replica` and ``remove_replica``);
* an answer is an answer: NXDOMAIN or no record (a headless Service with no ready pod) means
  no replica, and the entry's replicas drain away (a gateway in front of engines scaled to
  zero); a failed lookup (timeout, SERVFAIL, refused, no resolver) means nothing is known, so
  the last set stays, and the failure is counted in ``batchgate_discovery_errors_total``;
* both record types must be answered for a lookup to count: one answered and one timed out
  is a failure (half an answer would drain the other half);
* an address whose name is in use (a file replica of that name, or one of the same name
  still finishing after it vanished) is added on a later lookup, once the name is free.

A reload that changes ``discovery`` restarts the loops (:meth:`Discovery.reconfigure`); the
replicas of an entry that stays are kept (re-capped if its ``max_concurrency`` changed), and
those of an entry that goes drain away. Time is injected (:class:`~proxy.control.health.Timing`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Protocol

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver

from proxy.config import DiscoveryConfig, ReplicaConfig, nameserver_address
from proxy.control.health import Timing, probe_delay
from proxy.observe.metrics import Metrics

log = logging.getLogger("batchgate.discovery")

#: The longest one lookup (A and AAAA, every nameserver) may take; shorter with a shorter
#: ``interval_s``, so a lookup is over before the next is due.
LOOKUP_TIMEOUT_S = 5.0
#: EDNS payload (the DNS flag day's size); a larger answer comes again over TCP.
EDNS_PAYLOAD = 1232


class LookupFailed(Exception):
    """The name could not be resolved (not "it has no address"); ``str()`` says why."""


#: Looks an entry up: its addresses (empty: the name has none), or raises LookupFailed.
Lookup = Callable[[DiscoveryConfig], Awaitable[frozenset[str]]]


class Members(Protocol):
    """What discovery needs of the replica set (:class:`proxy.control.reload.Reloader`)."""

    def add_replica(self, name: str, url: str, max_concurrency: int, *, healthy: bool,
                    entry: ReplicaConfig | DiscoveryConfig | None = None) -> None: ...
    def set_limit(self, name: str, max_concurrency: int) -> None: ...
    def set_routing(self, name: str, entry: ReplicaConfig | DiscoveryConfig) -> None: ...
    def remove_replica(self, name: str, why: str) -> None: ...
    def name_free(self, name: str) -> bool: ...


def replica_name(prefix: str, address: str) -> str:
    return f"{prefix}-{address}"


def replica_url(address: str, port: int) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"http://{host}:{port}"


def _resolver(entry: DiscoveryConfig, resolv_conf: str) -> dns.asyncresolver.Resolver:
    if entry.nameservers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(*nameserver_address(text))
                                for text in entry.nameservers]
    else:
        # /etc/resolv.conf, read once; raises NoResolverConfiguration without nameservers.
        resolver = dns.asyncresolver.Resolver(resolv_conf)
    resolver.cache = None  # every lookup asks: the point is to see changes
    resolver.lifetime = min(LOOKUP_TIMEOUT_S, entry.interval_s)
    resolver.timeout = resolver.lifetime
    resolver.use_edns(0, 0, EDNS_PAYLOAD)
    return resolver


class DnsLookup:
    """The real :data:`Lookup` (dnspython). One resolver per entry, made on first use (and
    again after a failure to make one: the file may appear)."""

    def __init__(self, resolv_conf: str = "/etc/resolv.conf") -> None:
        self._resolv_conf = resolv_conf
        self._resolvers: dict[DiscoveryConfig, dns.asyncresolver.Resolver] = {}

    async def __call__(self, entry: DiscoveryConfig) -> frozenset[str]:
        resolver = self._resolvers.get(entry)
        if resolver is None:
            try:
                resolver = self._resolvers[entry] = _resolver(entry, self._resolv_conf)
            except dns.exception.DNSException as err:  # no usable /etc/resolv.conf
                raise LookupFailed(f"no resolver: {err}") from None
        # The system resolver's search list applies, as for any program in the pod (a
        # name ending in "." skips it); explicit nameservers get the name as written.
        search = None if entry.nameservers else True
        found = await asyncio.gather(*(self._one(resolver, entry.dns, kind, search)
                                       for kind in ("A", "AAAA")))
        problems = [item for item in found if isinstance(item, str)]
        if problems:
            raise LookupFailed("; ".join(problems))
        return frozenset().union(*(item for item in found if not isinstance(item, str)))

    @staticmethod
    async def _one(resolver: dns.asyncresolver.Resolver, name: str, kind: str,
                   search: bool | None) -> frozenset[str] | str:
        """The addresses of one record type, or why the lookup failed (never raises, so the
        other type's lookup is not left running)."""
        try:
            answer = await resolver.resolve(name, kind, search=search, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return frozenset()  # the name does not exist: no replica
        except dns.exception.DNSException as err:
            return f"{kind}: {err}"
        if answer.rrset is None:
            return frozenset()
        return frozenset(str(ipaddress.ip_address(record.address)) for record in answer.rrset)


def _address_order(address: str) -> tuple[int, int]:
    # IPv4 before IPv6 (their address objects do not compare with each other).
    ip = ipaddress.ip_address(address)
    return ip.version, int(ip)


@dataclass(slots=True)
class _Found:
    """A replica this module added: which entry found it, where it is, its cap."""

    prefix: str
    url: str
    max_concurrency: int
    entry: DiscoveryConfig | None = None  # its models and token budget (issue 10)


class Discovery:
    """One lookup loop per ``discovery`` entry; the tasks are owned here (:meth:`close`).

    ``lookup`` and ``timing`` are injectable: tests serve records from a local DNS server
    and drive the interval by hand.
    """

    def __init__(
        self,
        entries: Collection[DiscoveryConfig],
        members: Members,
        metrics: Metrics,
        *,
        lookup: Lookup | None = None,
        timing: Timing | None = None,
    ) -> None:
        self._members = members
        self._metrics = metrics
        self._lookup: Lookup = lookup if lookup is not None else DnsLookup()
        self._timing = timing if timing is not None else Timing()
        self._entries: dict[str, DiscoveryConfig] = {}  # by name_prefix
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stopping: set[asyncio.Task[None]] = set()  # loops a reload replaced
        self._found: dict[str, _Found] = {}  # by replica name
        self._started = False
        #: Lookups applied per entry (by name_prefix), for tests and logs.
        self.lookups: dict[str, int] = {}
        self._configure(tuple(entries))

    @property
    def names(self) -> frozenset[str]:
        """The replicas discovery added and has not removed (the Reloader's ``discovered``)."""
        return frozenset(self._found)

    def start(self) -> None:
        self._started = True
        for entry in self._entries.values():
            self._spawn(entry)

    async def close(self) -> None:
        tasks = [*self._tasks.values(), *self._stopping]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()

    def reconfigure(self, entries: Collection[DiscoveryConfig]) -> None:
        """A reload: entries that changed are looked up again at once with their new
        settings; the replicas of entries that are gone drain away."""
        self._configure(tuple(entries))

    def _configure(self, entries: tuple[DiscoveryConfig, ...]) -> None:
        new = {entry.name_prefix: entry for entry in entries}
        for prefix, old in list(self._entries.items()):
            if new.get(prefix) == old:
                continue
            task = self._tasks.pop(prefix, None)
            if task is not None:
                task.cancel()
                self._stopping.add(task)
                task.add_done_callback(self._stopping.discard)
            if prefix not in new:
                del self._entries[prefix]
                self.lookups.pop(prefix, None)
                self._apply(prefix, None, frozenset())
                if all(e.dns != old.dns for e in new.values()):
                    self._metrics.discovery_forget(old.dns)
        for prefix, entry in new.items():
            if self._entries.get(prefix) == entry and prefix in self._tasks:
                continue
            self._entries[prefix] = entry
            self._metrics.discovery_watch(entry.dns)
            if self._started:
                self._spawn(entry)

    def _spawn(self, entry: DiscoveryConfig) -> None:
        self._tasks[entry.name_prefix] = asyncio.get_running_loop().create_task(
            self._loop(entry), name=f"discovery:{entry.name_prefix}")

    async def _loop(self, entry: DiscoveryConfig) -> None:
        while True:
            try:
                await self.refresh(entry)
            except Exception:
                # A bug here must not end discovery for good: the set stays, the next
                # lookup tries again, and the fault is counted.
                log.exception("discovery of %s failed (a bug)", entry.dns)
                self._metrics.internal_error("discovery")
            await self._timing.sleep(probe_delay(entry.interval_s, self._timing.rng))

    async def refresh(self, entry: DiscoveryConfig) -> bool:
        """Look ``entry`` up once and apply the answer. False: the lookup failed (counted,
        logged; the replicas stay as they were)."""
        try:
            addresses = await self._lookup(entry)
        except LookupFailed as err:
            self._metrics.discovery_error(entry.dns)
            log.warning("discovery of %s failed, keeping its %d replicas: %s", entry.dns,
                        self._count(entry.name_prefix), err)
            return False
        if self._entries.get(entry.name_prefix) is not entry:
            return True  # a reload replaced the entry while the lookup was out
        self._apply(entry.name_prefix, entry, addresses)
        self.lookups[entry.name_prefix] = self.lookups.get(entry.name_prefix, 0) + 1
        return True

    def _count(self, prefix: str) -> int:
        return sum(1 for found in self._found.values() if found.prefix == prefix)

    def _apply(self, prefix: str, entry: DiscoveryConfig | None,
               addresses: frozenset[str]) -> None:
        """Make the replicas of ``prefix`` match ``addresses`` (synchronous: one step)."""
        members = self._members
        wanted: dict[str, str] = {}
        if entry is not None:
            for address in sorted(addresses, key=_address_order):
                wanted[replica_name(prefix, address)] = replica_url(address, entry.port)
        ours = [name for name, found in self._found.items() if found.prefix == prefix]
        for name in ours:
            found = self._found[name]
            if wanted.get(name) == found.url:
                assert entry is not None
                if found.max_concurrency != entry.max_concurrency:
                    members.set_limit(name, entry.max_concurrency)
                    found.max_concurrency = entry.max_concurrency
                if found.entry is not None and (found.entry.models, found.entry.max_tokens_in_flight
                                                ) != (entry.models, entry.max_tokens_in_flight):
                    members.set_routing(name, entry)
                found.entry = entry
                continue
            # Gone from DNS (or moved to another port: a new replica of the same name,
            # added once this one has finished).
            del self._found[name]
            members.remove_replica(name, f"no longer in DNS ({prefix})")
            log.info("replica %s left discovery", name)
        if entry is None:
            return
        for name, url in wanted.items():
            if name in self._found:
                continue
            if not members.name_free(name):
                log.info("replica %s found in DNS but its name is in use: added once free",
                         name)
                continue
            members.add_replica(name, url, entry.max_concurrency, healthy=False, entry=entry)
            self._found[name] = _Found(prefix, url, entry.max_concurrency, entry)
            log.info("replica %s found in DNS at %s: probing it", name, url)
