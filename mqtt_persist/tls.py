"""TLS: the verifying context behind ``tls=True``, a helper for client certificates, and which
TLS failures retrying cannot fix.

``PersistentClient(..., tls=True)`` uses :func:`ssl.create_default_context`: the broker's
certificate must chain to a trusted CA (the system's) and name the host the client connects to
(the ``hostname`` argument, DNS name or IP address). ``tls=`` also takes a ready
:class:`ssl.SSLContext`, made by :func:`tls_context` or by hand, for a private CA, client
certificates, pinned ciphers or anything else the ssl module offers.

A certificate the client refuses (unknown CA, wrong host name, expired, ...) or a TLS alert by
which the broker refuses the client's certificate is not fixed by connecting again, so it stops
the client with :class:`~mqtt_persist.errors.TLSError` (raised by ``wait_connected()``, or by
entering the client with ``reconnect=False``) instead of feeding the reconnect loop: one
attempt, one clear error, no storm of handshakes against the broker. A TLS connection that
merely breaks (EOF, reset, a broker restarting mid-handshake) is an ordinary lost connection
and is retried with backoff.
"""

from __future__ import annotations

import ssl

from mqtt_persist.errors import InvalidInput, TLSError

__all__ = ["resolve_tls", "tls_context", "tls_failure"]


def tls_context(
    cafile: str | None = None,
    *,
    capath: str | None = None,
    certfile: str | None = None,
    keyfile: str | None = None,
    keyfile_password: str | bytes | None = None,
) -> ssl.SSLContext:
    """A verifying client context: :func:`ssl.create_default_context` trusting ``cafile`` /
    ``capath`` (None: the system's CAs), with the client certificate ``certfile`` (PEM, the
    chain after the certificate) and its private key ``keyfile`` (None: in ``certfile``),
    decrypted with ``keyfile_password`` if it is encrypted.

    The key and its password stay in the context (in OpenSSL's memory); the client never
    stores or logs them. Host name checking is on: the broker's certificate must name the
    ``hostname`` given to the client.
    """
    context = ssl.create_default_context(cafile=cafile, capath=capath)
    if certfile is not None:
        context.load_cert_chain(certfile, keyfile, keyfile_password)
    elif keyfile is not None:
        raise InvalidInput("keyfile without certfile: pass the client certificate too")
    return context


def resolve_tls(tls: ssl.SSLContext | bool | None) -> ssl.SSLContext | None:
    """The context the client connects with: ``True`` a new verifying default context,
    ``False``/None plain TCP, a context as given."""
    if tls is None or tls is False:
        return None
    if tls is True:
        return ssl.create_default_context()
    if isinstance(tls, ssl.SSLContext):
        return tls
    raise InvalidInput(f"tls must be True, False, None or an ssl.SSLContext, not {tls!r}")


#: SSL errors that say the connection broke, not that TLS refused it: retried as usual.
_TRANSIENT = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)


def tls_failure(exc: BaseException, where: str) -> TLSError | None:
    """The :class:`TLSError` for ``exc`` if it is a TLS failure retrying cannot fix, else None.

    ``where`` names the broker in the message: ``host:port``, or the ``wss://`` URL.
    """
    if not isinstance(exc, ssl.SSLError) or isinstance(exc, _TRANSIENT):
        return None
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = exc.verify_message or exc.reason or str(exc)
        return TLSError(
            f"TLS to {where} refused: the broker's certificate did not verify: {reason}",
            reason=reason,
            verify_code=exc.verify_code,
        )
    reason = exc.reason or str(exc)
    if "ALERT" in reason:
        text = f"the broker refused the TLS connection ({reason}; is a client certificate needed?)"
    else:
        text = f"the TLS handshake failed ({reason})"
    return TLSError(f"TLS to {where} refused: {text}", reason=reason)
