"""The ``auth`` section: caller API keys (inline or a keys file) and upstream credentials.

Keys are kept out of every ``repr`` and printed as :data:`REDACTED` by ``check-config``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from proxy.config.rules import (
    _CHECK,
    _KEY,
    ConfigError,
    _bad,
    _field,
    _integer,
    _number,
    _optional,
    _Problem,
    _section,
)

_SECRET = "batchgate.secret"  # field metadata: a credential, redacted by config_to_dict
_SECRET_TEXT = re.compile(r"[!-~]{1,4096}")  # what a Bearer token can carry, as typed
_SECRET_RULE = "must be 1 to 4096 printable ASCII characters without spaces"
_TENANT_TEXT = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # no ":", the keys file's separator
_TENANT_RULE = "must be 1 to 64 characters from A-Z a-z 0-9 _ . -"
#: The `tenant` of requests that carry no key (auth off); no key may be named so.
NO_TENANT = "none"
_RESERVED = f"'{NO_TENANT}' is reserved (the tenant of requests without a key)"
#: What check-config prints for a credential. Refused as one: output pasted back as a config
#: would otherwise make this public word a working key.
REDACTED = "<redacted>"
_PLACEHOLDER_KEY = "is check-config's placeholder for a hidden key, not a key"


def _secret(value: object, path: str, *, optional: bool = False) -> str | None:
    # Never echoed: the value is a credential and these messages go to logs.
    if value is None and optional:
        return None
    if not isinstance(value, str):
        # `key: ${K}` with K=0123 is re-read as a YAML number: say how to keep it text.
        raise _Problem(path, "must be a string (quote it, or quote the variable's value)")
    if not _SECRET_TEXT.fullmatch(value):
        raise _Problem(path, _SECRET_RULE)
    if value == REDACTED:
        raise _Problem(path, _PLACEHOLDER_KEY)
    return value


def _optional_secret(value: object, path: str) -> str | None:
    return _secret(value, path, optional=True)


def _tenant(value: object, path: str) -> str:
    if not isinstance(value, str) or not _TENANT_TEXT.fullmatch(value):
        raise _bad(path, _TENANT_RULE, value)
    if value == NO_TENANT:
        raise _Problem(path, _RESERVED)
    return value


#: A scheduling class's name (``scheduling.classes``, ``auth.api_keys[].class``).
CLASS_TEXT = _TENANT_TEXT
CLASS_RULE = _TENANT_RULE


def _class_name(value: object, path: str) -> str:
    if not isinstance(value, str) or not CLASS_TEXT.fullmatch(value):
        raise _bad(path, CLASS_RULE, value)
    return value


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A caller key; ``name`` is the caller's tenant (a metric label and log field).

    ``klass`` (YAML ``class``): the scheduling class of its requests when they send no
    ``X-Batchgate-Class`` (None: ``scheduling.default_class``); checked against
    ``scheduling.classes`` over the whole config (:func:`check_keys`). ``weight``: the
    tenant's share of dispatches within a class (deficit round-robin); ``max_queued``: how
    many of the tenant's requests may wait at once (None: ``scheduling.max_queued_per_tenant``;
    0: no bound). Keys that share a name are one tenant, so they must agree on both.
    """

    name: str = field(metadata={_CHECK: _tenant})
    key: str = field(repr=False, metadata={_CHECK: _secret, _SECRET: True})
    klass: str | None = field(default=None,
                              metadata={_CHECK: _optional(_class_name), _KEY: "class"})
    weight: float = _field(1.0, _number(0, inclusive=False))
    max_queued: int | None = _field(None, _optional(_integer(0)))


def check_keys(auth: AuthConfig, classes: tuple[str, ...],
               from_file: tuple[ApiKey, ...] = ()) -> None:
    """What one key cannot say alone: its class is one of ``classes``, and keys of one name
    (one tenant) agree on its weight and bound. ``from_file``: the keys read from
    ``auth.api_keys_file`` (named by their tenant: they have no index). Raises _Problem,
    never showing a key."""
    first: dict[str, ApiKey] = {}
    for i, key in enumerate(auth.api_keys + from_file):
        if i < len(auth.api_keys):
            at, class_at = f"auth.api_keys[{i}]", f"auth.api_keys[{i}].class"
        else:
            at = f"auth.api_keys_file: {auth.api_keys_file} key of {key.name!r}"
            class_at = f"{at}: class"
        if key.klass is not None and key.klass not in classes:
            raise _Problem(class_at, f"must be one of scheduling.classes "
                           f"({', '.join(classes)}), got {key.klass!r}")
        seen = first.setdefault(key.name, key)
        if (seen.weight, seen.max_queued) != (key.weight, key.max_queued):
            raise _Problem(at, f"keys named {key.name!r} are one tenant: they must have the "
                           "same weight and max_queued")


_API_KEY = _section(ApiKey)


def _api_keys(value: object, path: str) -> tuple[ApiKey, ...]:
    # No value is echoed here: a list of keys is all secret. `[]` is no key (check-config
    # prints it for the default).
    if not isinstance(value, list):
        raise _Problem(path, "must be a list of {name, key} mappings")
    keys: list[ApiKey] = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise _Problem(f"{path}[{i}]", "must be a mapping with name and key")
        key = _API_KEY(item, f"{path}[{i}]")
        # One key, one tenant: a key listed twice (under another name, or a copy-paste)
        # would make whose requests they are depend on the order of the list.
        for j, other in enumerate(keys):
            if other.key == key.key:
                raise _Problem(f"{path}[{i}].key", f"the same key as {path}[{j}]")
        keys.append(key)
    return tuple(keys)


def _read_keys(path: str, where: str) -> tuple[ApiKey, ...]:
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except OSError as err:
        raise _bad(where, f"cannot read keys file: {err.strerror or err}", path) from None
    except UnicodeDecodeError as err:
        raise _Problem(where, f"{path}: not valid UTF-8 at byte {err.start}") from None
    lines: list[tuple[int, ApiKey]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, colon, rest = (part.strip() for part in line.partition(":"))
        # `name:key class=batch weight=2 max_queued=10`: a key has no space, so what follows
        # the first one is the key's settings.
        key, *settings = rest.split() or [""]
        # Each message names the file and the line, never what the line holds.
        attributes: dict[str, object] = {}
        problem = None
        if not all("=" in s for s in settings):
            key = rest  # not settings: the key's own rule says what is wrong
        if not colon:
            problem = "expected name:key"
        elif not _TENANT_TEXT.fullmatch(name):
            problem = f"name {_TENANT_RULE}"
        elif name == NO_TENANT:
            problem = f"name {_RESERVED}"
        elif not _SECRET_TEXT.fullmatch(key):
            problem = f"key {_SECRET_RULE}"
        elif key == REDACTED:
            problem = f"key {_PLACEHOLDER_KEY}"
        else:
            for earlier, other in lines:
                if other.key == key:
                    problem = f"the same key as line {earlier}"
            for setting in settings:
                attribute, _, text = setting.partition("=")
                problem = problem or _file_setting(attribute, text, attributes)
        if problem is not None:
            raise _Problem(where, f"{path} line {number}: {problem}")
        lines.append((number, ApiKey(name, key, **attributes)))  # type: ignore[arg-type]
    return tuple(key for _, key in lines)


#: The settings a keys file line may carry after its key (``class=batch weight=2``).
_FILE_SETTINGS = {
    "class": ("klass", _class_name),
    "weight": ("weight", _number(0, inclusive=False)),
    "max_queued": ("max_queued", _integer(0)),
}


def _file_setting(attribute: str, text: str, into: dict[str, object]) -> str | None:
    """Parse one ``attribute=value`` of a keys file line into ``into``; the problem or None."""
    spec = _FILE_SETTINGS.get(attribute)
    if spec is None:
        return f"unknown setting {attribute[:32]!r} (allowed: {', '.join(_FILE_SETTINGS)})"
    name, check = spec
    value: object = text
    if attribute != "class":
        try:
            value = int(text) if attribute == "max_queued" else float(text)
        except ValueError:
            value = text
    try:
        into[name] = check(value, attribute)
    except _Problem as problem:
        return str(problem)
    return None


def read_keys_file(path: str) -> tuple[ApiKey, ...]:
    """The keys in ``auth.api_keys_file`` (``name:key`` lines, optionally followed by
    ``class=<name> weight=<number> max_queued=<n>``; ``#`` comments, blank lines).

    Read at load (so check-config finds a bad line) and again by the key ring on each reload.
    Raises ConfigError naming the file and line, never the key.
    """
    try:
        return _read_keys(path, "auth.api_keys_file")
    except _Problem as problem:
        raise ConfigError(str(problem)) from None


def _keys_file(value: object, path: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise _bad(path, "must be the path of a file of name:key lines", value)
    _read_keys(value, path)
    return value


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """Caller API keys (proxy.edge.auth) and the credentials sent to replicas instead."""

    api_keys: tuple[ApiKey, ...] = _field((), _api_keys)
    # One `name:key` per line; re-read on reload. Set (even to an empty file): auth is on.
    api_keys_file: str | None = _field(None, _keys_file)
    # Replaces the caller's Authorization toward every replica without its own `api_key`.
    upstream_api_key: str | None = field(
        default=None, repr=False,
        metadata={_CHECK: _optional_secret, _SECRET: True})

    @property
    def enabled(self) -> bool:
        """Callers must present a key: fail closed once either source is configured."""
        return bool(self.api_keys) or self.api_keys_file is not None


