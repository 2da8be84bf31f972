"""Load batchgate's YAML config once, at the edge, into frozen dataclasses.

Every failure is a `ConfigError` whose message is one line an operator can act on:

    <source>: <dotted.path[index]>: <what is wrong>, got <the bad value>

Each dataclass field carries its validator in its metadata, so YAML keys, defaults and
rules cannot drift apart. Environment placeholders (see `_expand`) are replaced after YAML
parsing, in string values only, so a variable's text cannot add keys or sections.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

import yaml

from proxy.config.adaptive import AdaptiveConfig, _adaptive, check_start
from proxy.config.auth import (
    _SECRET,
    REDACTED,
    AuthConfig,
    _optional_secret,
    _read_keys,
    check_keys,
)
from proxy.config.auth import (
    NO_TENANT as NO_TENANT,
)
from proxy.config.auth import (
    ApiKey as ApiKey,
)
from proxy.config.auth import (
    read_keys_file as read_keys_file,
)
from proxy.config.rules import (
    _CHECK,
    _NON_NEGATIVE,
    _POSITIVE,
    ConfigError,
    _bad,
    _boolean,
    _ca_file,
    _choice,
    _field,
    _integer,
    _join,
    _Problem,
    _section,
    _text,
    _url,
    yaml_key,
)
from proxy.config.scheduling import AUTO as AUTO
from proxy.config.scheduling import MODELS, TOKEN_BUDGET, SchedulingConfig, scheduling

__all__ = [
    "NO_TENANT",
    "REDACTED",
    "AdaptiveConfig",
    "AdminConfig",
    "ApiKey",
    "AuthConfig",
    "Config",
    "ConfigError",
    "DiscoveryConfig",
    "HealthConfig",
    "LiveConfig",
    "LoggingConfig",
    "QueueConfig",
    "ReplicaConfig",
    "SchedulingConfig",
    "ServerConfig",
    "SimulatedConfig",
    "TlsConfig",
    "UpstreamConfig",
    "config_to_dict",
    "load_config",
    "nameserver_address",
    "parse_config",
    "read_keys_file",
]



@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = _field("0.0.0.0", _text(r"\S+", "must be a non-empty host or address"))
    port: int = _field(8080, _integer(0, 65535))  # 0 asks the OS for a free port (tests)
    max_body_bytes: int = _field(64 * 1024 * 1024, _integer(1))
    # X-Batchgate-In-Flight, -Max-Concurrency, -Queue-Depth on every proxied answer: for a
    # gateway in front (proxy.core.load). GET /load answers the same whatever this says.
    load_headers: bool = _field(False, _boolean)
    drain_timeout_s: float = _field(30.0, _NON_NEGATIVE)
    # After SIGTERM (or GET /wait-for-drain): new requests are still served this long, with
    # Connection: close, while the pod is taken out of rotation (at most drain_timeout_s).
    drain_quiet_s: float = _field(5.0, _NON_NEGATIVE)
    # Limits on slow or hostile callers (proxy.edge.limits and .protocol; README "Hardening").
    # The whole request head (request line and headers) must arrive within this.
    header_timeout_s: float = _field(10.0, _POSITIVE)
    # The body must arrive within body_timeout_s of the end of the head, plus one second for
    # every min_body_rate bytes received (mod_reqtimeout's body=20,MinRate=500); 0: no extension.
    body_timeout_s: float = _field(20.0, _POSITIVE)
    min_body_rate: float = _field(500.0, _NON_NEGATIVE)
    keepalive_timeout_s: float = _field(75.0, _POSITIVE)  # idle time between two requests
    max_connections: int = _field(10_000, _integer(1))  # open caller connections; more: 503
    # The whole head; one line alone may be this long. 1 KiB floor: a real head never fits less.
    max_header_bytes: int = _field(64 * 1024, _integer(1024))
    max_headers: int = _field(100, _integer(1))
    # A caller that takes no byte of its answer for this long loses its slot (and the engine's
    # generation is aborted), whatever upstream.read_timeout_s says.
    send_timeout_s: float = _field(60.0, _POSITIVE)


@dataclass(frozen=True, slots=True)
class SimulatedConfig:
    """An in-process fake engine, so the proxy can be exercised without a GPU."""

    # Requests the engine runs at once; more wait inside the engine.
    max_batch: int = _field(32, _integer(1))
    profile: str = _field("seed", _choice("seed"))
    # Multiplies every simulated delay; tests use 0.01.
    time_scale: float = _field(1.0, _POSITIVE)
    prompt_ms_per_token: float = _field(0.0, _NON_NEGATIVE)
    default_max_tokens: int = _field(100, _integer(1))  # for requests without max_tokens
    # KV-cache budget in tokens (prompt + generated, summed over the batch); 0: unlimited.
    kv_tokens: int = _field(0, _integer(0))


_NAME_RULE = "must be 1 to 64 characters from A-Z a-z 0-9 _ . : -"


@dataclass(frozen=True, slots=True)
class ReplicaConfig:
    """One upstream engine; exactly one of `url` and `simulated` is set."""

    # Unique, and a Prometheus label value: hence the short, typeable alphabet.
    name: str = field(metadata={_CHECK: _text(r"[A-Za-z0-9_.:-]{1,64}", _NAME_RULE)})
    max_concurrency: int = field(metadata={_CHECK: _integer(1)})
    # Never ends in "/", so callers can append "/v1/..." directly.
    url: str | None = _field(None, _url)
    # `simulated:` with nothing under it is a simulated engine with all defaults.
    simulated: SimulatedConfig | None = field(
        default=None, metadata={_CHECK: _section(SimulatedConfig)}
    )
    # Sent to this replica as `Authorization: Bearer <api_key>`, instead of
    # auth.upstream_api_key (proxy.edge.auth); never in a repr, a log or check-config.
    api_key: str | None = field(default=None, repr=False,
                                metadata={_CHECK: _optional_secret, _SECRET: True})
    # The models it serves (a list, or `auto`: its GET /v1/models); None: model-blind.
    models: tuple[str, ...] | str | None = _field(None, MODELS)
    # Estimated tokens (prompt + max_tokens) it may hold at once; None: no token budget.
    max_tokens_in_flight: int | None = _field(None, TOKEN_BUDGET)
    # The cap follows the engine's load within [min, max] (proxy.control.adaptive); off if
    # absent. max_concurrency is then the starting cap.
    adaptive: AdaptiveConfig | None = field(default=None, metadata={_CHECK: _adaptive})


_REPLICA = _section(ReplicaConfig)


def _replicas(value: object, path: str) -> tuple[ReplicaConfig, ...]:
    # `[]` passes here: it is valid beside `discovery`, or with health.ready_without_replicas
    # (checked over the whole config, _config).
    if not isinstance(value, list):
        raise _bad(path, "must be a non-empty list of replicas", value)
    replicas: list[ReplicaConfig] = []
    for i, item in enumerate(value):
        replica = _REPLICA(item, f"{path}[{i}]")
        check_start(replica.max_concurrency, replica.adaptive, f"{path}[{i}]")
        if (replica.url is None) == (replica.simulated is None):
            which = "neither" if replica.url is None else "both"
            raise _Problem(f"{path}[{i}]", f"must set exactly one of url or simulated, got {which}")
        # Names become metric labels; two replicas sharing one would merge their series.
        if any(other.name == replica.name for other in replicas):
            raise _bad(f"{path}[{i}].name", "duplicate replica name", replica.name)
        replicas.append(replica)
    return tuple(replicas)


_HOST_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_DNS_NAME = re.compile(rf"(?=.{{1,254}}$){_HOST_LABEL}(?:\.{_HOST_LABEL})*\.?")
#: IPv6 is up to 39 characters; with "-" the replica name stays within its 64.
_PREFIX_RULE = "must be 1 to 24 characters from A-Z a-z 0-9 _ . -"


def _dns_name(value: object, path: str) -> str:
    if not isinstance(value, str) or not _DNS_NAME.fullmatch(value):
        raise _bad(path, "must be a DNS name, e.g. vllm-headless.llm.svc.cluster.local", value)
    return value


def _nameserver(value: object, path: str) -> tuple[str, int]:
    """``10.0.0.10``, ``127.0.0.1:5353``, ``fd00::a`` or ``[fd00::a]:5353`` -> (address, port)."""
    rule = "must be an IP address with an optional port, e.g. 127.0.0.1:5353 or [::1]:5353"
    if not isinstance(value, str):
        raise _bad(path, rule, value)
    host, port = value, 53
    bracketed = re.fullmatch(r"\[([^\]]+)\](?::(\d{1,5}))?", value)
    if bracketed:
        host, port = bracketed.group(1), int(bracketed.group(2) or 53)
    elif value.count(":") == 1:
        host, _, digits = value.partition(":")
        port = int(digits) if digits.isdigit() and len(digits) <= 5 else 0
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise _bad(path, rule, value) from None
    if not 1 <= port <= 65535:
        raise _bad(path, "must have a port between 1 and 65535 if it has one", value)
    return str(address), port


def _nameservers(value: object, path: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _bad(path, "must be a list of DNS servers, e.g. [127.0.0.1:5353]", value)
    for i, item in enumerate(value):
        _nameserver(item, f"{path}[{i}]")
    return tuple(value)


def nameserver_address(text: str) -> tuple[str, int]:
    """One validated ``discovery[].nameservers`` entry as (address, port)."""
    return _nameserver(text, "nameserver")


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    """Replicas found in DNS (proxy.control.discovery): every A and AAAA record of ``dns``,
    each a replica ``<name_prefix>-<address>`` at ``http://<address>:<port>``."""

    dns: str = field(metadata={_CHECK: _dns_name})
    port: int = field(metadata={_CHECK: _integer(1, 65535)})
    max_concurrency: int = field(metadata={_CHECK: _integer(1)})
    name_prefix: str = field(metadata={_CHECK: _text(r"[A-Za-z0-9_.-]{1,24}", _PREFIX_RULE)})
    interval_s: float = _field(5.0, _POSITIVE)
    # Empty: the system resolver (/etc/resolv.conf, with its search list).
    nameservers: tuple[str, ...] = _field((), _nameservers)
    # Inherited by every replica found (as replicas[].models, .max_tokens_in_flight).
    models: tuple[str, ...] | str | None = _field(None, MODELS)
    max_tokens_in_flight: int | None = _field(None, TOKEN_BUDGET)
    # As replicas[].adaptive, for every replica the entry finds.
    adaptive: AdaptiveConfig | None = field(default=None, metadata={_CHECK: _adaptive})


_DISCOVERY_ENTRY = _section(DiscoveryConfig)


def _discovery(value: object, path: str) -> tuple[DiscoveryConfig, ...]:
    if not isinstance(value, list):
        raise _bad(path, "must be a list of {dns, port, max_concurrency, name_prefix}", value)
    entries: list[DiscoveryConfig] = []
    for i, item in enumerate(value):
        entry = _DISCOVERY_ENTRY(item, f"{path}[{i}]")
        check_start(entry.max_concurrency, entry.adaptive, f"{path}[{i}]")
        # The prefix is what keeps two entries' replicas apart (same address, other port).
        if any(other.name_prefix == entry.name_prefix for other in entries):
            raise _bad(f"{path}[{i}].name_prefix", "duplicate name_prefix", entry.name_prefix)
        entries.append(entry)
    return tuple(entries)


@dataclass(frozen=True, slots=True)
class QueueConfig:
    max_size: int = _field(1000, _integer(0))  # 0: reject at once when every slot is taken
    timeout_s: float = _field(30.0, _POSITIVE)
    # The sum of the bodies of queued requests: memory stays bounded whatever callers send.
    max_bytes: int = _field(268435456, _integer(0))
    # A streaming request that has to wait gets its 200 at once and an SSE comment
    # `: queued position=N` this often (proxy.edge.heartbeat); 0: off.
    sse_heartbeat_s: float = _field(0.0, _NON_NEGATIVE)


def _probe_method(value: object, path: str) -> str:
    rule = "must be one of GET, HEAD, POST"
    if not isinstance(value, str) or value.upper() not in ("GET", "HEAD", "POST"):
        raise _bad(path, rule, value)
    return value.upper()


def _probe_body(value: object, path: str) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _bad(path, "must be a mapping (sent as JSON), e.g. {prompt: hi, max_tokens: 1}",
                   value)
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):  # a YAML date, a set, a NaN: not JSON
        raise _bad(path, "must hold only JSON values (strings, numbers, lists, mappings)",
                   value) from None
    return value


@dataclass(frozen=True, slots=True)
class HealthConfig:
    path: str = _field("/health", _text(r"/\S*", "must be a path starting with '/'"))
    interval_s: float = _field(5.0, _POSITIVE)
    timeout_s: float = _field(2.0, _POSITIVE)
    # Consecutive probes before a replica changes state (Kubernetes' failureThreshold and
    # successThreshold): one lost probe does not take half the capacity away.
    unhealthy_after: int = _field(3, _integer(1))
    healthy_after: int = _field(2, _integer(1))
    # False: a replica takes no work before its first passing probe (a sidecar's readiness).
    assume_healthy_at_start: bool = _field(True, _boolean)
    # A replica whose in-flight streams have all been silent this long is wedged.
    stall_s: float = _field(60.0, _POSITIVE)
    # A real probe (POST path with a JSON body) for engines whose /health says nothing.
    method: str = _field("GET", _probe_method)
    body: dict[str, Any] | None = field(default=None, metadata={_CHECK: _probe_body})
    # /readyz stays 200 with no healthy replica, and `replicas: []` is valid: a gateway that
    # holds requests while engines scale up from zero stays in its Service.
    ready_without_replicas: bool = _field(False, _boolean)


def _health(value: object, path: str) -> HealthConfig:
    health = _HEALTH_SECTION(value, path)
    if health.body is not None and health.method != "POST":
        raise _bad(_join(path, "body"), "needs method: POST (GET and HEAD carry no body)",
                   health.body)
    return health


_HEALTH_SECTION = _section(HealthConfig)


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """How ``https://`` replicas are verified (health probes included)."""

    # PEM bundle that replaces the system CAs for replicas (e.g. a cluster-internal CA).
    ca_file: str | None = _field(None, _ca_file)
    # Encrypt but verify nothing (no CA, no host name): for a lab, never for production.
    insecure_skip_verify: bool = _field(False, _boolean)


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    connect_timeout_s: float = _field(5.0, _POSITIVE)
    # The longest silence between two bytes from a replica, not a whole-response deadline.
    read_timeout_s: float = _field(600.0, _POSITIVE)
    retries: int = _field(2, _integer(0))
    tls: TlsConfig = TlsConfig()
    # Passive outlier ejection: this many consecutive real-request failures (connect,
    # timeout, reset, 5xx) eject a replica for eject_s, doubled on each repeat up to 300 s.
    eject_after: int = _field(5, _integer(1))
    eject_s: float = _field(10.0, _POSITIVE)
    # Never more than this share of the replicas ejected at once (0: ejection off).
    max_ejected_percent: int = _field(50, _integer(0, 100))


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    format: str = _field("json", _choice("json", "text"))
    # Stored lower-case whatever the file said, so callers compare without folding.
    level: str = _field("info", _choice("debug", "info", "warning", "error", fold_case=True))


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """The admin listener (proxy.edge.admin): /metrics, /admin/reload, /admin/replicas.

    Bound once at startup: neither key can change by a reload.
    """

    host: str = _field("127.0.0.1", _text(r"\S+", "must be a non-empty host or address"))
    port: int = _field(8081, _integer(0, 65535))  # 0 asks the OS for a free port (tests)


@dataclass(frozen=True, slots=True)
class Config:
    """The whole validated config. Build it with `load_config` or `parse_config`."""

    # Required unless `discovery` finds them (see _config).
    replicas: tuple[ReplicaConfig, ...] = _field((), _replicas)
    server: ServerConfig = ServerConfig()
    queue: QueueConfig = QueueConfig()
    health: HealthConfig = field(default=HealthConfig(), metadata={_CHECK: _health})
    upstream: UpstreamConfig = UpstreamConfig()
    logging: LoggingConfig = LoggingConfig()
    auth: AuthConfig = AuthConfig()  # noqa: RUF009 (a frozen dataclass, shared safely)
    # Absent: no admin listener (its endpoints are on the public port). `admin:` with
    # nothing under it is the listener on its defaults.
    admin: AdminConfig | None = field(default=None, metadata={_CHECK: _section(AdminConfig)})
    # Replicas found in DNS, beside or instead of `replicas`; they are not in `replicas`.
    discovery: tuple[DiscoveryConfig, ...] = _field((), _discovery)
    # Priority classes, tenants, the token estimate (proxy.config.scheduling).
    scheduling: SchedulingConfig = field(default=SchedulingConfig(), metadata={_CHECK: scheduling})


_CONFIG_SECTION = _section(Config)


def _config(value: object, path: str) -> Config:
    config = _CONFIG_SECTION(value, path)
    if (not config.replicas and not config.discovery
            and not config.health.ready_without_replicas):
        if isinstance(value, dict) and "replicas" in value:
            raise _bad("replicas", "must be a non-empty list of replicas (or set "
                       "health.ready_without_replicas: true to wait for them)",
                       value["replicas"])
        raise _Problem("replicas", "required key is missing")
    # A key's class must be a class: inline keys, and those of the keys file (read again).
    auth = config.auth
    check_keys(auth, config.scheduling.classes,
               () if auth.api_keys_file is None else _read_keys(auth.api_keys_file, "auth"))
    return config


_CONFIG = _config


class LiveConfig:
    """The config in force, swapped whole by a reload (:mod:`proxy.control.reload`).

    Code that reads config per request reads ``current`` each time and keeps no copy: a
    request sees either the old config or the new one, never a mix.
    """

    __slots__ = ("current",)

    def __init__(self, config: Config) -> None:
        self.current = config

    def __repr__(self) -> str:
        return f"<LiveConfig {len(self.current.replicas)} replicas>"


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read, parse and validate the file at `path`.

    Raises ConfigError, prefixed with `path` as given, when the file is missing or
    unreadable, is not UTF-8, is not valid YAML, or fails validation.
    """
    source = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except OSError as err:
        raise _error(source, f"cannot read config file: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise _error(source, f"not valid UTF-8 at byte {err.start}: {err.reason}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        message = f"invalid YAML{where}: {err.problem or err.context}"
        # For an unclosed quote or bracket the problem is at the end of the file; the
        # context line is where the operator has to look.
        if err.problem and err.context and err.context_mark:
            message += f" ({err.context} at line {err.context_mark.line + 1})"
        raise _error(source, message) from None
    # ValueError: PyYAML's constructors let it through, e.g. for the date 2024-13-01.
    except (yaml.YAMLError, ValueError) as err:
        raise _error(source, f"invalid YAML: {err}") from None
    return parse_config(data, source, env)


def parse_config(
    data: object, source: str = "config", env: Mapping[str, str] | None = None
) -> Config:
    """Validate an already-parsed YAML document; `source` prefixes every error message.

    `env` defaults to `os.environ`, read now rather than at import so tests can pass a dict.
    """
    try:
        return _CONFIG(_substitute(data, "", os.environ if env is None else env), "")
    except _Problem as problem:
        raise _error(source, str(problem)) from None
    except RecursionError:  # an anchor that contains its own alias: `a: &x [*x]`
        raise _error(source, "the document refers to itself or nests too deeply") from None


def config_to_dict(config: Config) -> dict[str, object]:
    """The effective config, defaults filled in, as plain data for `yaml.safe_dump`.

    A replica's unset `url`, `simulated` or `api_key` is left out, so the output parses back
    to an equal Config, except that every credential that is set reads "<redacted>".
    """
    return {
        f.name: _plain(getattr(config, f.name)) for f in fields(config)
        # `admin: null` would read back as the listener on its defaults: absent is absent.
        if not (f.name == "admin" and config.admin is None)
    }


def _plain(value: object) -> object:
    if isinstance(value, tuple):  # safe_dump refuses tuples
        return [_plain(item) for item in value]
    if is_dataclass(value):
        # check-config's output goes to terminals and CI logs: no credential in it.
        items = ((yaml_key(f), REDACTED if f.metadata.get(_SECRET) and getattr(value, f.name)
                  is not None else getattr(value, f.name)) for f in fields(value))
        # Only a replica's url/simulated pair (exactly one is set) and its optional api_key
        # are left out when unset; every other unset key is shown as null, so the output
        # lists every key there is.
        skip = isinstance(value, ReplicaConfig)
        return {name: _plain(item) for name, item in items if not (skip and item is None)}
    return value


def _error(source: str, text: str) -> ConfigError:
    # Log pipelines split on newlines; YAML and OS messages may contain them.
    return ConfigError(re.sub(r"\s*[\r\n]+\s*", " ", f"{source}: {text}").strip())


_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _substitute(node: object, path: str, env: Mapping[str, str]) -> object:
    """Return a copy of `node` with placeholders expanded in every string value (not keys)."""
    if isinstance(node, dict):
        return {key: _substitute(value, _join(path, key), env) for key, value in node.items()}
    if isinstance(node, list):
        return [_substitute(item, f"{path}[{i}]", env) for i, item in enumerate(node)]
    if isinstance(node, str):
        return _expand(node, path, env)
    return node


def _expand(text: str, path: str, env: Mapping[str, str]) -> object:
    """Replace `${VAR}` and `${VAR:-default}` in one string value.

    - `${VAR:-default}` uses `default` when VAR is unset or empty, as POSIX shells do;
      `${VAR}` with VAR unset is an error naming the field and the variable.
    - `default` cannot contain "}"; placeholders do not nest; substituted text is not
      scanned again. There is no escape: `$${X}` is a literal "$" then X's value, and
      anything that is not a well-formed placeholder (`$X`, `${}`, `${1X}`) stays as written.
    - A value that is exactly one placeholder is re-read as a YAML scalar, so
      `port: ${PORT}` gives an int. The quotes in `name: "${N}"` are gone by then, so N=0
      gives the int 0; write the quotes into the variable (N="'0'") to force a string.
    """

    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        value = env.get(name)
        if default is not None and not value:
            return default
        if value is None:
            raise _Problem(path, f"environment variable {name} is not set")
        return value

    result = _PLACEHOLDER.sub(replace, text)
    if not _PLACEHOLDER.fullmatch(text):
        return result
    try:
        scalar = yaml.safe_load(result)
    except (yaml.YAMLError, ValueError):
        return result
    return scalar if scalar is None or isinstance(scalar, str | int | float) else result
