"""Certificates and SuperNode keys made by `python -m fl_app.certificates` are valid."""

import subprocess
import sys

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "fl_app.certificates", *args],
                          capture_output=True, text=True, timeout=60)


def test_server_certificate_is_signed_by_the_ca_for_its_hosts(tmp_path):
    assert run_cli("ca", str(tmp_path)).returncode == 0
    result = run_cli("server", str(tmp_path), "--host", "link.example.org", "--host", "10.1.2.3")
    assert result.returncode == 0, result.stderr
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(names.get_values_for_type(x509.DNSName)) == {"link.example.org", "localhost"}
    assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} == {"10.1.2.3", "127.0.0.1"}
    assert (tmp_path / "server.key").stat().st_mode & 0o077 == 0  # private keys: owner only


def test_server_certificate_needs_a_ca(tmp_path):
    result = run_cli("server", str(tmp_path))
    assert result.returncode != 0 and "run the `ca` command first" in result.stderr


def test_node_key_is_an_openssh_ec_pair(tmp_path):
    assert run_cli("node-key", str(tmp_path / "keys" / "lab")).returncode == 0
    private = load_ssh_private_key((tmp_path / "keys" / "lab").read_bytes(), None)
    public = load_ssh_public_key((tmp_path / "keys" / "lab.pub").read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.public_key().public_numbers() == public.public_numbers()
