"""Certificates and keys of a deployment: a CA, the SuperLink's certificate for its addresses, SuperNode key
pairs, all written with private keys mode 0600, and a refusal of private keys others can read (as ssh does).

Made with ``cryptography`` (already a Flower dependency) rather than an openssl script, so that the same
code runs in tests, in containers and on hosts without openssl.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from fedlora.config.errors import ConfigError

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"


def check_private(path: Path) -> None:
    """Refuse a private key that others can read or write (mode 0644, say): one line with the fix."""
    if path.is_file() and (mode := stat.S_IMODE(path.stat().st_mode)) & 0o077:
        raise ConfigError(f"{path} is a private key readable by others (mode {mode:04o}); chmod 600 {path}")


def make_certificates(folder: Path, *, hosts: Sequence[str] = ("127.0.0.1", "localhost"), nodes: int = 0) -> None:
    """A CA, a SuperLink certificate valid for ``hosts`` (IPs or DNS names) and ``nodes`` node key pairs.

    Writes ``ca.crt``/``ca.key``, ``server.pem``/``server.key`` and ``node-<i>``
    (OpenSSH ECDSA P-384 private key, the SuperNode's) with ``node-<i>.pub`` (its
    public key, registered on the SuperLink). Private keys are written mode 0600.
    Existing files are never overwritten.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    check_server_hosts(folder, hosts)
    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)

    def pem_key(key: ec.EllipticCurvePrivateKey, fmt=serialization.PrivateFormat.PKCS8) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())

    if not (folder / CA_CERT).exists():
        ca_key = ec.generate_private_key(ec.SECP384R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedlora CA")])
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(cert_sign=True), critical=True)  # it signs certificates, nothing else
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        _write(folder / CA_KEY, pem_key(ca_key), private=True)
        _write(folder / CA_CERT, ca_cert.public_bytes(serialization.Encoding.PEM))
    ca_key = serialization.load_pem_private_key((folder / CA_KEY).read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate((folder / CA_CERT).read_bytes())

    if not (folder / SERVER_CERT).exists():
        key = ec.generate_private_key(ec.SECP384R1())
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=365))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=False), critical=True)  # ECDHE key agreement, signatures
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        _write(folder / SERVER_KEY, pem_key(key), private=True)
        _write(folder / SERVER_CERT, cert.public_bytes(serialization.Encoding.PEM))

    for i in range(nodes):
        make_node_key(folder / f"node-{i}")


def _key_usage(*, cert_sign: bool):
    """KeyUsage of the CA (certificate and CRL signing) or of a TLS server (digital signature)."""
    from cryptography import x509

    return x509.KeyUsage(
        digital_signature=not cert_sign, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign, crl_sign=cert_sign,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip


def certificate_files(folder: Path, *, nodes: int = 0) -> dict[Path, bool]:
    """Every file ``make_certificates`` writes or keeps, and whether it exists already."""
    names = [CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY]
    names += [name for i in range(nodes) for name in (f"node-{i}", f"node-{i}.pub")]
    return {folder / name: (folder / name).exists() for name in names}


def check_server_hosts(folder: Path, hosts: Sequence[str]) -> None:
    """Refuse to keep a SuperLink certificate made for other hosts than ``hosts`` (it is never overwritten)."""
    held = server_hosts(folder)
    if held is not None and sorted(held) != sorted(hosts):
        raise ConfigError(
            f"{folder / SERVER_CERT} is for {held}, not {list(hosts)}; delete it and {SERVER_KEY} to make one "
            "for the new hosts (nodes keep trusting the same CA)"
        )


def server_hosts(folder: Path) -> list[str] | None:
    """The names and addresses the SuperLink certificate in ``folder`` is valid for (None: there is none)."""
    from cryptography import x509

    path = folder / SERVER_CERT
    if not path.is_file():
        return None
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(v) for v in names.get_values_for_type(x509.IPAddress)] + names.get_values_for_type(x509.DNSName)


def make_node_key(path: Path) -> Path:
    """An ECDSA P-384 key pair for SuperNode authentication: ``path`` (private) and ``path.pub``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if not path.exists():
        key = ec.generate_private_key(ec.SECP384R1())
        private = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        _write(path, private, private=True)
        _write(path.with_name(path.name + ".pub"), public + b"\n")
    return path


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


# -- the Flower command lines -----------------------------------------------------------
