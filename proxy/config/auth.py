"""The ``auth`` section: caller API keys (inline or a keys file) and upstream credentials.

Keys are kept out of every ``repr`` and printed as :data:`REDACTED` by ``check-config``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from proxy.config.rules import (
    _CHECK,
    ConfigError,
    _bad,
    _field,
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


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A caller key; ``name`` is the caller's tenant (a metric label and log field)."""

    name: str = field(metadata={_CHECK: _tenant})
    key: str = field(repr=False, metadata={_CHECK: _secret, _SECRET: True})


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
        name, colon, key = (part.strip() for part in line.partition(":"))
        # Each message names the file and the line, never what the line holds.
        problem = None
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
        if problem is not None:
            raise _Problem(where, f"{path} line {number}: {problem}")
        lines.append((number, ApiKey(name, key)))
    return tuple(key for _, key in lines)


def read_keys_file(path: str) -> tuple[ApiKey, ...]:
    """The keys in ``auth.api_keys_file`` (``name:key`` lines; ``#`` comments, blank lines).

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


