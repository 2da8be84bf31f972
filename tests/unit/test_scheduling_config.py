"""Issue 10's keys: replicas[].models and .max_tokens_in_flight (and discovery's), the
`scheduling` section, and the API keys' class, weight and max_queued (inline and keys file)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from proxy.config import (
    ApiKey,
    Config,
    ConfigError,
    SchedulingConfig,
    config_to_dict,
    parse_config,
    read_keys_file,
)

REPLICA = "replicas: [{name: r, url: 'http://127.0.0.1:8000', max_concurrency: 1%s}]\n"
ENTRY = ("discovery: [{dns: vllm.llm.svc.cluster.local, port: 8000, max_concurrency: 4, "
         "name_prefix: vllm%s}]\n")
KEY = "sk-0123456789abcdef"


def load(text: str) -> Config:
    return parse_config(yaml.safe_load(text), "config.yaml", env={})


def test_without_the_new_keys_batchgate_is_model_blind_with_three_classes() -> None:
    config = load(REPLICA % "")
    assert config.replicas[0].models is None
    assert config.replicas[0].max_tokens_in_flight is None
    assert config.scheduling == SchedulingConfig(
        classes=("interactive", "standard", "batch"), default_class="standard",
        tenant_header=None, default_max_tokens=256, max_queued_per_tenant=0)
    assert load(REPLICA % "" + "scheduling:\n").scheduling == SchedulingConfig()


def test_models_a_list_or_auto_and_a_token_budget() -> None:
    replica = load(REPLICA % ", models: [llama-3-70b, 'org/Embed v2'], "
                             "max_tokens_in_flight: 65536").replicas[0]
    assert replica.models == ("llama-3-70b", "org/Embed v2")
    assert replica.max_tokens_in_flight == 65536
    assert load(REPLICA % ", models: auto").replicas[0].models == "auto"


def test_discovery_entries_carry_models_and_a_budget_for_what_they_find() -> None:
    entry = load(ENTRY % ", models: auto, max_tokens_in_flight: 1000").discovery[0]
    assert (entry.models, entry.max_tokens_in_flight) == ("auto", 1000)
    entry = load(ENTRY % "").discovery[0]
    assert (entry.models, entry.max_tokens_in_flight) == (None, None)


def test_the_scheduling_section() -> None:
    config = load(REPLICA % "" + (
        "scheduling: {classes: [gold, silver], default_class: silver, tenant_header: X-Team,"
        " default_max_tokens: 512, max_queued_per_tenant: 100}\n"))
    assert config.scheduling == SchedulingConfig(("gold", "silver"), "silver", "X-Team", 512,
                                                 100)
    assert config.scheduling.class_index("silver") == 1
    assert config.scheduling.class_index("bronze") is None


def test_api_keys_carry_class_weight_and_max_queued() -> None:
    config = load(REPLICA % "" + (
        f"auth: {{api_keys: [{{name: web, key: {KEY}-w, class: interactive}},"
        f" {{name: etl, key: {KEY}-e, class: batch, weight: 0.5, max_queued: 10}},"
        f" {{name: etl, key: {KEY}-e2, weight: 0.5, max_queued: 10}}]}}\n"))
    assert [(k.name, k.klass, k.weight, k.max_queued) for k in config.auth.api_keys] == [
        ("web", "interactive", 1.0, None), ("etl", "batch", 0.5, 10), ("etl", None, 0.5, 10)]


def test_the_keys_file_carries_the_same_settings_after_the_key(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"web:{KEY}-w class=interactive\netl:{KEY}:e class=batch weight=2.5 "
                    "max_queued=7\nplain:" + KEY + "\n")
    assert read_keys_file(str(keys)) == (
        ApiKey("web", f"{KEY}-w", klass="interactive"),
        ApiKey("etl", f"{KEY}:e", klass="batch", weight=2.5, max_queued=7),
        ApiKey("plain", KEY))
    assert load(REPLICA % "" + f"auth: {{api_keys_file: '{keys}'}}\n").auth.enabled


def test_check_config_output_reads_back_to_the_same_config() -> None:
    config = load(REPLICA % ", models: [a, b], max_tokens_in_flight: 9" + ENTRY % ", models: auto"
                  + f"auth: {{api_keys: [{{name: t, key: {KEY}, class: batch, weight: 3}}]}}\n"
                  + "scheduling: {classes: [hi, batch], default_class: batch}\n")
    dumped = yaml.safe_load(yaml.safe_dump(config_to_dict(config)))
    assert dumped["replicas"][0]["models"] == ["a", "b"]
    assert dumped["auth"]["api_keys"][0]["class"] == "batch"  # the YAML key, not klass
    assert dumped["scheduling"]["classes"] == ["hi", "batch"]
    dumped["auth"]["api_keys"][0]["key"] = KEY  # check-config redacts it
    assert parse_config(dumped, env={}) == config


BAD = [
    ("models empty", REPLICA % ", models: []",
     "replicas[0].models: must be a non-empty list of model names or auto, got []"),
    ("models a string", REPLICA % ", models: llama",
     "replicas[0].models: must be a non-empty list of model names or auto, got 'llama'"),
    ("model not a string", REPLICA % ", models: [a, 3]",
     "replicas[0].models[1]: must be a model name of 1 to 256 printable ASCII characters, "
     "got 3"),
    ("model empty", REPLICA % ", models: ['']",
     "replicas[0].models[0]: must be a model name of 1 to 256 printable ASCII characters, "
     "got ''"),
    ("model duplicate", REPLICA % ", models: [a, b, a]",
     "replicas[0].models[2]: duplicate model name, got 'a'"),
    ("budget zero", REPLICA % ", max_tokens_in_flight: 0",
     "replicas[0].max_tokens_in_flight: must be an integer >= 1, got 0"),
    ("budget float", REPLICA % ", max_tokens_in_flight: 1.5",
     "replicas[0].max_tokens_in_flight: must be an integer >= 1, got 1.5"),
    ("discovery models", ENTRY % ", models: [x, x]",
     "discovery[0].models[1]: duplicate model name, got 'x'"),
    ("discovery budget", ENTRY % ", max_tokens_in_flight: true",
     "discovery[0].max_tokens_in_flight: must be an integer >= 1, got True"),
    ("classes empty", REPLICA % "" + "scheduling: {classes: []}\n",
     "scheduling.classes: must be a list of 1 to 16 class names, highest first, got []"),
    ("class duplicate", REPLICA % "" + "scheduling: {classes: [a, b, a], default_class: a}\n",
     "scheduling.classes[2]: duplicate class name, got 'a'"),
    ("class name", REPLICA % "" + "scheduling: {classes: ['a b'], default_class: a}\n",
     "scheduling.classes[0]: must be 1 to 64 characters from A-Z a-z 0-9 _ . -, got 'a b'"),
    ("default class not a class", REPLICA % "" + "scheduling: {classes: [hi, lo]}\n",
     "scheduling.default_class: must be one of scheduling.classes (hi, lo), got 'standard' "
     "(the default): set scheduling.default_class to one of them"),
    ("default class named, not a class",
     REPLICA % "" + "scheduling: {classes: [hi, lo], default_class: mid}\n",
     "scheduling.default_class: must be one of scheduling.classes (hi, lo), got 'mid'"),
    ("tenant header", REPLICA % "" + "scheduling: {tenant_header: 'X Team'}\n",
     "scheduling.tenant_header: must be a header name (1 to 64 characters, RFC 9110 token), "
     "got 'X Team'"),
    ("tenant header credential", REPLICA % "" + "scheduling: {tenant_header: Authorization}\n",
     "scheduling.tenant_header: must not be a credential header or X-Batchgate-Class, "
     "got 'Authorization'"),
    ("default max tokens", REPLICA % "" + "scheduling: {default_max_tokens: 0}\n",
     "scheduling.default_max_tokens: must be an integer >= 1, got 0"),
    ("per tenant bound", REPLICA % "" + "scheduling: {max_queued_per_tenant: -1}\n",
     "scheduling.max_queued_per_tenant: must be an integer >= 0, got -1"),
    ("key class", REPLICA % "" + f"auth: {{api_keys: [{{name: t, key: {KEY}, class: vip}}]}}\n",
     "auth.api_keys[0].class: must be one of scheduling.classes (interactive, standard, "
     "batch), got 'vip'"),
    ("key weight", REPLICA % "" + f"auth: {{api_keys: [{{name: t, key: {KEY}, weight: 0}}]}}\n",
     "auth.api_keys[0].weight: must be a number > 0, got 0"),
    ("key max_queued", REPLICA % ""
     + f"auth: {{api_keys: [{{name: t, key: {KEY}, max_queued: -2}}]}}\n",
     "auth.api_keys[0].max_queued: must be an integer >= 0, got -2"),
    ("one tenant two weights", REPLICA % "" + (
        f"auth: {{api_keys: [{{name: t, key: {KEY}}}, {{name: t, key: {KEY}2, weight: 2}}]}}\n"),
     "auth.api_keys[1]: keys named 't' are one tenant: they must have the same weight and "
     "max_queued"),
]


@pytest.mark.parametrize(("text", "message"), [pytest.param(t, m, id=i) for i, t, m in BAD])
def test_a_bad_key_is_one_line_naming_the_field(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(text)
    assert str(caught.value) == f"config.yaml: {message}"
    assert KEY not in str(caught.value)


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (f"t:{KEY} class=gold weight=x", "weight: must be a number > 0, got 'x'"),
        (f"t:{KEY} weight=-1", "weight: must be a number > 0, got -1.0"),
        (f"t:{KEY} weight=abc", "weight: must be a number > 0, got 'abc'"),
        (f"t:{KEY} max_queued=1.5", "max_queued: must be an integer >= 0, got '1.5'"),
        (f"t:{KEY} colour=red", "unknown setting 'colour' (allowed: class, weight, max_queued)"),
    ],
    ids=["class-then-bad-weight", "weight", "weight-text", "max-queued", "unknown"],
)
def test_a_bad_keys_file_setting_names_the_line_never_the_key(
    tmp_path: Path, line: str, problem: str
) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"ok:{'k' * 20}\n{line}\n")
    with pytest.raises(ConfigError) as caught:
        load(REPLICA % "" + f"auth: {{api_keys_file: '{keys}'}}\n")
    text = str(caught.value)
    assert text.startswith(f"config.yaml: auth.api_keys_file: {keys} line 2: ")
    assert problem in text
    assert KEY not in text


def test_a_keys_file_class_is_checked_against_the_classes(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"t:{KEY} class=gold\n")
    with pytest.raises(ConfigError) as caught:
        load(REPLICA % "" + f"auth: {{api_keys_file: '{keys}'}}\n")
    assert str(caught.value) == (
        f"config.yaml: auth.api_keys_file: {keys} key of 't': class: must be one of "
        "scheduling.classes (interactive, standard, batch), got 'gold'")
    config = load(REPLICA % "" + f"auth: {{api_keys_file: '{keys}'}}\n"
                  + "scheduling: {classes: [gold, standard]}\n")
    assert config.auth.enabled
