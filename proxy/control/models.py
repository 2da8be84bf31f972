"""What each replica serves: its configured ``models`` list, or (``models: auto``) the list its
``GET /v1/models`` answers, read with every health probe (proxy.control.health).

What always holds:

* a replica with ``models: auto`` serves no named model until its list is first read
  (``models_pending``): a request for a model nobody else serves waits for it (its deadline
  ends the wait) rather than being told 404 by a gateway that has not asked yet;
* a failed read (refused, a timeout, a 4xx or 5xx, not an OpenAI list) keeps the last list: a
  replica restarting does not make its model unknown for a probe interval;
* a model the replica starts serving is routed to it within one probe interval, and the
  waiters for it are granted at once (``Scheduler.set_models`` returns the grants, already
  told, as ``set_healthy`` does).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TypedDict

import aiohttp

from proxy.config import AUTO, DiscoveryConfig, ReplicaConfig

#: A replica's model list larger than this is not read (as proxy.edge.light's bound).
MODELS_MAX_BYTES = 8 * 1024 * 1024
#: At most this many ids are kept of one list: each may become a label value somewhere, and
#: no engine serves more (a LoRA server with thousands of adapters is not routed by name).
MAX_MODELS = 1024

Headers = list[tuple[str, str]]
#: The replica's credential for ``/v1/models`` (proxy.edge.auth.KeyRing.upstream_headers).
Credentials = Callable[[str, Headers], Headers]


class ReplicaRouting(TypedDict):
    """A replica's routing keys as :class:`proxy.core.replicas.Replica` takes them."""

    models: frozenset[str] | None
    models_pending: bool
    max_tokens: int | None


def replica_routing(entry: ReplicaConfig | DiscoveryConfig) -> ReplicaRouting:
    """``models`` and ``max_tokens_in_flight`` of a replica (or of a discovery entry, which
    its replicas inherit), as the scheduler takes them."""
    models = entry.models
    return ReplicaRouting(
        models=None if models is None or models == AUTO else frozenset(models),
        models_pending=models == AUTO,
        max_tokens=entry.max_tokens_in_flight,
    )


def model_ids(body: bytes) -> frozenset[str] | None:
    """The ids of an OpenAI model list (``{"data": [{"id": ...}, ...]}``), or None if the body
    is not one. At most :data:`MAX_MODELS` of them."""
    try:
        listing = json.loads(body)
    except (ValueError, RecursionError):
        return None
    data = listing.get("data") if isinstance(listing, dict) else None
    if not isinstance(data, list):
        return None
    ids = [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]
    return frozenset(ids[:MAX_MODELS])


async def read_models(
    session: aiohttp.ClientSession, url: str, headers: Headers, deadline: aiohttp.ClientTimeout
) -> frozenset[str] | None:
    """``GET <url>/v1/models``: the ids it lists, or None if it failed or is not a list."""
    try:
        async with session.get(url + "/v1/models", headers=headers, timeout=deadline) as answer:
            if not 200 <= answer.status < 300:
                return None
            if (answer.content_length or 0) > MODELS_MAX_BYTES:
                return None
            body = bytearray()
            async for chunk in answer.content.iter_any():
                body += chunk
                if len(body) > MODELS_MAX_BYTES:
                    return None
    except (aiohttp.ClientError, TimeoutError):
        return None
    return model_ids(bytes(body))
