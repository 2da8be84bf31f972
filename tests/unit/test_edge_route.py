"""proxy.edge.route: a request's class, tenant, and (only when configured) its demand."""

from __future__ import annotations

import dataclasses

import pytest
from aiohttp.test_utils import make_mocked_request

from proxy.config import Config, DiscoveryConfig, QueueConfig, ReplicaConfig, SchedulingConfig
from proxy.core.errors import BadRequest
from proxy.edge import route
from proxy.edge.route import Routing
from proxy.observe.exchange import Exchange

PLAIN = ReplicaConfig(name="r", url="http://10.0.0.1:8000", max_concurrency=1)
BODY = b'{"model": "chat", "prompt": "' + b"x" * 400 + b'", "max_tokens": 10}'


def exchange() -> Exchange:
    return Exchange(request_id="i", method="POST", path="/v1/completions",
                    route="/v1/completions", arrival=0.0, started=0.0)


def config(**replica: object) -> Config:
    return Config(replicas=(dataclasses.replace(PLAIN, **replica),))  # type: ignore[arg-type]


def test_without_models_or_budgets_the_body_is_never_parsed(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """The JSON hot path: the byte scan for the log, no json.loads."""
    def parse(_body: bytes) -> None:
        raise AssertionError("parsed although nothing needs it")

    monkeypatch.setattr(route, "parse_demand", parse)
    routing = Routing(config())
    e = exchange()
    assert routing.route(BODY, e) == (None, 0, False)
    assert e.model == "chat" and e.prompt_chars is None


def test_models_route_by_the_parsed_model_without_a_cost() -> None:
    routing = Routing(config(models=("chat",)))
    assert (routing.routed, routing.budgeted, routing.needs_demand) == (True, False, True)
    e = exchange()
    assert routing.route(BODY, e) == ("chat", 0, False)
    assert e.model == "chat" and e.prompt_chars == 400


def test_a_token_budget_gives_a_cost_calibrated_by_usage() -> None:
    routing = Routing(config(max_tokens_in_flight=1000))
    e = exchange()
    assert routing.route(BODY, e) == (None, 100 + 10, False)  # 400 chars / 4, + max_tokens
    e.prompt_tokens = 200  # the replica said: 2 characters per token
    routing.learn(e)
    assert routing.ratio.value == 2.0
    assert routing.route(BODY, exchange()) == (None, 200 + 10, False)
    # Without max_tokens: scheduling.default_max_tokens.
    small = Routing(dataclasses.replace(config(max_tokens_in_flight=1000),
                                        scheduling=SchedulingConfig(default_max_tokens=7)))
    assert small.route(b'{"prompt": "abcd", "stream": true}', exchange()) == (None, 1 + 7, True)


def test_discovery_entries_count_and_a_reload_reconfigures() -> None:
    entry = DiscoveryConfig(dns="vllm.local", port=8000, max_concurrency=1, name_prefix="v",
                            models="auto")
    routing = Routing(dataclasses.replace(config(), discovery=(entry,)))
    assert routing.routed
    routing.configure(config())
    assert not routing.needs_demand


def test_sse_heartbeats_need_the_stream_flag_so_the_body_is_parsed() -> None:
    heartbeat = dataclasses.replace(config(), queue=QueueConfig(sse_heartbeat_s=5.0))
    routing = Routing(heartbeat)
    assert routing.needs_demand and not routing.routed and not routing.budgeted
    assert routing.route(b'{"model": "m", "stream": true}', exchange()) == (None, 0, True)


SCHEDULING = SchedulingConfig(classes=("gold", "silver", "bronze"), default_class="silver",
                              tenant_header="X-Team")
ROUTING = Routing(dataclasses.replace(config(), scheduling=SCHEDULING))


@pytest.mark.parametrize(("headers", "key_class", "expected"), [
    ({}, None, (1, "silver")),
    ({}, "bronze", (2, "bronze")),
    ({"X-Batchgate-Class": "gold"}, "bronze", (0, "gold")),  # the header wins over the key
])
def test_the_class_header_then_the_keys_class_then_the_default(
    headers: dict[str, str], key_class: str | None, expected: tuple[int, str]
) -> None:
    request = make_mocked_request("POST", "/v1/completions", headers=headers)
    assert ROUTING.klass(request, key_class) == expected


def test_an_unknown_class_is_a_400_naming_the_header_and_the_names() -> None:
    request = make_mocked_request("POST", "/", headers={"X-Batchgate-Class": "platinum"})
    with pytest.raises(BadRequest) as caught:
        ROUTING.klass(request, None)
    assert caught.value.message == (
        "X-Batchgate-Class must be one of gold, silver, bronze, got 'platinum'")


def test_the_tenant_is_the_keys_name_else_the_header_else_one_for_all() -> None:
    e = exchange()
    named = make_mocked_request("POST", "/", headers={"X-Team": "search"})
    assert ROUTING.tenant(named, e) == "search"
    assert ROUTING.tenant(make_mocked_request("POST", "/"), e) == ""
    assert Routing(config()).tenant(named, e) == ""  # no tenant_header: one tenant
    e.tenant = "team-a"  # auth on: the key's name, whatever the header says
    assert ROUTING.tenant(named, e) == "team-a"


def test_a_tenant_header_over_64_characters_is_a_400() -> None:
    request = make_mocked_request("POST", "/", headers={"X-Team": "t" * 65})
    with pytest.raises(BadRequest) as caught:
        ROUTING.tenant(request, exchange())
    assert "X-Team" in caught.value.message and "64" in caught.value.message
