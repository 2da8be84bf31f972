"""What a reload changes (proxy.control.reload.plan), and the admin section of the config."""

from __future__ import annotations

import dataclasses

import pytest

from proxy.config import (
    AdminConfig,
    Config,
    ConfigError,
    HealthConfig,
    LoggingConfig,
    QueueConfig,
    ReplicaConfig,
    ServerConfig,
    SimulatedConfig,
    TlsConfig,
    UpstreamConfig,
    parse_config,
)
from proxy.control.reload import plan

A = ReplicaConfig(name="a", url="http://10.0.0.1:8000", max_concurrency=4)
B = ReplicaConfig(name="b", url="http://10.0.0.2:8000", max_concurrency=4)
BASE = Config(replicas=(A, B))


def test_the_same_config_changes_nothing() -> None:
    p = plan(BASE, BASE)
    assert p == plan(BASE, dataclasses.replace(BASE))
    assert (p.added, p.removed, p.limits, p.changed, p.fixed, p.refused) == (
        (), (), (), frozenset(), (), False)
    assert p.summary() == "no changes"


def test_replicas_added_removed_and_recapped() -> None:
    c = ReplicaConfig(name="c", url="http://10.0.0.3:8000", max_concurrency=1)
    new = dataclasses.replace(BASE, replicas=(dataclasses.replace(B, max_concurrency=9), c))
    p = plan(BASE, new)
    assert p.added == (c,)
    assert p.removed == ("a",)
    assert p.limits == (("b", 4, 9),)
    assert p.changed == {"replicas"} and not p.refused
    assert p.summary() == "+c; -a; b max_concurrency 4->9"


def test_live_sections_change_without_refusal() -> None:
    new = dataclasses.replace(
        BASE,
        server=dataclasses.replace(BASE.server, drain_timeout_s=5),
        queue=QueueConfig(max_size=3, timeout_s=1, max_bytes=10, sse_heartbeat_s=15),
        health=HealthConfig(path="/ready", interval_s=1, timeout_s=1),
        upstream=dataclasses.replace(BASE.upstream, retries=0),
        logging=LoggingConfig(format="text", level="debug"),
    )
    p = plan(BASE, new)
    assert not p.refused
    assert p.changed == {"server", "queue", "health", "upstream", "logging"}
    assert p.summary() == "changed: health, logging, queue, server, upstream"


@pytest.mark.parametrize(
    ("change", "fixed"),
    [
        ({"server": ServerConfig(host="127.0.0.1", port=9)}, ("server.host", "server.port")),
        ({"server": ServerConfig(max_body_bytes=1)}, ("server.max_body_bytes",)),
        ({"upstream": UpstreamConfig(read_timeout_s=1)}, ("upstream.read_timeout_s",)),
        ({"upstream": UpstreamConfig(connect_timeout_s=1)}, ("upstream.connect_timeout_s",)),
        ({"upstream": UpstreamConfig(tls=TlsConfig(insecure_skip_verify=True))},
         ("upstream.tls",)),
        ({"admin": AdminConfig()}, ("admin",)),
    ],
)
def test_keys_that_cannot_change_live_refuse_the_reload(
    change: dict[str, object], fixed: tuple[str, ...]
) -> None:
    p = plan(BASE, dataclasses.replace(BASE, **change))  # type: ignore[arg-type]
    assert p.fixed == fixed and p.refused
    assert p.refusal() == (f"reload refused, nothing applied: {', '.join(fixed)} cannot "
                           "change without a restart")


def test_admin_address_changes_are_named() -> None:
    old = dataclasses.replace(BASE, admin=AdminConfig())
    assert plan(old, dataclasses.replace(old, admin=AdminConfig(port=9))).fixed == (
        "admin.port",)
    assert plan(old, BASE).fixed == ("admin",)  # removed


def test_a_replica_url_or_simulated_engine_cannot_change_under_its_name() -> None:
    moved = dataclasses.replace(A, url="http://10.0.0.9:8000")
    p = plan(BASE, dataclasses.replace(BASE, replicas=(moved, B)))
    assert p.fixed == ("replicas[0].url (of a; to move a replica, give it a new name)",)
    sim = ReplicaConfig(name="s", max_concurrency=1, simulated=SimulatedConfig())
    # The config in force has the embedded engine's URL filled in; the file has none.
    running = dataclasses.replace(BASE, replicas=(
        dataclasses.replace(sim, url="http://127.0.0.1:4000"),))
    assert not plan(running, dataclasses.replace(BASE, replicas=(sim,))).refused
    other = dataclasses.replace(sim, simulated=SimulatedConfig(max_batch=2))
    assert plan(running, dataclasses.replace(BASE, replicas=(other,))).fixed == (
        "replicas[0].simulated (of s; to move a replica, give it a new name)",)


def test_a_draining_name_is_blocked_until_it_is_gone() -> None:
    only_b = dataclasses.replace(BASE, replicas=(B,))
    p = plan(only_b, BASE, draining={"a"})
    assert p.refused and not p.fixed
    assert p.refusal() == ("reload refused, nothing applied: replicas[0] (a) is still "
                           "finishing its work after an earlier reload removed it; reload "
                           "again once it is gone")


def test_admin_is_absent_by_default_and_empty_means_its_defaults() -> None:
    assert parse_config({"replicas": [{"name": "a", "url": "http://h:1",
                                       "max_concurrency": 1}]}).admin is None
    admin = parse_config({"replicas": [{"name": "a", "url": "http://h:1",
                                        "max_concurrency": 1}], "admin": None}).admin
    assert admin == AdminConfig(host="127.0.0.1", port=8081)


@pytest.mark.parametrize(
    ("admin", "message"),
    [
        ({"port": 70000}, "admin.port: must be an integer between 0 and 65535, got 70000"),
        ({"port": "x"}, "admin.port: must be an integer between 0 and 65535, got 'x'"),
        ({"host": ""}, "admin.host: must be a non-empty host or address, got ''"),
        ({"hots": "x"}, "admin.hots: unknown key (allowed: host, port)"),
        ("8081", "admin: must be a mapping, got '8081'"),
    ],
)
def test_bad_admin_section_is_one_line(admin: object, message: str) -> None:
    data = {"replicas": [{"name": "a", "url": "http://h:1", "max_concurrency": 1}],
            "admin": admin}
    with pytest.raises(ConfigError) as caught:
        parse_config(data, "c.yaml")
    assert str(caught.value) == f"c.yaml: {message}"


def test_slot_free_requests_tell_when_a_removed_replica_is_idle() -> None:
    from proxy.core.replicas import Replica
    from proxy.edge.light import LightSlots

    a = Replica("a", "http://a:1", 1)
    slots = LightSlots(limit=4)
    told: list[str] = []
    slots.when_idle("b", lambda: told.append("b"))  # nothing in flight: at once
    assert told == ["b"]
    slots.take(a)
    slots.take(a)
    slots.when_idle("a", lambda: told.append("a"))
    slots.give(a)
    assert told == ["b"]
    slots.give(a)
    assert told == ["b", "a"] and slots.in_flight == {}  # told once, and forgotten
    slots.take(a)
    slots.give(a)
    assert told == ["b", "a"]
