"""Test certificates made with the ``openssl`` command line: a certificate authority and a
certificate it signs for 127.0.0.1 (subjectAltName IP:127.0.0.1), usable by a server and as a
client certificate. Each call makes a new CA, so two calls give two CAs that do not trust each
other (how a test shows a wrong CA refused)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from engine.local.redis_server import TlsConfig

_DAYS = "2"
_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
_LEAF_EXTENSIONS = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
"""


def _openssl(*args: str, cwd: Path) -> None:
    binary = shutil.which("openssl")
    assert binary is not None, "the openssl command line is needed to make test certificates"
    subprocess.run([binary, *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certificates(directory: Path, *, auth_clients: bool = False) -> TlsConfig:
    """A new CA in ``directory`` (ca.crt) and a certificate for 127.0.0.1 it signs
    (server.crt, server.key, the key readable by this user only)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    _openssl(
        "req", "-x509", *_KEY, "-keyout", "ca.key", "-out", "ca.crt", "-days", _DAYS,
        "-subj", "/CN=flashteam test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "req", *_KEY, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1",
        cwd=directory,
    )  # fmt: skip
    (directory / "leaf.cnf").write_text(_LEAF_EXTENSIONS)
    _openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.crt", "-days", _DAYS, "-extfile", "leaf.cnf",
        cwd=directory,
    )  # fmt: skip
    (directory / "server.key").chmod(0o600)
    return TlsConfig(
        ca=directory / "ca.crt",
        cert=directory / "server.crt",
        key=directory / "server.key",
        auth_clients=auth_clients,
    )
