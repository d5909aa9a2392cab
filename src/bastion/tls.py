"""TLS: telling a certificate that is not trusted apart from "nobody is listening".

httpx reports both as a ConnectError; the user needs different advice for each."""

from __future__ import annotations

import ssl


def verify_failure(exc: BaseException) -> str | None:
    """The TLS failure behind ``exc`` (certificate not trusted, wrong host name, protocol
    mismatch), or None if it is not one."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ssl.SSLCertVerificationError):
            return e.verify_message or str(e)
        if isinstance(e, ssl.SSLError):
            return e.reason or str(e)
        e = e.__cause__ or e.__context__
    text = str(exc)
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text or "WRONG_VERSION_NUMBER" in text:
        return text
    return None


def trust(cafile: str | None) -> ssl.SSLContext | bool:
    """What httpx should verify servers against: ``cafile`` (PEM) if given, else the system's CAs."""
    return ssl.create_default_context(cafile=cafile) if cafile else True
