"""API keys at the edge: who the caller is, and which credential each replica gets instead.

Callers send ``Authorization: Bearer <key>`` (or ``x-api-key: <key>``, which some SDKs use).
A key is compared as a SHA-256 digest, with :func:`hmac.compare_digest`, against every key in
force, without stopping at a match: how long a wrong key takes says nothing about how much of
it is right, nor which key it came near. The key's ``name`` is the caller's tenant.

Guarantees:

- a key never appears in a message, a log line, a metric or a ``repr``;
- when auth is on (``auth.api_keys`` or ``auth.api_keys_file`` set), the caller's
  ``Authorization`` and ``x-api-key`` never reach a replica; ``auth.upstream_api_key`` (or the
  replica's own ``api_key``) is sent as ``Authorization: Bearer`` instead;
- :meth:`KeyRing.replace` swaps every key at once (live reload): a request sees the old ring
  or the new one, never a mix, and a bad keys file leaves the old ring in force.

Not guarded: ``/healthz``, ``/readyz`` (probes carry no key), ``/wait-for-drain`` (nor does a
``preStop`` hook) and ``/metrics`` (off the public port once the admin listener is set).
Admin handlers on the public port use :func:`denied` (a guard returning the 401 or None) or
:func:`require_key` (the same as a decorator).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Sequence

from aiohttp import web
from aiohttp.typedefs import Handler
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.config import ApiKey, AuthConfig, ReplicaConfig, read_keys_file
from proxy.config.auth import check_keys
from proxy.config.rules import ConfigError, _Problem
from proxy.core.errors import Unauthorized, error_body
from proxy.edge.keys import METRICS

Headers = list[tuple[str, str]]

#: The caller's credential headers: dropped toward replicas whenever auth is on.
CALLER_CREDENTIALS = frozenset({"authorization", "x-api-key"})

_MISSING = ("missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'")
_INVALID = "invalid API key"


def _digest(key: str) -> bytes:
    # surrogateescape: aiohttp decodes a header's non-UTF-8 bytes so; they must not raise.
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def presented_key(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> str | None:
    """The caller's key: a Bearer token in ``Authorization``, else ``x-api-key``."""
    authorization = headers.get("Authorization")
    if authorization is not None:
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() == "bearer" and token:
            return token
    return headers.get("x-api-key")


class KeyRing:
    """The caller keys in force and the credential each replica gets; one per application.

    Replaced whole by :meth:`replace`: its state is a few attributes assigned together, with
    no ``await`` in between, so the event loop never shows a request half of a rotation.
    """

    __slots__ = ("_default", "_digests", "_keys", "_per_replica", "_tenants", "enabled")

    def __init__(self, auth: AuthConfig, replicas: Sequence[ReplicaConfig] = (),
                 classes: tuple[str, ...] | None = None) -> None:
        self._per_replica: dict[str, Headers] = {}
        self.replace(auth, replicas, classes)

    def replace(self, auth: AuthConfig, replicas: Sequence[ReplicaConfig] | None = None,
                classes: tuple[str, ...] | None = None) -> None:
        """Put ``auth`` in force, re-reading ``auth.api_keys_file``; raises ConfigError (and
        changes nothing) if the file cannot be read or has a bad line, or (``classes``: the
        ``scheduling.classes`` in force) names a class that is not one of them.

        ``replicas`` rebuilds the per-replica ``api_key`` credentials; None keeps them (a
        reload that only touches ``auth``).
        """
        keys = auth.api_keys
        if auth.api_keys_file is not None:
            from_file = read_keys_file(auth.api_keys_file)
            if classes is not None:
                _check(auth, classes, from_file)
            keys = keys + from_file
        digests = tuple((_digest(k.key), k) for k in keys)
        default = _bearer(auth.upstream_api_key)
        if replicas is None:
            per_replica = self._per_replica
        else:
            per_replica = {r.name: _bearer(r.api_key) for r in replicas if r.api_key}
        # Everything computed first: a failure above leaves the ring as it was.
        self._digests = digests
        self._keys = keys
        self._tenants = tuple(sorted({key.name for key in keys}))
        self.enabled = auth.enabled
        self._per_replica = per_replica
        # None: the caller's headers go through untouched (auth off, no upstream key).
        self._default: Headers | None = default if default else ([] if auth.enabled else None)

    @property
    def tenants(self) -> tuple[str, ...]:
        """Every tenant a key names: the bounded values of the ``tenant`` label."""
        return self._tenants

    @property
    def keys(self) -> tuple[ApiKey, ...]:
        """Every key in force (inline, then the keys file's): their tenants' weights and
        bounds (proxy.edge.app builds the scheduler's TenantPolicy from them)."""
        return self._keys

    def lookup(self, presented: str) -> str | None:
        """The tenant whose key ``presented`` is, or None; in time independent of the key."""
        key = self.find(presented)
        return None if key is None else key.name

    def find(self, presented: str) -> ApiKey | None:
        """The key ``presented`` is, or None; in time independent of the key."""
        digest = _digest(presented)
        found: ApiKey | None = None
        # Every key is compared, match or not: the loop's length never depends on the guess.
        for known, key in self._digests:
            if hmac.compare_digest(digest, known) and found is None:
                found = key
        return found

    def authorize(self, headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> str | None:
        """The caller's tenant; None when auth is off. Raises :class:`Unauthorized`."""
        key = self.identify(headers)
        return None if key is None else key.name

    def identify(self, headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> ApiKey | None:
        """The caller's key (its tenant, class and weight); None when auth is off. Raises
        :class:`Unauthorized`."""
        if not self.enabled:
            return None
        presented = presented_key(headers)
        if presented is None:
            raise Unauthorized(_MISSING)
        key = self.find(presented)
        if key is None:
            raise Unauthorized(_INVALID)
        return key

    def upstream_headers(self, replica: str, headers: Headers) -> Headers:
        """``headers`` as replica ``replica`` gets them: the caller's credential replaced by
        the replica's (or dropped), or ``headers`` itself when there is nothing to do."""
        extra = self._per_replica.get(replica, self._default)
        if extra is None:
            return headers
        kept = [h for h in headers if h[0].lower() not in CALLER_CREDENTIALS]
        kept.extend(extra)
        return kept

    def __repr__(self) -> str:
        if not self.enabled:
            return "<KeyRing off>"
        return f"<KeyRing {len(self._digests)} keys, tenants: {', '.join(self._tenants)}>"


def _check(auth: AuthConfig, classes: tuple[str, ...], from_file: tuple[ApiKey, ...]) -> None:
    # The file read again may name a class the config does not have (it was edited since the
    # config was loaded): refused like a bad line, the ring in force stays.
    try:
        check_keys(auth, classes, from_file)
    except _Problem as problem:
        raise ConfigError(str(problem)) from None


def _bearer(key: str | None) -> Headers:
    return [("Authorization", f"Bearer {key}")] if key else []


def unauthorized_response(err: Unauthorized, request_id: str | None = None) -> web.Response:
    """The 401 every guarded path gives: OpenAI's body and a Bearer challenge (RFC 6750)."""
    headers = {"WWW-Authenticate": "Bearer"}
    if request_id is not None:
        headers["X-Request-Id"] = request_id
    return web.Response(status=err.status, body=json.dumps(error_body(err)).encode(),
                        content_type="application/json", headers=headers)


def denied(request: web.Request) -> web.Response | None:
    """The 401 for a request without a valid key (counted as ``unauthorized``), or None to
    let it in (a valid key, or auth off). For ``/admin/*`` on the public port: the admin
    module's guard can return this as it is. The app must hold :data:`AUTH` and ``METRICS``.
    """
    try:
        request.app[AUTH].authorize(request.headers)
    except Unauthorized as err:
        request.app[METRICS].rejected_request(err.reason or "unauthorized")
        return unauthorized_response(err)
    return None


def require_key(handler: Handler) -> Handler:
    """``handler`` behind :func:`denied`: the same guard as a decorator."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        answer = denied(request)
        return answer if answer is not None else await handler(request)

    return guarded


AUTH = web.AppKey("auth", KeyRing)
