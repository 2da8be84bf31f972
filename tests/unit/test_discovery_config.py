"""`discovery:` entries: validation, defaults, and `replicas` becoming optional beside them."""

from __future__ import annotations

import pytest
import yaml

from proxy.config import (
    ConfigError,
    DiscoveryConfig,
    config_to_dict,
    nameserver_address,
    parse_config,
)
from proxy.control.discovery import replica_name, replica_url
from proxy.control.reload import plan

ENTRY = "{dns: vllm-headless.llm.svc.cluster.local, port: 8000, max_concurrency: 32, " \
        "name_prefix: vllm%s}"


def load(text: str) -> object:
    return parse_config(yaml.safe_load(text))


def test_discovery_instead_of_replicas_with_its_defaults() -> None:
    config = parse_config(yaml.safe_load(f"discovery: [{ENTRY % ''}]"))
    assert config.replicas == ()
    assert config.discovery == (DiscoveryConfig(
        dns="vllm-headless.llm.svc.cluster.local", port=8000, max_concurrency=32,
        name_prefix="vllm", interval_s=5.0, nameservers=()),)
    # check-config's output reads back as the same config.
    assert parse_config(yaml.safe_load(yaml.safe_dump(config_to_dict(config)))) == config


def test_discovery_beside_replicas_and_nameservers() -> None:
    config = parse_config(yaml.safe_load(
        "replicas: [{name: a, url: 'http://10.0.0.1:8000', max_concurrency: 1}]\n"
        f"discovery: [{ENTRY % ', interval_s: 1.5, nameservers: [127.0.0.1:5353, fd00::a]'}]"))
    assert [r.name for r in config.replicas] == ["a"]
    assert config.discovery[0].interval_s == 1.5
    assert config.discovery[0].nameservers == ("127.0.0.1:5353", "fd00::a")


@pytest.mark.parametrize(("text", "address"), [
    ("10.0.0.10", ("10.0.0.10", 53)),
    ("127.0.0.1:5353", ("127.0.0.1", 5353)),
    ("fd00::a", ("fd00::a", 53)),
    ("[::1]:5353", ("::1", 5353)),
])
def test_nameserver_forms(text: str, address: tuple[str, int]) -> None:
    assert nameserver_address(text) == address


BAD = [
    ("no replicas, no discovery", "queue: {max_size: 1}\n", "replicas: required key is missing"),
    ("empty both", "replicas: []\ndiscovery: []\n",
     "replicas: must be a non-empty list of replicas (or set health.ready_without_replicas: "
     "true to wait for them), got []"),
    ("discovery not a list", "discovery: {dns: x}\n",
     "discovery: must be a list of {dns, port, max_concurrency, name_prefix}, got {'dns': 'x'}"),
    ("missing port", "discovery: [{dns: x, max_concurrency: 1, name_prefix: v}]\n",
     "discovery[0].port: required key is missing"),
    ("missing name_prefix", "discovery: [{dns: x, port: 80, max_concurrency: 1}]\n",
     "discovery[0].name_prefix: required key is missing"),
    ("bad dns", f"discovery: [{ENTRY % ''}]\n".replace("vllm-headless.llm", "vllm_ headless"),
     "discovery[0].dns: must be a DNS name, e.g. vllm-headless.llm.svc.cluster.local, "
     "got 'vllm_ headless.svc.cluster.local'"),
    ("port 0", f"discovery: [{ENTRY % ''}]\n".replace("8000", "0"),
     "discovery[0].port: must be an integer between 1 and 65535, got 0"),
    ("cap 0", f"discovery: [{ENTRY % ''}]\n".replace("32", "0"),
     "discovery[0].max_concurrency: must be an integer >= 1, got 0"),
    ("interval 0", f"discovery: [{ENTRY % ', interval_s: 0'}]\n",
     "discovery[0].interval_s: must be a number > 0, got 0"),
    ("long prefix", f"discovery: [{ENTRY % ''}]\n".replace("vllm}", "a" * 25 + "}"),
     "discovery[0].name_prefix: must be 1 to 24 characters from A-Z a-z 0-9 _ . -, "
     f"got '{'a' * 25}'"),
    ("colon in prefix", f"discovery: [{ENTRY % ''}]\n".replace("vllm}", "'a:b'}"),
     "discovery[0].name_prefix: must be 1 to 24 characters from A-Z a-z 0-9 _ . -, got 'a:b'"),
    ("duplicate prefix", f"discovery: [{ENTRY % ''}, {ENTRY % ''}]\n",
     "discovery[1].name_prefix: duplicate name_prefix, got 'vllm'"),
    ("nameserver name", f"discovery: [{ENTRY % ', nameservers: [dns.local]'}]\n",
     "discovery[0].nameservers[0]: must be an IP address with an optional port, e.g. "
     "127.0.0.1:5353 or [::1]:5353, got 'dns.local'"),
    ("nameserver port", f"discovery: [{ENTRY % ', nameservers: [127.0.0.1:70000]'}]\n",
     "discovery[0].nameservers[0]: must have a port between 1 and 65535 if it has one, "
     "got '127.0.0.1:70000'"),
    ("nameservers scalar", f"discovery: [{ENTRY % ', nameservers: 127.0.0.1'}]\n",
     "discovery[0].nameservers: must be a list of DNS servers, e.g. [127.0.0.1:5353], "
     "got '127.0.0.1'"),
    ("unknown key", f"discovery: [{ENTRY % ', scheme: https'}]\n",
     "discovery[0].scheme: unknown key (allowed: dns, port, max_concurrency, name_prefix, "
     "interval_s, nameservers, models, max_tokens_in_flight, adaptive)"),
]


@pytest.mark.parametrize(("text", "message"), [pytest.param(t, m, id=i) for i, t, m in BAD])
def test_bad_discovery_is_one_line_naming_the_field(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(text)
    assert str(caught.value) == f"config: {message}"


def test_names_and_urls() -> None:
    assert replica_name("vllm", "10.0.0.5") == "vllm-10.0.0.5"
    assert replica_name("vllm", "fd00::a") == "vllm-fd00::a"
    assert replica_url("10.0.0.5", 8000) == "http://10.0.0.5:8000"
    assert replica_url("fd00::a", 8000) == "http://[fd00::a]:8000"
    # The longest name there can be still fits a replica name (64 characters).
    assert len(replica_name("a" * 24, "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")) == 64


def test_plan_never_removes_discovered_replicas_and_refuses_their_names() -> None:
    old = parse_config(yaml.safe_load(f"discovery: [{ENTRY % ''}]"))
    new = parse_config(yaml.safe_load(
        f"discovery: [{ENTRY % ''}]\n"
        "replicas: [{name: vllm-10.0.0.5, url: 'http://10.0.0.9:8000', max_concurrency: 1}]"))
    assert plan(old, old, taken={"vllm-10.0.0.5"}).removed == ()
    changes = plan(old, new, taken={"vllm-10.0.0.5"})
    assert changes.blocked == ("replicas[0] (vllm-10.0.0.5) has the name of a replica found "
                               "by discovery; give it another name",)
