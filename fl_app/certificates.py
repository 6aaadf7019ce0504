"""TLS certificates and SuperNode keys for a deployment: `python -m fl_app.certificates`.

    python -m fl_app.certificates ca DIR                       # DIR/ca.crt, DIR/ca.key
    python -m fl_app.certificates server DIR --host link.example.org [--host 10.0.0.5]
                                                               # DIR/server.pem, DIR/server.key
    python -m fl_app.certificates node-key DIR/hospital_a      # hospital_a (private), .pub

`ca` + `server` are for tests and small federations where the coordinator acts as its own
certificate authority; with a real CA, use its server certificate instead and give the
partners that CA's certificate. `node-key` makes the EC (SECP384R1) key pair a SuperNode
authenticates with, in the OpenSSH format `flower-supernode` and
`flwr supernode register` read. Written with `cryptography` (already a Flower dependency)
so that neither openssl nor ssh-keygen needs to be installed.
"""

import argparse
import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

DEFAULT_HOSTS = ("localhost", "127.0.0.1")
VALID_DAYS = 365


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _certificate(subject: str, key, issuer: x509.Name, signing_key, is_ca: bool,
                 hosts: tuple[str, ...] = ()) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if hosts:
        builder = builder.add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]),
                                        critical=False)
    return builder.sign(signing_key, hashes.SHA256())


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_ca(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate authority: (ca.crt, ca.key)."""
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fl_app federation CA")])
    cert = _certificate("fl_app federation CA", key, name, key, is_ca=True)
    crt_path, key_path = directory / "ca.crt", directory / "ca.key"
    _write(crt_path, cert.public_bytes(serialization.Encoding.PEM))
    _write(key_path, _private_pem(key), private=True)
    return crt_path, key_path


def make_server_certificate(directory: Path, hosts: tuple[str, ...]) -> tuple[Path, Path]:
    """The SuperLink's certificate for `hosts`, signed by directory/ca.{crt,key}:
    (server.pem, server.key)."""
    ca_cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    key = ec.generate_private_key(ec.SECP384R1())
    all_hosts = tuple(dict.fromkeys((*hosts, *DEFAULT_HOSTS)))  # in order, no repeats
    cert = _certificate(all_hosts[0], key, ca_cert.subject, ca_key, is_ca=False, hosts=all_hosts)
    crt_path, key_path = directory / "server.pem", directory / "server.key"
    _write(crt_path, cert.public_bytes(serialization.Encoding.PEM))
    _write(key_path, _private_pem(key), private=True)
    return crt_path, key_path


def make_node_key(path: Path) -> tuple[Path, Path]:
    """A SuperNode's key pair in OpenSSH format: (path, path.pub)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    public_path = path.with_name(path.name + ".pub")
    _write(path, private, private=True)
    _write(public_path, public + b"\n")
    return path, public_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m fl_app.certificates",
        description="TLS certificates for a SuperLink and authentication keys for SuperNodes "
        "(see docs/deployment.md).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    ca = commands.add_parser("ca", help="create a certificate authority: DIR/ca.crt, DIR/ca.key")
    ca.add_argument("directory", type=Path)
    server = commands.add_parser(
        "server", help="create the SuperLink's certificate, signed by DIR/ca.*: "
        "DIR/server.pem, DIR/server.key"
    )
    server.add_argument("directory", type=Path)
    server.add_argument(
        "--host", action="append", default=[],
        help="a DNS name or IP address SuperNodes use to reach the SuperLink (repeatable; "
        f"{', '.join(DEFAULT_HOSTS)} are always included)",
    )
    node = commands.add_parser(
        "node-key", help="create a SuperNode's authentication key pair: PATH and PATH.pub"
    )
    node.add_argument("path", type=Path)
    args = parser.parse_args(argv)
    if args.command == "ca":
        written = make_ca(args.directory)
    elif args.command == "server":
        if not (args.directory / "ca.crt").exists():
            parser.error(f"{args.directory / 'ca.crt'} not found: run the `ca` command first")
        written = make_server_certificate(args.directory, tuple(args.host))
    else:
        written = make_node_key(args.path)
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
