"""The limits on callers as pure decisions: config keys and their defaults, the body deadline,
the Host rule, the canned answers. (On real sockets: tests/integration/test_limits.py.)"""

from __future__ import annotations

import json

import pytest
from aiohttp import HttpVersion10, HttpVersion11
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from proxy.config import ConfigError, ServerConfig, parse_config
from proxy.core.errors import HeaderTimeout, TooManyConnections
from proxy.edge.limits import body_deadline, host_problem, raw_answer

REPLICA = {"replicas": [{"name": "r", "url": "http://127.0.0.1:8000", "max_concurrency": 1}]}


def server(**keys: object) -> ServerConfig:
    return parse_config({**REPLICA, "server": keys}).server


def test_limit_defaults_are_the_issues() -> None:
    s = ServerConfig()
    assert (s.header_timeout_s, s.body_timeout_s, s.min_body_rate) == (10.0, 20.0, 500.0)
    assert (s.keepalive_timeout_s, s.max_connections, s.send_timeout_s) == (75.0, 10_000, 60.0)
    assert (s.max_header_bytes, s.max_headers) == (64 * 1024, 100)
    assert server() == s


def test_limit_keys_are_read_from_the_file() -> None:
    s = server(header_timeout_s=1.5, body_timeout_s=3, min_body_rate=0, keepalive_timeout_s=5,
               max_connections=7, max_header_bytes=4096, max_headers=20, send_timeout_s=0.5)
    assert s == ServerConfig(header_timeout_s=1.5, body_timeout_s=3.0, min_body_rate=0.0,
                             keepalive_timeout_s=5.0, max_connections=7, max_header_bytes=4096,
                             max_headers=20, send_timeout_s=0.5)


@pytest.mark.parametrize(
    ("key", "value", "rule"),
    [
        ("header_timeout_s", 0, "must be a number > 0"),
        ("body_timeout_s", -1, "must be a number > 0"),
        ("min_body_rate", -5, "must be a number >= 0"),
        ("keepalive_timeout_s", "75", "must be a number > 0"),
        ("max_connections", 0, "must be an integer >= 1"),
        ("max_connections", 1.5, "must be an integer >= 1"),
        ("max_header_bytes", 100, "must be an integer >= 1024"),
        ("max_headers", 0, "must be an integer >= 1"),
        ("send_timeout_s", 0, "must be a number > 0"),
    ],
)
def test_bad_limit_values_name_the_field_and_the_value(key: str, value: object, rule: str) -> None:
    with pytest.raises(ConfigError) as err:
        server(**{key: value})
    assert str(err.value) == f"config: server.{key}: {rule}, got {value!r}"


def test_body_deadline_is_extended_one_second_per_min_rate_bytes() -> None:
    # mod_reqtimeout body=20,MinRate=500: 20 s, then +1 s for every 500 bytes received.
    assert body_deadline(100.0, 0, 20.0, 500.0) == 120.0
    assert body_deadline(100.0, 5000, 20.0, 500.0) == 130.0
    assert body_deadline(100.0, 10**9, 20.0, 0.0) == 120.0  # no rate: a fixed deadline


def request(version: tuple[int, int], *hosts: str) -> object:
    headers = CIMultiDict([("Host", h) for h in hosts])
    v = HttpVersion11 if version == (1, 1) else HttpVersion10
    return make_mocked_request("GET", "/", headers=headers, version=v)


@pytest.mark.parametrize(
    "host", ["api.example.com", "api.example.com:8080", "10.0.0.5:80", "[::1]:8080", "[::1]",
             "localhost:", "xn--bcher-kva.example"],
)
def test_valid_hosts_pass(host: str) -> None:
    assert host_problem(request((1, 1), host)) is None  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("hosts", "why"),
    [
        ((), "a Host header is required on HTTP/1.1"),
        (("",), "an empty Host header"),
        (("a", "b"), "more than one Host header"),
        (("api example.com",), "Host must be host[:port], with no space or user@"),
        (("user:pw@api.example.com",), "Host must be host[:port], with no space or user@"),
        (("api.example.com/x",), "Host must be host[:port], with no space or user@"),
        (("api.example.com:80:80",), "Host must be host[:port], with no space or user@"),
        (("[::1",), "Host must be host[:port], with no space or user@"),
    ],
)
def test_invalid_hosts_are_named(hosts: tuple[str, ...], why: str) -> None:
    assert host_problem(request((1, 1), *hosts)) == why  # type: ignore[arg-type]


def test_http10_may_omit_host_or_send_it_empty() -> None:
    assert host_problem(request((1, 0))) is None  # type: ignore[arg-type]
    assert host_problem(request((1, 0), "")) is None  # type: ignore[arg-type]
    assert host_problem(request((1, 0), "a b")) is not None  # type: ignore[arg-type]


def test_raw_answers_are_whole_openai_style_responses_that_close() -> None:
    raw = raw_answer(TooManyConnections("full", retry_after_s=1))
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 503 Service Unavailable"
    assert {"Connection: close", "Retry-After: 1", "Content-Type: application/json",
            f"Content-Length: {len(body)}"} <= set(lines[1:])
    assert json.loads(body) == {"error": {"message": "full", "type": "service_unavailable",
                                          "param": None, "code": "too_many_connections"}}
    assert raw_answer(HeaderTimeout("slow")).startswith(b"HTTP/1.1 408 Request Timeout\r\n")
