"""Config parsing: defaults, a full round trip, env substitution, and one exact line per error."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from proxy.config import (
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
    config_to_dict,
    load_config,
    parse_config,
)

REPLICA = "replicas: [{name: vllm-0, url: 'http://127.0.0.1:8000', max_concurrency: 32}]\n"

FULL_YAML = """\
server:
  host: 127.0.0.1
  port: 0
  max_body_bytes: 1048576
  drain_timeout_s: 0
replicas:
  - name: vllm-0
    url: http://10.0.0.5:8000/
    max_concurrency: 32
  - name: sim.b:1
    max_concurrency: 8
    simulated: {max_batch: 8, profile: seed, time_scale: 0.01, prompt_ms_per_token: 0.5,
                default_max_tokens: 20}
  - name: sim-defaults
    max_concurrency: 1
    simulated: {}
queue: {max_size: 0, timeout_s: 3}
health: {path: /healthz, interval_s: 1.5, timeout_s: 0.5}
upstream: {connect_timeout_s: 2, read_timeout_s: 60, retries: 0,
           tls: {insecure_skip_verify: true}}
logging: {format: text, level: WARNING}
"""

FULL_CONFIG = Config(
    replicas=(
        ReplicaConfig(name="vllm-0", max_concurrency=32, url="http://10.0.0.5:8000"),
        ReplicaConfig(
            name="sim.b:1",
            max_concurrency=8,
            simulated=SimulatedConfig(
                max_batch=8,
                profile="seed",
                time_scale=0.01,
                prompt_ms_per_token=0.5,
                default_max_tokens=20,
            ),
        ),
        ReplicaConfig(name="sim-defaults", max_concurrency=1, simulated=SimulatedConfig()),
    ),
    server=ServerConfig(host="127.0.0.1", port=0, max_body_bytes=1048576, drain_timeout_s=0.0),
    queue=QueueConfig(max_size=0, timeout_s=3.0),
    health=HealthConfig(path="/healthz", interval_s=1.5, timeout_s=0.5),
    upstream=UpstreamConfig(connect_timeout_s=2.0, read_timeout_s=60.0, retries=0,
                            tls=TlsConfig(insecure_skip_verify=True)),
    logging=LoggingConfig(format="text", level="warning"),
)


def parse(text: str, env: dict[str, str] | None = None) -> Config:
    return parse_config(yaml.safe_load(text), "config.yaml", env={} if env is None else env)


def test_only_replicas_gives_every_default() -> None:
    assert parse(REPLICA) == Config(
        replicas=(ReplicaConfig(name="vllm-0", max_concurrency=32, url="http://127.0.0.1:8000"),),
        server=ServerConfig(
            host="0.0.0.0", port=8080, max_body_bytes=67108864, drain_timeout_s=30.0
        ),
        queue=QueueConfig(max_size=1000, timeout_s=30.0, max_bytes=268435456),
        health=HealthConfig(path="/health", interval_s=5.0, timeout_s=2.0),
        upstream=UpstreamConfig(connect_timeout_s=5.0, read_timeout_s=600.0, retries=2),
        logging=LoggingConfig(format="json", level="info"),
    )


def test_null_and_empty_sections_are_defaults() -> None:
    config = parse(REPLICA + "server:\nqueue: {}\nhealth: null\n")
    assert (config.server, config.queue, config.health) == (
        ServerConfig(),
        QueueConfig(),
        HealthConfig(),
    )
    # `simulated:` with nothing under it is a simulated replica with all defaults, not "no url".
    sim = parse("replicas: [{name: s, max_concurrency: 1, simulated: }]")
    assert sim.replicas[0].simulated == SimulatedConfig()


def test_full_file_through_load_config(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(FULL_YAML, encoding="utf-8")
    config = load_config(path, env={})
    assert config == FULL_CONFIG
    # Integers where a float belongs are accepted and stored as floats.
    assert isinstance(config.queue.timeout_s, float)
    assert isinstance(config.server.drain_timeout_s, float)


def test_config_is_frozen_and_slotted() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        FULL_CONFIG.server.port = 1  # type: ignore[misc]
    assert not hasattr(FULL_CONFIG.server, "__dict__")


def test_config_to_dict_round_trips_through_yaml() -> None:
    dumped = yaml.safe_dump(config_to_dict(FULL_CONFIG))
    assert parse(dumped) == FULL_CONFIG


def test_config_to_dict_shows_every_other_unset_key_as_null() -> None:
    """check-config prints every key there is, defaults filled in: an unset CA file too."""
    minimal = parse("replicas: [{name: a, url: 'http://127.0.0.1:9000', max_concurrency: 1}]")
    upstream = config_to_dict(minimal)["upstream"]
    assert isinstance(upstream, dict)
    assert upstream["tls"] == {"ca_file": None, "insecure_skip_verify": False}
    assert parse(yaml.safe_dump(config_to_dict(minimal))) == minimal


def test_config_to_dict_omits_unset_url_and_simulated() -> None:
    replicas = config_to_dict(FULL_CONFIG)["replicas"]
    assert replicas == [
        {"name": "vllm-0", "max_concurrency": 32, "url": "http://10.0.0.5:8000"},
        {
            "name": "sim.b:1",
            "max_concurrency": 8,
            "simulated": {
                "max_batch": 8,
                "profile": "seed",
                "time_scale": 0.01,
                "prompt_ms_per_token": 0.5,
                "default_max_tokens": 20,
                "kv_tokens": 0,
            },
        },
        {
            "name": "sim-defaults",
            "max_concurrency": 1,
            "simulated": {
                "max_batch": 32,
                "profile": "seed",
                "time_scale": 1.0,
                "prompt_ms_per_token": 0.0,
                "default_max_tokens": 100,
                "kv_tokens": 0,
            },
        },
    ]


# --- environment substitution ---------------------------------------------------------------


def test_env_whole_value_is_reread_as_a_yaml_scalar() -> None:
    config = parse(
        REPLICA + "server: {port: '${PORT}'}\nqueue: {timeout_s: '${T}'}",
        {"PORT": "9000", "T": "2.5"},
    )
    assert config.server.port == 9000
    assert config.queue.timeout_s == 2.5


def test_env_default_applies_when_unset_or_empty() -> None:
    text = REPLICA + "server: {port: '${PORT:-7000}', host: '${HOST:-::}'}"
    assert (parse(text).server.port, parse(text).server.host) == (7000, "::")
    assert parse(text, {"PORT": ""}).server.port == 7000
    assert parse(text, {"PORT": "7001", "HOST": "10.1.1.1"}).server == ServerConfig(
        host="10.1.1.1", port=7001
    )


def test_env_embedded_in_a_string_stays_a_string() -> None:
    text = (
        "replicas:\n"
        "  - {name: 'vllm-${IDX}', max_concurrency: 4, url: 'http://${HOST}:${PORT:-8000}/'}\n"
    )
    replica = parse(text, {"IDX": "0", "HOST": "gpu-1"}).replicas[0]
    assert (replica.name, replica.url) == ("vllm-0", "http://gpu-1:8000")


def test_env_text_cannot_add_structure() -> None:
    # A flow sequence in the variable is not a str/number/bool/null, so the text is kept.
    assert parse(REPLICA + "server: {host: '${H}'}", {"H": "[a,b]"}).server.host == "[a,b]"


def test_env_documented_edge_cases() -> None:
    text = REPLICA + "health: {path: '/$${X}/${}/${X}'}"
    assert parse(text, {"X": "x"}).health.path == "/$x/${}/x"
    # Quotes written into the variable keep a number-looking name a string.
    text = "replicas: [{name: '${N}', max_concurrency: 1, simulated: {}}]"
    assert parse(text, {"N": "'0'"}).replicas[0].name == "0"


def test_env_defaults_to_os_environ_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHGATE_TEST_PORT", "9123")
    data = yaml.safe_load(REPLICA + "server: {port: '${BATCHGATE_TEST_PORT}'}")
    assert parse_config(data).server.port == 9123


# --- errors: one exact line each ------------------------------------------------------------

_SIM = "replicas: [{name: s, max_concurrency: 1, simulated: {%s}}]\n"
_URL = "replicas: [{name: r, max_concurrency: 1, url: '%s'}]\n"
_URL_RULE = "must be an http:// or https:// URL with a host, e.g. http://10.0.0.5:8000"
_NAME_RULE = "must be 1 to 64 characters from A-Z a-z 0-9 _ . : -"

BAD_CONFIGS: list[tuple[str, str | bytes | None, str]] = [
    # The file itself.
    ("missing file", None, "cannot read config file: No such file or directory"),
    ("not utf-8", b"replicas: \xff\n", "not valid UTF-8 at byte 10: invalid start byte"),
    (
        "yaml bad indent",
        "server:\n  port: 80\n   host: x\n",
        "invalid YAML at line 3, column 8: mapping values are not allowed here",
    ),
    (
        "yaml unclosed quote",
        'replicas:\n  - name: a\n    url: "http://h\n',
        "invalid YAML at line 4, column 1: found unexpected end of stream"
        " (while scanning a quoted scalar at line 3)",
    ),
    ("yaml bad date", "replicas: 2024-13-01\n", "invalid YAML: month must be in 1..12"),
    (
        "self-referencing anchor",
        "replicas: &a [*a]\n",
        "the document refers to itself or nests too deeply",
    ),
    ("top level list", "- a\n- b\n", "top level must be a mapping, got ['a', 'b']"),
    ("top level scalar", "replicas\n", "top level must be a mapping, got 'replicas'"),
    # Structure and required keys.
    ("empty file", "", "replicas: required key is missing"),
    ("no replicas", "server: {port: 80}\n", "replicas: required key is missing"),
    ("empty replicas", "replicas: []\n",
     "replicas: must be a non-empty list of replicas (or set health.ready_without_replicas: "
     "true to wait for them), got []"),
    ("null replicas", "replicas:\n", "replicas: must be a non-empty list of replicas, got None"),
    (
        "replicas mapping",
        "replicas: {name: a}\n",
        "replicas: must be a non-empty list of replicas, got {'name': 'a'}",
    ),
    ("replica scalar", "replicas: [vllm-0]\n", "replicas[0]: must be a mapping, got 'vllm-0'"),
    ("section scalar", REPLICA + "server: 8080\n", "server: must be a mapping, got 8080"),
    (
        "missing name",
        "replicas: [{max_concurrency: 1, url: 'http://h'}]\n",
        "replicas[0].name: required key is missing",
    ),
    (
        "missing max_concurrency",
        "replicas: [{name: a, url: 'http://h'}]\n",
        "replicas[0].max_concurrency: required key is missing",
    ),
    # Unknown keys, at every level.
    (
        "unknown top-level key",
        REPLICA + "serverr: {}\n",
        "serverr: unknown key (allowed: replicas, server, queue, health, upstream, logging,"
        " auth, admin, discovery, scheduling)",
    ),
    (
        "unknown section key",
        REPLICA + "server: {prot: 8080}\n",
        "server.prot: unknown key (allowed: host, port, max_body_bytes, load_headers, "
        "drain_timeout_s, drain_quiet_s, header_timeout_s, body_timeout_s, min_body_rate, "
        "keepalive_timeout_s, max_connections, max_header_bytes, max_headers, send_timeout_s)",
    ),
    (
        "unknown replica key beats missing",
        "replicas: [{name: a, url: 'http://h', max_concurency: 1}]\n",
        "replicas[0].max_concurency: unknown key (allowed: name, max_concurrency, url, simulated,"
        " api_key, models, max_tokens_in_flight, adaptive)",
    ),
    (
        "unknown simulated key",
        _SIM % "maxbatch: 4",
        "replicas[0].simulated.maxbatch: unknown key (allowed: max_batch, profile, time_scale,"
        " prompt_ms_per_token, default_max_tokens, kv_tokens)",
    ),
    # Types.
    (
        "str for float",
        REPLICA + "queue: {timeout_s: abc}\n",
        "queue.timeout_s: must be a number > 0, got 'abc'",
    ),
    (
        "str for int",
        REPLICA + "server: {port: '8080'}\n",
        "server.port: must be an integer between 0 and 65535, got '8080'",
    ),
    (
        "bool for int",
        REPLICA + "server: {port: true}\n",
        "server.port: must be an integer between 0 and 65535, got True",
    ),
    (
        "bool for float",
        REPLICA + "queue: {timeout_s: yes}\n",
        "queue.timeout_s: must be a number > 0, got True",
    ),
    (
        "float for int",
        "replicas: [{name: a, url: 'http://h', max_concurrency: 2.5}]\n",
        "replicas[0].max_concurrency: must be an integer >= 1, got 2.5",
    ),
    (
        "whole float for int",
        _SIM % "max_batch: 4.0",
        "replicas[0].simulated.max_batch: must be an integer >= 1, got 4.0",
    ),
    (
        "infinite float",
        REPLICA + "upstream: {read_timeout_s: .inf}\n",
        "upstream.read_timeout_s: must be a finite number, got inf",
    ),
    # Ranges and choices.
    (
        "negative max_concurrency",
        "replicas: [{name: vllm-0, url: 'http://h', max_concurrency: -3}]\n",
        "replicas[0].max_concurrency: must be an integer >= 1, got -3",
    ),
    (
        "port too high",
        REPLICA + "server: {port: 70000}\n",
        "server.port: must be an integer between 0 and 65535, got 70000",
    ),
    (
        "negative max_size",
        REPLICA + "queue: {max_size: -1}\n",
        "queue.max_size: must be an integer >= 0, got -1",
    ),
    (
        "negative sse_heartbeat_s",
        REPLICA + "queue: {sse_heartbeat_s: -1}\n",
        "queue.sse_heartbeat_s: must be a number >= 0, got -1",
    ),
    (
        "fractional max_bytes",
        REPLICA + "queue: {max_bytes: 1.5}\n",
        "queue.max_bytes: must be an integer >= 0, got 1.5",
    ),
    (
        "zero timeout",
        REPLICA + "health: {timeout_s: 0}\n",
        "health.timeout_s: must be a number > 0, got 0",
    ),
    (
        "negative drain",
        REPLICA + "server: {drain_timeout_s: -0.5}\n",
        "server.drain_timeout_s: must be a number >= 0, got -0.5",
    ),
    (
        "negative retries",
        REPLICA + "upstream: {retries: -1}\n",
        "upstream.retries: must be an integer >= 0, got -1",
    ),
    (
        "zero time_scale",
        _SIM % "time_scale: 0",
        "replicas[0].simulated.time_scale: must be a number > 0, got 0",
    ),
    (
        "negative kv_tokens",
        _SIM % "kv_tokens: -1",
        "replicas[0].simulated.kv_tokens: must be an integer >= 0, got -1",
    ),
    (
        "unknown profile",
        _SIM % "profile: fast",
        "replicas[0].simulated.profile: must be one of seed, got 'fast'",
    ),
    (
        "bad log level",
        REPLICA + "logging: {level: verbose}\n",
        "logging.level: must be one of debug, info, warning, error, got 'verbose'",
    ),
    (
        "bad log format",
        REPLICA + "logging: {format: xml}\n",
        "logging.format: must be one of json, text, got 'xml'",
    ),
    (
        "relative health path",
        REPLICA + "health: {path: health}\n",
        "health.path: must be a path starting with '/', got 'health'",
    ),
    (
        "empty host",
        REPLICA + "server: {host: ''}\n",
        "server.host: must be a non-empty host or address, got ''",
    ),
    # Replica names.
    (
        "duplicate name",
        "replicas:\n"
        "  - {name: vllm-0, url: 'http://127.0.0.1:8000', max_concurrency: 1}\n"
        "  - {name: vllm-0, url: 'http://127.0.0.2:8000', max_concurrency: 1}\n",
        "replicas[1].name: duplicate replica name, got 'vllm-0'",
    ),
    (
        "name with space",
        "replicas: [{name: 'vllm 0', url: 'http://h', max_concurrency: 1}]\n",
        f"replicas[0].name: {_NAME_RULE}, got 'vllm 0'",
    ),
    (
        "name too long",
        f"replicas: [{{name: {'x' * 65}, url: 'http://h', max_concurrency: 1}}]\n",
        f"replicas[0].name: {_NAME_RULE}, got '{'x' * 65}'",
    ),
    (
        "name not a string",
        "replicas: [{name: 7, url: 'http://h', max_concurrency: 1}]\n",
        f"replicas[0].name: {_NAME_RULE}, got 7",
    ),
    # URLs, and url versus simulated.
    (
        "url without scheme",
        _URL % "localhost:8000",
        f"replicas[0].url: {_URL_RULE}, got 'localhost:8000'",
    ),
    ("url ftp", _URL % "ftp://x", f"replicas[0].url: {_URL_RULE}, got 'ftp://x'"),
    ("url without host", _URL % "http://", f"replicas[0].url: {_URL_RULE}, got 'http://'"),
    ("url bad ipv6", _URL % "http://[::1", f"replicas[0].url: {_URL_RULE}, got 'http://[::1'"),
    (
        "url port out of range",
        _URL % "http://h:99999",
        "replicas[0].url: must have a port between 1 and 65535 if it has one, got 'http://h:99999'",
    ),
    (
        "url with query",
        _URL % "http://h?x=1",
        "replicas[0].url: must not have a query or fragment, got 'http://h?x=1'",
    ),
    (
        "url with a path (the SDK habit)",
        _URL % "https://h:8443/v1",
        "replicas[0].url: must not have a path (the caller's path is forwarded as is),"
        " got 'https://h:8443/v1'",
    ),
    (
        "url with a deeper path",
        _URL % "http://h/api/v1/",
        "replicas[0].url: must not have a path (the caller's path is forwarded as is),"
        " got 'http://h/api/v1/'",
    ),
    (
        "missing ca_file",
        REPLICA + "upstream: {tls: {ca_file: /nonexistent/ca.pem}}\n",
        "upstream.tls.ca_file: cannot read CA file: No such file or directory,"
        " got '/nonexistent/ca.pem'",
    ),
    (
        "ca_file is a directory",
        REPLICA + "upstream: {tls: {ca_file: .}}\n",
        "upstream.tls.ca_file: cannot read CA file: Is a directory, got '.'",
    ),
    (
        "empty ca_file",
        REPLICA + "upstream: {tls: {ca_file: ''}}\n",
        "upstream.tls.ca_file: must be the path of a PEM file of CA certificates, got ''",
    ),
    (
        "insecure_skip_verify not a boolean",
        REPLICA + "upstream: {tls: {insecure_skip_verify: 'false'}}\n",
        "upstream.tls.insecure_skip_verify: must be true or false, got 'false'",
    ),
    (
        "unknown tls key",
        REPLICA + "upstream: {tls: {verify: false}}\n",
        "upstream.tls.verify: unknown key (allowed: ca_file, insecure_skip_verify)",
    ),
    (
        "url with credentials is not echoed",
        _URL % "http://user:s3cret@h",
        "replicas[0].url: must not contain credentials (user:password@)",
    ),
    (
        "url null",
        "replicas: [{name: r, max_concurrency: 1, url: null, simulated: {}}]\n",
        f"replicas[0].url: {_URL_RULE}, got None",
    ),
    (
        "both url and simulated",
        "replicas: [{name: r, max_concurrency: 1, url: 'http://h', simulated: {}}]\n",
        "replicas[0]: must set exactly one of url or simulated, got both",
    ),
    (
        "neither url nor simulated",
        "replicas: [{name: r, max_concurrency: 1}]\n",
        "replicas[0]: must set exactly one of url or simulated, got neither",
    ),
    # Environment.
    (
        "unset variable",
        REPLICA + "server: {port: '${PORT}'}\n",
        "server.port: environment variable PORT is not set",
    ),
    (
        "unset variable in a list",
        "replicas: [{name: r, max_concurrency: 1, url: 'http://${HOST}:8000'}]\n",
        "replicas[0].url: environment variable HOST is not set",
    ),
]


@pytest.mark.parametrize(
    ("content", "message"),
    [pytest.param(content, message, id=case) for case, content, message in BAD_CONFIGS],
)
def test_bad_config_is_one_exact_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: str | bytes | None, message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    if isinstance(content, str):
        Path("config.yaml").write_text(content, encoding="utf-8")
    elif isinstance(content, bytes):
        Path("config.yaml").write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        load_config("config.yaml", env={})
    text = str(caught.value)
    assert text == f"config.yaml: {message}"
    assert "\n" not in text
    assert "Traceback" not in text


def test_https_replica_and_tls_keys(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca_file = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca_file))
    config = parse(
        "replicas: [{name: r, max_concurrency: 1, url: 'https://vllm.internal:8443/'}]\n"
        f"upstream: {{tls: {{ca_file: '{ca_file}'}}}}\n"
    )
    assert config.replicas[0].url == "https://vllm.internal:8443"
    assert config.upstream.tls == TlsConfig(ca_file=str(ca_file), insecure_skip_verify=False)
    assert parse_config(yaml.safe_load(yaml.safe_dump(config_to_dict(config))), env={}) == config
    assert parse(REPLICA).upstream.tls == TlsConfig(ca_file=None, insecure_skip_verify=False)


def test_ca_file_that_is_not_pem_is_a_config_error(tmp_path: Path) -> None:
    bogus = tmp_path / "ca.pem"
    bogus.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    with pytest.raises(ConfigError) as caught:
        parse(REPLICA + f"upstream: {{tls: {{ca_file: '{bogus}'}}}}\n")
    text = str(caught.value)
    assert text.startswith("config.yaml: upstream.tls.ca_file: not a PEM file of CA certificates")
    assert text.endswith(f"got '{bogus}'") and "\n" not in text


def test_a_path_in_a_replica_url_is_refused_by_parse_config() -> None:
    data = {"replicas": [{"name": "r", "max_concurrency": 1, "url": "http://10.0.0.5:8000/v1"}]}
    with pytest.raises(ConfigError) as caught:
        parse_config(data, env={})
    assert str(caught.value) == (
        "config: replicas[0].url: must not have a path (the caller's path is forwarded as is),"
        " got 'http://10.0.0.5:8000/v1'"
    )


def test_unreadable_path_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path, env={})
    assert str(caught.value) == f"{tmp_path}: cannot read config file: Is a directory"


def test_parse_config_prefixes_the_source() -> None:
    with pytest.raises(ConfigError, match=r"^config: replicas: required key is missing$"):
        parse_config({}, env={})
    with pytest.raises(ConfigError, match=r"^env-test: replicas: required key is missing$"):
        parse_config(None, "env-test", env={})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("queue: {max_size: 0}", QueueConfig(max_size=0)),
        ("queue: {timeout_s: 3}", QueueConfig(timeout_s=3.0)),
        ("queue: {max_bytes: 0}", QueueConfig(max_bytes=0)),
        ("server: {port: 0}", ServerConfig(port=0)),
        ("logging: {level: DeBuG}", LoggingConfig(level="debug")),
        ("health: {path: /}", HealthConfig(path="/")),
    ],
)
def test_edge_values_accepted(text: str, expected: object) -> None:
    config = parse(REPLICA + text)
    section = text.split(":", 1)[0]
    assert getattr(config, section) == expected
