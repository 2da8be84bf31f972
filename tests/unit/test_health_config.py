"""The health and outlier keys of issue 8: defaults, accepted values, one exact line per error."""

from __future__ import annotations

import pytest
import yaml

from proxy.config import (
    ConfigError,
    HealthConfig,
    UpstreamConfig,
    config_to_dict,
    parse_config,
)

REPLICA = "replicas: [{name: r, url: 'http://127.0.0.1:8000', max_concurrency: 1}]\n"


def parse(text: str) -> object:
    return parse_config(yaml.safe_load(REPLICA + text), "config.yaml", env={})


def test_defaults() -> None:
    config = parse_config(yaml.safe_load(REPLICA), env={})
    h, u = config.health, config.upstream
    assert (h.unhealthy_after, h.healthy_after, h.assume_healthy_at_start) == (3, 2, True)
    assert (h.stall_s, h.method, h.body) == (60.0, "GET", None)
    assert (u.eject_after, u.eject_s, u.max_ejected_percent) == (5, 10.0, 50)


def test_every_key_set_and_round_tripped() -> None:
    config = parse_config(yaml.safe_load(REPLICA + """\
health: {unhealthy_after: 1, healthy_after: 4, assume_healthy_at_start: false, stall_s: 5,
         method: post, path: /v1/completions,
         body: {model: m, prompt: hi, max_tokens: 1, stop: [x], echo: false}}
upstream: {eject_after: 2, eject_s: 0.5, max_ejected_percent: 0}
"""), env={})
    assert config.health == HealthConfig(
        path="/v1/completions", unhealthy_after=1, healthy_after=4,
        assume_healthy_at_start=False, stall_s=5.0, method="POST",
        body={"model": "m", "prompt": "hi", "max_tokens": 1, "stop": ["x"], "echo": False},
    )
    assert config.upstream == UpstreamConfig(eject_after=2, eject_s=0.5, max_ejected_percent=0)
    again = parse_config(yaml.safe_load(yaml.safe_dump(config_to_dict(config))), env={})
    assert again == config


BAD = [
    ("health: {unhealthy_after: 0}", "health.unhealthy_after: must be an integer >= 1, got 0"),
    ("health: {healthy_after: 1.5}", "health.healthy_after: must be an integer >= 1, got 1.5"),
    ("health: {assume_healthy_at_start: 'no'}",
     "health.assume_healthy_at_start: must be true or false, got 'no'"),
    ("health: {stall_s: 0}", "health.stall_s: must be a number > 0, got 0"),
    ("health: {method: PUT}", "health.method: must be one of GET, HEAD, POST, got 'PUT'"),
    ("health: {method: POST, body: [1]}",
     "health.body: must be a mapping (sent as JSON), e.g. {prompt: hi, max_tokens: 1}, got [1]"),
    ("health: {method: POST, body: {when: 2024-01-01}}",
     "health.body: must hold only JSON values (strings, numbers, lists, mappings), "
     "got {'when': datetime.date(2024, 1, 1)}"),
    ("health: {body: {max_tokens: 1}}",
     "health.body: needs method: POST (GET and HEAD carry no body), got {'max_tokens': 1}"),
    ("upstream: {eject_after: 0}", "upstream.eject_after: must be an integer >= 1, got 0"),
    ("upstream: {eject_s: -1}", "upstream.eject_s: must be a number > 0, got -1"),
    ("upstream: {max_ejected_percent: 101}",
     "upstream.max_ejected_percent: must be an integer between 0 and 100, got 101"),
]


@pytest.mark.parametrize(("text", "message"), BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_bad_value_is_one_line_naming_the_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(text)
    assert str(caught.value) == f"config.yaml: {message}"
