"""TLS to replicas: one client context from ``upstream.tls``, shared by the pools and the probes.

What always holds: certificates are verified, against the system CAs or ``ca_file``, and the
host name is checked against the certificate, unless ``insecure_skip_verify`` says otherwise
(then a warning is logged at startup). The SNI name is the replica URL's host, passed by the
pool as ``server_hostname`` (Python sends no SNI for an IP address, and checks the
certificate's IP entries instead).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterable
from urllib.parse import urlsplit

from proxy.config import TlsConfig

log = logging.getLogger("batchgate")


def client_context(config: TlsConfig) -> ssl.SSLContext:
    """A client context for ``https://`` replicas.

    ``ca_file`` replaces the system CAs (like ``curl --cacert``): a private CA is trusted for
    replicas without trusting it for anything else, nor the public CAs for replicas. The file
    was checked when the config was parsed; a file removed since raises here, at startup.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=config.ca_file)
    if config.insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    # Replicas speak HTTP/1.1 only to us: offer nothing else in ALPN.
    context.set_alpn_protocols(["http/1.1"])
    return context


def context_for(config: TlsConfig, urls: Iterable[str]) -> ssl.SSLContext | None:
    """The shared context if any replica is ``https://``, else None (no CA store loaded)."""
    if not any(urlsplit(url).scheme == "https" for url in urls):
        return None
    if config.insecure_skip_verify:
        log.warning("upstream.tls.insecure_skip_verify is on: replica certificates are not "
                    "verified, so anyone on the path can impersonate a replica")
    return client_context(config)


def server_hostname(url: str) -> str | None:
    """The name to send as SNI and check the certificate against: the URL's host."""
    parts = urlsplit(url)
    return parts.hostname if parts.scheme == "https" else None
