"""Deployment helpers: certificates and keys, and the Flower commands that start a federation.

Flower runs a deployment with three programs: ``flower-superlink`` (one, reachable by
every node), ``flower-supernode`` (one per client machine) and ``flwr`` (the user's
CLI, which submits runs). These helpers build their command lines with TLS and
SuperNode authentication always on; ``fedlora deploy ...`` prints and runs them, the
docker images run them, and the deployment tests start them. Nothing here
replaces Flower: it only fills in the flags.

Certificates are made with ``cryptography`` (already a Flower dependency) rather than
an openssl script, so that the same code runs in tests, in containers and on hosts
without openssl.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shlex
from collections.abc import Sequence
from pathlib import Path

from fedlora.config.groups import ConfigError

CONNECTION = "fedlora"  # the SuperLink connection's name in $FLWR_HOME/config.toml
SUPERLINK_PORT = 8000
SUPERNODE_PORT = 9094
CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"


# -- certificates and keys ---------------------------------------------------------------
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
def superlink_command(
    certs: Path, *, host: str = "127.0.0.1", port: int = SUPERLINK_PORT, database: Path | None = None
) -> list[str]:
    """``flower-superlink`` with TLS and SuperNode authentication; one port serves all its APIs.

    Runtime dependency installation is off: the SuperLink must never ``uv sync`` the
    app (that would pull CUDA torch); fedlora is installed on the machine instead.
    """
    argv = [
        "flower-superlink",
        "--ssl-ca-certfile", str(certs / CA_CERT),
        "--ssl-certfile", str(certs / SERVER_CERT),
        "--ssl-keyfile", str(certs / SERVER_KEY),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--host", host,
        "--port", str(port),
    ]  # fmt: skip
    if database is not None:
        argv += ["--database", str(database)]
    return argv


def supernode_command(
    *,
    superlink: str,
    ca: Path | None,
    key: Path,
    partition_id: int,
    num_partitions: int | None = None,
    data_path: str | None = None,
    port: int = SUPERNODE_PORT,
    max_retries: int | None = None,
) -> list[str]:
    """``flower-supernode`` verifying the SuperLink with ``ca`` and signing in with ``key``.

    Node config: ``partition-id`` (this client's id, 0..clients-1), ``num-partitions``
    (how many parts the data is split into; 1: ``data-path`` is all this node's) and
    ``data-path`` (this machine's data; default: the run's ``data.path``).
    ``max_retries``: give up after that many failed connection attempts (None: never).
    """
    node_config = [f"partition-id={partition_id}"]
    if num_partitions is not None:
        node_config.append(f"num-partitions={num_partitions}")
    if data_path:
        node_config.append(f"data-path={node_config_string(data_path)}")
    argv = ["flower-supernode", "--superlink", superlink]
    argv += ["--root-certificates", str(ca)] if ca is not None else []
    argv += ["--auth-supernode-private-key", str(key)]
    argv += ["--node-config", " ".join(node_config), "--port", str(port)]
    return argv + (["--max-retries", str(max_retries)] if max_retries is not None else [])


def node_config_string(value: str) -> str:
    """``value`` as a TOML string that Flower's ``--node-config`` parser reads back exactly.

    Flower matches ``'...'`` or ``"..."`` without escapes, then reads TOML: a plain value
    goes in ``"..."``; one with ``"`` or ``\\`` in a literal ``'...'`` (backslashes kept as
    they are); one with ``'`` and ``\\`` in ``"..."`` with TOML escapes. A value holding
    both quotes, or control characters, cannot be carried.
    """
    if any(ord(c) < 32 for c in value) or ("'" in value and '"' in value):
        raise ConfigError(
            f"--data-path {value!r}: Flower's node config cannot carry quotes of both kinds or control characters"
        )
    if '"' not in value and "\\" not in value:
        return f'"{value}"'
    if "'" not in value:
        return f"'{value}'"
    return '"' + value.replace("\\", "\\\\") + '"'


def register_command(public_key: Path, *, connection: str = CONNECTION) -> list[str]:
    """``flwr supernode register``: put a node's public key on the SuperLink's list."""
    return ["flwr", "supernode", "register", str(public_key), connection]


def run_command(run_config: Path | str, *, app: Path = Path("."), connection: str = CONNECTION, stream: bool = False):
    """``flwr run``: submit the App with a run config, a TOML file or ``key=value`` pairs (``config.app``)."""
    return ["flwr", "run", str(app), connection, "--run-config", str(run_config), *(["--stream"] if stream else [])]


def flwr_config_path(home: Path | None = None) -> Path:
    """``$FLWR_HOME/config.toml`` (default ~/.flwr/config.toml): where flwr keeps its SuperLink connections."""
    return (home or Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr")) / "config.toml"


def connection_config(superlink: str, *, ca: Path, name: str = CONNECTION, home: Path | None = None) -> dict:
    """flwr's config with the SuperLink connection ``name`` added or replaced (what :func:`write_connection` writes)."""
    import tomli

    path = flwr_config_path(home)
    config = tomli.loads(path.read_text()) if path.exists() else {}
    superlink_config = config.setdefault("superlink", {})
    superlink_config.setdefault("default", name)
    superlink_config[name] = {"address": superlink, "root-certificates": str(ca.resolve())}
    return config


def write_connection(superlink: str, *, ca: Path, name: str = CONNECTION, home: Path | None = None) -> Path:
    """Add (or replace) the SuperLink connection ``name`` in ``$FLWR_HOME/config.toml`` (default ~/.flwr)."""
    import tomli_w

    config = connection_config(superlink, ca=ca, name=name, home=home)
    path = flwr_config_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(config))
    return path


def run_config_arg(flat: dict) -> str:
    """A ``--run-config`` value holding ``flat``: space-separated ``key=value`` pairs, values in TOML."""
    import tomli_w

    return " ".join(f"{k}={tomli_w.dumps({'v': flat[k]})[4:].strip()}" for k in sorted(flat))


def write_run_config(flat: dict, path: Path) -> Path:
    """A ``--run-config`` TOML file (a file, not key=value pairs: values may hold spaces)."""
    import tomli_w

    path.write_text(tomli_w.dumps({k: flat[k] for k in sorted(flat)}))
    return path


def show(argv: Sequence[str]) -> str:
    return shlex.join(argv)
