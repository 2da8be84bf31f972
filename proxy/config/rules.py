"""The rules every config field is checked by: one-line errors naming the field and the value.

A field's validator sits in its dataclass metadata (:func:`_field`), so the YAML key, its
default and its rule are written once, next to each other, in :mod:`proxy.config`.
"""

from __future__ import annotations

import math
import re
import ssl
from collections.abc import Callable
from dataclasses import MISSING, field, fields
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

class ConfigError(Exception):
    """The config cannot be used; `str(err)` is the whole one-line message."""


class _Problem(Exception):
    """A validation failure at a dotted path; parse_config adds the source prefix."""

    def __init__(self, path: str, text: str) -> None:
        super().__init__(f"{path}: {text}" if path else text)


def _bad(path: str, rule: str, value: object) -> _Problem:
    text = repr(value)
    # A whole mapping can be the bad value; keep the line readable in a terminal.
    return _Problem(path, f"{rule}, got {text if len(text) <= 80 else text[:77] + '...'}")


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


# A validator takes (value, dotted path) and returns the clean value or raises _Problem.
_Check = Callable[[object, str], Any]
_CHECK = "batchgate.check"  # dataclass field metadata key holding the field's validator
#: Field metadata: the field's YAML key, when that is no Python name (``class``).
_KEY = "batchgate.key"
_T = TypeVar("_T", bound="DataclassInstance")


def _field(default: object, check: _Check) -> Any:
    return field(default=default, metadata={_CHECK: check})


def yaml_key(f: Any) -> str:
    """The YAML key of dataclass field ``f``: its name, unless its metadata says otherwise."""
    return str(f.metadata.get(_KEY, f.name))


def _optional(check: _Check) -> _Check:
    """``check``, or None for an absent (or null) value: a key whose absence means "off"."""

    def optional(value: object, path: str) -> Any:
        return None if value is None else check(value, path)

    return optional


def _integer(low: int, high: float = math.inf) -> _Check:
    rule = f"must be an integer >= {low}"
    if high < math.inf:
        rule = f"must be an integer between {low} and {high}"

    def check(value: object, path: str) -> int:
        # bool is an int subclass; `port: yes` must not quietly become port 1.
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise _bad(path, rule, value)
        return value

    return check


def _number(low: float, *, inclusive: bool) -> _Check:
    rule = f"must be a number {'>=' if inclusive else '>'} {low:g}"

    def check(value: object, path: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _bad(path, rule, value)
        try:
            number = float(value)
        except OverflowError:  # an integer literal too large for a float
            number = math.inf
        if not math.isfinite(number):
            raise _bad(path, "must be a finite number", value)
        if number < low or (number == low and not inclusive):
            raise _bad(path, rule, value)
        return number

    return check


def _text(pattern: str, rule: str, *, fold_case: bool = False) -> _Check:
    regex = re.compile(pattern, re.IGNORECASE if fold_case else 0)

    def check(value: object, path: str) -> str:
        if isinstance(value, str) and regex.fullmatch(value):
            return value.lower() if fold_case else value
        raise _bad(path, rule, value)

    return check


def _choice(*allowed: str, fold_case: bool = False) -> _Check:
    pattern = "|".join(map(re.escape, allowed))
    return _text(pattern, f"must be one of {', '.join(allowed)}", fold_case=fold_case)


def _url(value: object, path: str) -> str:
    rule = "must be an http:// or https:// URL with a host, e.g. http://10.0.0.5:8000"
    if not isinstance(value, str) or re.search(r"\s", value):
        raise _bad(path, rule, value)
    try:
        parts = urlsplit(value)  # ValueError: a malformed [IPv6] host
    except ValueError:
        raise _bad(path, rule, value) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _bad(path, rule, value)
    try:
        port = parts.port  # ValueError: not a number in 0..65535
    except ValueError:
        port = 0
    if port == 0 or parts.netloc.endswith(":"):
        raise _bad(path, "must have a port between 1 and 65535 if it has one", value)
    if parts.username is not None:
        # Not echoed: the value holds a secret and this message goes to logs.
        raise _Problem(path, "must not contain credentials (user:password@)")
    if parts.query or parts.fragment:
        raise _bad(path, "must not have a query or fragment", value)
    if parts.path not in ("", "/"):
        # The caller's path (/v1/chat/completions) is forwarded as is: a base URL ending in
        # /v1, as the OpenAI SDKs want it, would send /v1/v1/chat/completions.
        raise _bad(path, "must not have a path (the caller's path is forwarded as is)", value)
    return value.rstrip("/")


def _boolean(value: object, path: str) -> bool:
    if not isinstance(value, bool):  # `yes`/`no` are YAML booleans already; "1" is not one
        raise _bad(path, "must be true or false", value)
    return value


def _ca_file(value: object, path: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise _bad(path, "must be the path of a PEM file of CA certificates", value)
    try:
        with open(value, "rb"):
            pass
    except OSError as err:
        raise _bad(path, f"cannot read CA file: {err.strerror or err}", value) from None
    try:
        # Loaded once here too, so a file that is not PEM fails at check-config, not serve.
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=value)
    except (ssl.SSLError, ValueError) as err:
        raise _bad(path, f"not a PEM file of CA certificates ({err})", value) from None
    return value


def _section(cls: type[_T]) -> Callable[[object, str], _T]:
    """A validator for a mapping onto dataclass `cls`.

    Each field is checked by the validator in its metadata or, when its default is itself a
    config dataclass, as a nested section. Fields without a default are required.
    """

    specs = fields(cls)
    required = [yaml_key(f) for f in specs if f.default is MISSING]
    runs = {yaml_key(f): f.metadata.get(_CHECK) or _section(type(f.default)) for f in specs}
    names = {yaml_key(f): f.name for f in specs}

    def check(value: object, path: str) -> _T:
        if value is None:  # `server:` with nothing under it means all defaults
            value = {}
        if not isinstance(value, dict):
            raise _bad(path, "must be a mapping" if path else "top level must be a mapping", value)
        # Unknown keys first: a typo in a required key should say "unknown", not "missing".
        for key in value:
            if key not in runs:
                raise _Problem(_join(path, key), f"unknown key (allowed: {', '.join(runs)})")
        for name in required:
            if name not in value:
                raise _Problem(_join(path, name), "required key is missing")
        return cls(**{names[key]: runs[key](item, _join(path, key))
                      for key, item in value.items()})

    return check


_POSITIVE = _number(0, inclusive=False)
_NON_NEGATIVE = _number(0, inclusive=True)
