"""The `auth` section and `replicas[].api_key`: defaults, the keys file, and errors that never
echo a key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from proxy.config import (
    ApiKey,
    AuthConfig,
    Config,
    ConfigError,
    config_to_dict,
    load_config,
    parse_config,
    read_keys_file,
)

REPLICA = "replicas: [{name: r, url: 'http://127.0.0.1:8000', max_concurrency: 1}]\n"
SECRET = "sk-very-secret-0123456789"
WITH_KEYS = (
    f"replicas: [{{name: r, url: 'http://h:1', max_concurrency: 1, api_key: k1-{SECRET}}}]\n"
    f"auth: {{upstream_api_key: k0-{SECRET}, api_keys: [{{name: a, key: {SECRET}}}]}}\n"
)


def load(text: str, env: dict[str, str] | None = None) -> Config:
    return parse_config(yaml.safe_load(text), "config.yaml", env=env or {})


def test_auth_defaults_to_off() -> None:
    config = load(REPLICA)
    assert config.auth == AuthConfig(api_keys=(), api_keys_file=None, upstream_api_key=None)
    assert not config.auth.enabled
    assert config.replicas[0].api_key is None
    # `auth:` with nothing under it is all defaults: still off.
    assert load(REPLICA + "auth:\n").auth == AuthConfig()
    assert not load(REPLICA + "auth: {api_keys: []}\n").auth.enabled


def test_api_keys_from_the_environment() -> None:
    config = load(REPLICA + 'auth: {api_keys: [{name: team-a, key: "${TEAM_A_KEY}"}]}\n',
                  env={"TEAM_A_KEY": SECRET})
    assert config.auth.api_keys == (ApiKey(name="team-a", key=SECRET),)
    assert config.auth.enabled


def test_upstream_keys_alone_do_not_turn_caller_auth_on() -> None:
    config = load("replicas: [{name: r, url: 'http://h:1', max_concurrency: 1, api_key: k1}]\n"
                  "auth: {upstream_api_key: k0}\n")
    assert config.replicas[0].api_key == "k1"
    assert config.auth.upstream_api_key == "k0"
    assert not config.auth.enabled


def test_no_key_in_any_repr() -> None:
    config = load(WITH_KEYS)
    assert SECRET not in repr(config)
    assert "name='a'" in repr(config)


def test_check_config_output_redacts_every_key() -> None:
    config = load(WITH_KEYS)
    dumped = yaml.safe_dump(config_to_dict(config))
    assert SECRET not in dumped
    data = yaml.safe_load(dumped)
    assert data["auth"]["api_keys"] == [
        {"name": "a", "key": "<redacted>", "class": None, "weight": 1.0, "max_queued": None}]
    assert data["auth"]["upstream_api_key"] == "<redacted>"
    assert data["replicas"][0]["api_key"] == "<redacted>"
    # Unset keys stay null, so the output still lists every key there is.
    assert yaml.safe_load(yaml.safe_dump(config_to_dict(load(REPLICA))))["auth"] == {
        "api_keys": [], "api_keys_file": None, "upstream_api_key": None}


def test_keys_file(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# team keys\n\nteam-a:ka-1\n  team-b : kb:with:colons  \nteam-a:ka-2\n")
    assert read_keys_file(str(keys)) == (
        ApiKey("team-a", "ka-1"), ApiKey("team-b", "kb:with:colons"), ApiKey("team-a", "ka-2"))
    config = load(REPLICA + f"auth: {{api_keys_file: '{keys}'}}\n")
    assert config.auth.api_keys_file == str(keys)
    assert config.auth.enabled


def test_an_empty_keys_file_keeps_auth_on(tmp_path: Path) -> None:
    """Fail closed: a keys file emptied by mistake locks everyone out, it never opens up."""
    keys = tmp_path / "keys"
    keys.write_text("# nobody yet\n")
    config = load(REPLICA + f"auth: {{api_keys_file: '{keys}'}}\n")
    assert config.auth.enabled and read_keys_file(str(keys)) == ()


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (f"team-a {SECRET}", "expected name:key"),
        (f":{SECRET}", "name must be 1 to 64 characters from A-Z a-z 0-9 _ . -"),
        (f"team a:{SECRET}", "name must be 1 to 64 characters from A-Z a-z 0-9 _ . -"),
        (f"none:{SECRET}", "name 'none' is reserved (the tenant of requests without a key)"),
        ("team-a:", "key must be 1 to 4096 printable ASCII characters without spaces"),
        (f"team-a:{SECRET} tail", "key must be 1 to 4096 printable ASCII characters without"
                                  " spaces"),
        (f"team-a:{SECRET}\u00e9", "key must be 1 to 4096 printable ASCII characters without"
                                   " spaces"),
        ("team-a:<redacted>", "key is check-config's placeholder for a hidden key, not a key"),
        (f"team-b:{'k' * 20}", "the same key as line 2"),
    ],
    ids=["no-colon", "no-name", "bad-name", "reserved", "empty-key", "space", "non-ascii",
         "placeholder", "duplicate"],
)
def test_a_bad_keys_file_line_names_file_and_line_never_the_key(
    tmp_path: Path, line: str, problem: str
) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"# header\nok:{'k' * 20}\n{line}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load(REPLICA + f"auth: {{api_keys_file: '{keys}'}}\n")
    text = str(caught.value)
    assert text == f"config.yaml: auth.api_keys_file: {keys} line 3: {problem}"
    assert SECRET not in text


def test_an_unreadable_keys_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(REPLICA + f"auth: {{api_keys_file: '{tmp_path / 'missing'}'}}\n")
    assert str(caught.value) == (
        f"config.yaml: auth.api_keys_file: cannot read keys file: No such file or directory,"
        f" got '{tmp_path / 'missing'}'")


BAD_AUTH = [
    (f"api_keys: {{a: {SECRET}}}", "auth.api_keys: must be a list of {name, key} mappings"),
    (f"api_keys: ['team-a:{SECRET}']",
     "auth.api_keys[0]: must be a mapping with name and key"),
    (f"api_keys: [{{key: {SECRET}}}]", "auth.api_keys[0].name: required key is missing"),
    ("api_keys: [{name: a}]", "auth.api_keys[0].key: required key is missing"),
    (f"api_keys: [{{name: a, key: {SECRET}, tenant: x}}]",
     "auth.api_keys[0].tenant: unknown key (allowed: name, key, class, weight, max_queued)"),
    (f"api_keys: [{{name: 'a b', key: {SECRET}}}]",
     "auth.api_keys[0].name: must be 1 to 64 characters from A-Z a-z 0-9 _ . -, got 'a b'"),
    (f"api_keys: [{{name: none, key: {SECRET}}}]",
     "auth.api_keys[0].name: 'none' is reserved (the tenant of requests without a key)"),
    (f"api_keys: [{{name: a, key: '{SECRET} x'}}]",
     "auth.api_keys[0].key: must be 1 to 4096 printable ASCII characters without spaces"),
    ("api_keys: [{name: a, key: <redacted>}]",
     "auth.api_keys[0].key: is check-config's placeholder for a hidden key, not a key"),
    ("upstream_api_key: <redacted>",
     "auth.upstream_api_key: is check-config's placeholder for a hidden key, not a key"),
    (f"api_keys: [{{name: a, key: {SECRET}}}, {{name: b, key: {SECRET}}}]",
     "auth.api_keys[1].key: the same key as auth.api_keys[0]"),
    ("api_keys: [{name: a, key: 12345678}]",
     "auth.api_keys[0].key: must be a string (quote it, or quote the variable's value)"),
    (f"upstream_api_key: '{SECRET} x'",
     "auth.upstream_api_key: must be 1 to 4096 printable ASCII characters without spaces"),
    ("api_keys_file: ''", "auth.api_keys_file: must be the path of a file of name:key lines,"
                          " got ''"),
    ("keys: []", "auth.keys: unknown key (allowed: api_keys, api_keys_file, upstream_api_key)"),
]


@pytest.mark.parametrize(("text", "message"), BAD_AUTH, ids=[m.split(":")[0] + str(i)
                                                              for i, (_, m) in enumerate(BAD_AUTH)])
def test_bad_auth_is_one_line_without_the_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(REPLICA + f"auth: {{{text}}}\n")
    assert str(caught.value) == f"config.yaml: {message}"
    assert SECRET not in str(caught.value)


def test_bad_replica_api_key_is_not_echoed() -> None:
    with pytest.raises(ConfigError) as caught:
        load(f"replicas: [{{name: r, url: 'http://h:1', max_concurrency: 1, api_key: '{SECRET} "
             "x'}]\n")
    assert str(caught.value) == ("config.yaml: replicas[0].api_key: must be 1 to 4096 printable"
                                 " ASCII characters without spaces")


def test_load_config_reads_the_keys_file_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("keys").write_text(f"a:{SECRET}\n")
    Path("config.yaml").write_text(REPLICA + "auth: {api_keys_file: keys}\n")
    assert load_config("config.yaml", env={}).auth.api_keys_file == "keys"
