"""`replicas[].adaptive` and `discovery[].adaptive`: defaults, validation, round trip."""

from __future__ import annotations

import pytest
import yaml

from proxy.config import AdaptiveConfig, ConfigError, config_to_dict, parse_config

REPLICA = "replicas: [{name: a, url: 'http://10.0.0.1:8000', max_concurrency: %s%s}]\n"
ENTRY = ("discovery: [{dns: vllm.local, port: 8000, max_concurrency: %s, name_prefix: v%s}]\n")


def load(text: str) -> object:
    return parse_config(yaml.safe_load(text))


def test_off_by_default_and_on_with_the_issue_defaults() -> None:
    config = parse_config(yaml.safe_load(REPLICA % (8, "")))
    assert config.replicas[0].adaptive is None
    config = parse_config(yaml.safe_load(REPLICA % (8, ", adaptive: {}")))
    assert config.replicas[0].adaptive == AdaptiveConfig(min=4, max=128, interval_s=1.0)
    config = parse_config(yaml.safe_load(REPLICA % (8, ", adaptive: null")))
    assert config.replicas[0].adaptive is None


def test_given_keys_and_the_round_trip_of_check_config() -> None:
    text = REPLICA % (16, ", adaptive: {min: 1, max: 64, interval_s: 0.5}") + ENTRY % (
        4, ", adaptive: {min: 2}")
    config = parse_config(yaml.safe_load(text))
    assert config.replicas[0].adaptive == AdaptiveConfig(min=1, max=64, interval_s=0.5)
    assert config.discovery[0].adaptive == AdaptiveConfig(min=2, max=128, interval_s=1.0)
    assert parse_config(yaml.safe_load(yaml.safe_dump(config_to_dict(config)))) == config
    # A discovery entry without it prints `adaptive: null`, which reads back as off.
    plain = parse_config(yaml.safe_load(ENTRY % (4, "")))
    assert parse_config(yaml.safe_load(yaml.safe_dump(config_to_dict(plain)))) == plain


BAD = [
    (REPLICA % (8, ", adaptive: {min: 0}"),
     "config: replicas[0].adaptive.min: must be an integer >= 1, got 0"),
    (REPLICA % (8, ", adaptive: {min: 8, max: 4}"),
     "config: replicas[0].adaptive.max: must be >= adaptive.min (8), got 4"),
    (REPLICA % (8, ", adaptive: {interval_s: 0}"),
     "config: replicas[0].adaptive.interval_s: must be a number > 0, got 0"),
    (REPLICA % (8, ", adaptive: {interval_s: fast}"),
     "config: replicas[0].adaptive.interval_s: must be a number > 0, got 'fast'"),
    (REPLICA % (8, ", adaptive: {step: 2}"),
     "config: replicas[0].adaptive.step: unknown key (allowed: min, max, interval_s)"),
    (REPLICA % (8, ", adaptive: on"),
     "config: replicas[0].adaptive: must be a mapping, got True"),
    (REPLICA % (2, ", adaptive: {min: 4, max: 16}"),
     "config: replicas[0].max_concurrency: must be between adaptive.min and adaptive.max "
     "(4 to 16): it is the starting cap, got 2"),
    (REPLICA % (200, ", adaptive: {}"),
     "config: replicas[0].max_concurrency: must be between adaptive.min and adaptive.max "
     "(4 to 128): it is the starting cap, got 200"),
    (ENTRY % (200, ", adaptive: {max: 64}"),
     "config: discovery[0].max_concurrency: must be between adaptive.min and adaptive.max "
     "(4 to 64): it is the starting cap, got 200"),
]


@pytest.mark.parametrize(("text", "message"), BAD)
def test_bad_values_are_one_line_naming_the_field(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(text)
    assert str(caught.value) == message


def test_which_replicas_are_adaptive_file_and_discovery() -> None:
    from proxy.control.adaptive import adaptive_of

    config = parse_config(yaml.safe_load(
        "replicas:\n"
        "  - {name: a, url: 'http://10.0.0.1:8000', max_concurrency: 8, adaptive: {max: 16}}\n"
        "  - {name: b, url: 'http://10.0.0.2:8000', max_concurrency: 8}\n"
        "discovery:\n"
        "  - {dns: v.local, port: 80, max_concurrency: 8, name_prefix: v, adaptive: {min: 2}}\n"
        "  - {dns: w.local, port: 80, max_concurrency: 8, name_prefix: v-x}\n"))
    assert adaptive_of(config, "a") == AdaptiveConfig(max=16)
    assert adaptive_of(config, "b") is None
    assert adaptive_of(config, "v-10.0.0.7") == AdaptiveConfig(min=2)
    assert adaptive_of(config, "v-fd00::a") == AdaptiveConfig(min=2)
    # "v-x-10.0.0.7" is the second entry's (its prefix "v-x"), not the first's.
    assert adaptive_of(config, "v-x-10.0.0.7") is None
    assert adaptive_of(config, "nobody") is None
