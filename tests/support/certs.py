"""Throwaway X.509 material for TLS tests, made with the ``openssl`` CLI.

:func:`make_pki` writes into a directory: a test CA (``ca.crt``), a second CA nobody trusts
(``other-ca.crt``), server certificates signed by the test CA for ``127.0.0.1``/``localhost``
(``server.*``) and for another name only (``wrong.*``), one signed by the other CA
(``stranger.*``), and a client certificate (``client.crt``) whose key (``client.key``) is
encrypted with :data:`CLIENT_KEY_PASSWORD`.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

CLIENT_KEY_PASSWORD = "key-pass-9f3a1c"


def _openssl(directory: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)


def _ca(directory: Path, name: str) -> None:
    _openssl(directory, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.crt")  # fmt: skip


def _signed(directory: Path, name: str, ca: str, ext: str, *, key_password: str = "") -> None:
    key_args = ["-passout", f"pass:{key_password}"] if key_password else ["-nodes"]
    _openssl(directory, "req", "-newkey", "rsa:2048", *key_args, "-subj", f"/CN={name}",
             "-keyout", f"{name}.key", "-out", f"{name}.csr")  # fmt: skip
    (directory / f"{name}.ext").write_text(ext + "\n")
    _openssl(directory, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt",
             "-CAkey", f"{ca}.key", "-CAcreateserial", "-days", "2",
             "-extfile", f"{name}.ext", "-out", f"{name}.crt")  # fmt: skip


def make_pki(directory: Path) -> Path:
    """Write the certificates and keys described in the module docstring; returns ``directory``."""
    _ca(directory, "ca")
    _ca(directory, "other-ca")
    server = "subjectAltName=IP:127.0.0.1,DNS:localhost"
    _signed(directory, "server", "ca", server)
    _signed(directory, "wrong", "ca", "subjectAltName=DNS:wrong.example")
    _signed(directory, "stranger", "other-ca", server)
    _signed(
        directory, "client", "ca", "extendedKeyUsage=clientAuth", key_password=CLIENT_KEY_PASSWORD
    )
    return directory


def listener_config(
    directory: Path, server: str = "server", *, require_client: bool = False
) -> str:
    """mosquitto listener options serving ``server``'s certificate, trusting the test CA."""
    lines = [
        f"cafile {directory / 'ca.crt'}",
        f"certfile {directory / f'{server}.crt'}",
        f"keyfile {directory / f'{server}.key'}",
    ]
    if require_client:
        lines += ["require_certificate true", "use_identity_as_username false"]
    return "\n".join(lines) + "\n"
