"""The ``scheduling`` section and the routing keys of replicas: model lists, token budgets,
priority classes, the tenant header (issue 10; the policies live in :mod:`proxy.core`).

Without any of these keys batchgate is what it was: model-blind, one class, one tenant per
API key (or one in all without ``auth``), and no token budget.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from proxy.config.auth import CLASS_RULE, CLASS_TEXT, _class_name
from proxy.config.rules import _bad, _field, _integer, _join, _optional, _Problem, _section

#: ``models: auto``: the list is read from the replica's ``GET /v1/models`` (proxy.control.models).
AUTO = "auto"
#: At most this many classes: each is a label value of the queue series and a queue of its own.
MAX_CLASSES = 16
#: A model name as written in a list: what a request's ``model`` field can hold, bounded (it is
#: a label value of ``batchgate_queue_depth``).
_MODEL_TEXT = re.compile(r"[!-~](?:[ -~]{0,254}[!-~])?")
_MODEL_RULE = "must be a model name of 1 to 256 printable ASCII characters"
#: RFC 9110 token: a header field name.
_HEADER_TEXT = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")
#: Headers that cannot name a tenant: the caller's credentials (a tenant is a metric label and
#: a log field; a key must never become one) and the class header.
_NOT_TENANT_HEADERS = frozenset({"authorization", "x-api-key", "x-batchgate-class"})


def _models(value: object, path: str) -> tuple[str, ...] | str:
    """``[llama-3-70b, ...]`` (non-empty, no duplicates) or ``auto``."""
    if value == AUTO:
        return AUTO
    if not isinstance(value, list) or not value:
        raise _bad(path, "must be a non-empty list of model names or auto", value)
    names: list[str] = []
    for i, item in enumerate(value):
        if not isinstance(item, str) or not _MODEL_TEXT.fullmatch(item):
            raise _bad(f"{path}[{i}]", _MODEL_RULE, item)
        if item in names:
            raise _bad(f"{path}[{i}]", "duplicate model name", item)
        names.append(item)
    return tuple(names)


#: For ``replicas[].models`` and ``discovery[].models``: absent is model-blind.
MODELS = _optional(_models)
#: For ``replicas[].max_tokens_in_flight`` and ``discovery[]``'s: absent is no token budget.
TOKEN_BUDGET = _optional(_integer(1))


def _classes(value: object, path: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or len(value) > MAX_CLASSES:
        raise _bad(path, f"must be a list of 1 to {MAX_CLASSES} class names, highest first",
                   value)
    names: list[str] = []
    for i, item in enumerate(value):
        if not isinstance(item, str) or not CLASS_TEXT.fullmatch(item):
            raise _bad(f"{path}[{i}]", CLASS_RULE, item)
        if item in names:
            raise _bad(f"{path}[{i}]", "duplicate class name", item)
        names.append(item)
    return tuple(names)


def _header(value: object, path: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _HEADER_TEXT.fullmatch(value):
        raise _bad(path, "must be a header name (1 to 64 characters, RFC 9110 token)", value)
    if value.lower() in _NOT_TENANT_HEADERS:
        raise _bad(path, "must not be a credential header or X-Batchgate-Class", value)
    return value


@dataclass(frozen=True, slots=True)
class SchedulingConfig:
    """Priority classes, tenants and the token estimate (README "Scheduling")."""

    # Highest first: a waiter of a class is always dispatched before any of a later one.
    classes: tuple[str, ...] = _field(("interactive", "standard", "batch"), _classes)
    # The class of a request with neither X-Batchgate-Class nor a key's `class`.
    default_class: str = _field("standard", _class_name)
    # Without auth: the header whose value is the caller's tenant (absent: one tenant).
    tenant_header: str | None = _field(None, _header)
    # The completion allowance of a request without max_tokens (or max_completion_tokens),
    # in its token cost: the KV room an engine reserves for what it may generate.
    default_max_tokens: int = _field(256, _integer(1))
    # Waiting requests of one tenant at once (0: no bound but queue.max_size); an API key's
    # max_queued overrides it for its tenant.
    max_queued_per_tenant: int = _field(0, _integer(0))

    def class_index(self, name: str) -> int | None:
        """The class's rank (0 = highest), or None if it is not one of :attr:`classes`."""
        try:
            return self.classes.index(name)
        except ValueError:
            return None


_SECTION = _section(SchedulingConfig)


def scheduling(value: object, path: str) -> SchedulingConfig:
    """The section, with ``default_class`` checked against ``classes``."""
    section = _SECTION(value, path)
    if section.default_class not in section.classes:
        # Most often the default "standard" next to classes of one's own: say which to set.
        hint = "" if isinstance(value, dict) and "default_class" in value else \
            " (the default): set scheduling.default_class to one of them"
        raise _Problem(_join(path, "default_class"),
                       f"must be one of scheduling.classes ({', '.join(section.classes)}), "
                       f"got {section.default_class!r}{hint}")
    return section
