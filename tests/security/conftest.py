"""A throwaway PKI made at test time, and TLS-aware helpers for the security tests."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import pytest

from recsys import channels
from recsys.config import TLSSettings


@dataclass
class Pki:
    """PEM paths: a CA, a server cert for 127.0.0.1/localhost, clients good and rogue."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path

    def server_tls(self, mutual: bool) -> TLSSettings:
        return TLSSettings(
            cert_file=self.server_cert,
            key_file=self.server_key,
            ca_file=self.ca if mutual else None,
            require_client_cert=mutual,
        )

    def client_tls(self, with_cert: bool = True, rogue: bool = False) -> TLSSettings:
        if not with_cert:
            return TLSSettings(ca_file=self.ca)
        cert, key = (
            (self.rogue_cert, self.rogue_key) if rogue else (self.client_cert, self.client_key)
        )
        return TLSSettings(ca_file=self.ca, cert_file=cert, key_file=key)


def _issue(out: Path, name: str, subject_cn: str, issuer=None, *, ca: bool = False, server=False):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)])
    issuer_name, issuer_key = (subject, key) if issuer is None else (issuer[0].subject, issuer[1])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    cert = builder.sign(issuer_key, hashes.SHA256())
    cert_path, key_path = out / f"{name}.crt", out / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return (cert, key), cert_path, key_path


@pytest.fixture(scope="package")
def pki(tmp_path_factory) -> Pki:
    out = tmp_path_factory.mktemp("pki")
    ca, ca_path, _ = _issue(out, "ca", "recsys test CA", ca=True)
    _, server_cert, server_key = _issue(out, "server", "recsys server", ca, server=True)
    _, client_cert, client_key = _issue(out, "client", "ranking", ca)
    other_ca, _, _ = _issue(out, "other-ca", "someone else's CA", ca=True)
    _, rogue_cert, rogue_key = _issue(out, "rogue", "intruder", other_ca)
    return Pki(ca_path, server_cert, server_key, client_cert, client_key, rogue_cert, rogue_key)


async def wait_serving(
    address: str, service: str, tls: TLSSettings | None = None, timeout_s: float = 60.0
) -> None:
    """Polls ``Health/Check`` (over TLS when given) until SERVING."""
    await channels.wait_serving(address, service, tls=tls, timeout_s=timeout_s)
