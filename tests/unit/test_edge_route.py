"""proxy.edge.route: a request's class, tenant, and (only when configured) its demand."""

from __future__ import annotations

import dataclasses

import pytest
from aiohttp.test_utils import make_mocked_request

from proxy.config import Config, DiscoveryConfig, ReplicaConfig, SchedulingConfig
from proxy.core.errors import BadRequest
from proxy.edge import route
from proxy.edge.route import Routing, request_class, request_tenant
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
    demand = routing.demand(BODY, e)
    assert demand is None and e.model == "chat" and e.prompt_chars is None
    assert routing.ticket(demand, 1, "", SchedulingConfig()) == route.Ticket(None, 1, "", 0)


def test_models_route_by_the_parsed_model_without_a_cost() -> None:
    routing = Routing(config(models=("chat",)))
    assert (routing.routed, routing.budgeted, routing.needs_demand) == (True, False, True)
    e = exchange()
    ticket = routing.ticket(routing.demand(BODY, e), 0, "t", SchedulingConfig())
    assert ticket == route.Ticket("chat", 0, "t", 0)
    assert e.model == "chat" and e.prompt_chars == 400


def test_a_token_budget_gives_a_cost_calibrated_by_usage() -> None:
    routing = Routing(config(max_tokens_in_flight=1000))
    e = exchange()
    demand = routing.demand(BODY, e)
    ticket = routing.ticket(demand, 2, "", SchedulingConfig())
    assert ticket == route.Ticket(None, 2, "", 100 + 10)  # 400 chars / 4, + max_tokens
    e.prompt_tokens = 200  # the replica said: 2 characters per token
    routing.learn(e)
    assert routing.ratio.value == 2.0
    assert routing.ticket(demand, 2, "", SchedulingConfig()).cost == 200 + 10
    # Without max_tokens: scheduling.default_max_tokens.
    bare = routing.demand(b'{"prompt": "abcd"}', exchange())
    assert routing.ticket(bare, 0, "", SchedulingConfig(default_max_tokens=7)).cost == 2 + 7


def test_discovery_entries_count_and_a_reload_reconfigures() -> None:
    entry = DiscoveryConfig(dns="vllm.local", port=8000, max_concurrency=1, name_prefix="v",
                            models="auto")
    routing = Routing(dataclasses.replace(config(), discovery=(entry,)))
    assert routing.routed
    routing.configure(config())
    assert not routing.needs_demand


SCHEDULING = SchedulingConfig(classes=("gold", "silver", "bronze"), default_class="silver",
                              tenant_header="X-Team")


@pytest.mark.parametrize(("headers", "key_class", "expected"), [
    ({}, None, (1, "silver")),
    ({}, "bronze", (2, "bronze")),
    ({"X-Batchgate-Class": "gold"}, "bronze", (0, "gold")),  # the header wins over the key
])
def test_the_class_header_then_the_keys_class_then_the_default(
    headers: dict[str, str], key_class: str | None, expected: tuple[int, str]
) -> None:
    request = make_mocked_request("POST", "/v1/completions", headers=headers)
    assert request_class(request, SCHEDULING, key_class) == expected


def test_an_unknown_class_is_a_400_naming_the_header_and_the_names() -> None:
    request = make_mocked_request("POST", "/", headers={"X-Batchgate-Class": "platinum"})
    with pytest.raises(BadRequest) as caught:
        request_class(request, SCHEDULING, None)
    assert caught.value.message == (
        "X-Batchgate-Class must be one of gold, silver, bronze, got 'platinum'")


def test_the_tenant_is_the_keys_name_else_the_header_else_one_for_all() -> None:
    e = exchange()
    named = make_mocked_request("POST", "/", headers={"X-Team": "search"})
    assert request_tenant(named, SCHEDULING, e) == "search"
    assert request_tenant(make_mocked_request("POST", "/"), SCHEDULING, e) == ""
    assert request_tenant(named, SchedulingConfig(), e) == ""  # no tenant_header: one tenant
    e.tenant = "team-a"  # auth on: the key's name, whatever the header says
    assert request_tenant(named, SCHEDULING, e) == "team-a"


def test_a_tenant_header_over_64_characters_is_a_400() -> None:
    request = make_mocked_request("POST", "/", headers={"X-Team": "t" * 65})
    with pytest.raises(BadRequest) as caught:
        request_tenant(request, SCHEDULING, exchange())
    assert "X-Team" in caught.value.message and "64" in caught.value.message
