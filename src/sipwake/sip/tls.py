"""TLS contexts for SIP over TLS (RFC 3261 26.2): one for listeners, one for clients."""

from __future__ import annotations

import ssl
from pathlib import Path


def server_context(cert_file: str | Path, key_file: str | Path) -> ssl.SSLContext:
    """A server context from a PEM chain and key; TLS 1.2 is the floor."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert_file), str(key_file))
    return ctx


def client_context(ca_file: str | Path | None = None, *, verify: bool = True) -> ssl.SSLContext:
    """A client context: the system trust store, or only ``ca_file`` when given."""
    ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx
