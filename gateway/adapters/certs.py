"""A certificate authority and a server certificate for the broker's TLS listener.

`iotgw stack up` keeps them in `.stack/certs/`; the Compose deployment makes its own
with `iotgw certs`. The CA is made once and reused, so devices that trust `ca.crt`
keep trusting the broker when its server certificate is renewed.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.adapters.files import write_atomically
from gateway.errors import IotgwError

__all__ = ["CertFiles", "ensure_certificates"]

CA_DAYS = 3650
SERVER_DAYS = 825
# A server certificate this close to its end is made anew.
RENEW_BEFORE = dt.timedelta(days=30)


@dataclass(frozen=True)
class CertFiles:
    """The files of one certificate folder; the CA's key may live in a folder of its own,
    so that what mounts the certificates (a broker) cannot read it."""

    folder: Path
    key_folder: Path | None = None

    @property
    def ca_cert(self) -> Path:
        return self.folder / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return (self.key_folder or self.folder) / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.folder / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.folder / "server.key"


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "iotgw"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _load_ca(files: CertFiles) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
        key = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise IotgwError(
            f"the CA in {files.folder} cannot be read ({exc}): "
            "remove ca.crt and ca.key to make a new one (devices must then trust the new ca.crt)"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise IotgwError(f"{files.ca_key} is not an EC key made by iotgw")
    return cert, key


def _new_ca(files: CertFiles, now: dt.datetime) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name("iotgw local CA")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_atomically(files.ca_key, _key_pem(key))
    write_atomically(files.ca_cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _server_cert_current(files: CertFiles, hosts: list[str], now: dt.datetime) -> bool:
    """True when server.crt and server.key exist and belong together, the certificate is
    signed by this CA (not merely by one of the same name), names `hosts` and is not near
    its end."""
    if not (files.server_cert.exists() and files.server_key.exists()):
        return False
    try:
        cert = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
        ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
        key = serialization.load_pem_private_key(files.server_key.read_bytes(), password=None)
        cert.verify_directly_issued_by(ca)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return False
    listed = {str(n) for n in names.get_values_for_type(x509.DNSName)}
    listed |= {str(n) for n in names.get_values_for_type(x509.IPAddress)}
    return (
        key.public_key() == cert.public_key()
        and set(hosts) <= listed
        and cert.not_valid_after_utc - RENEW_BEFORE > now
    )


def _subject_names(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def ensure_certificates(
    folder: Path, hosts: list[str], *, key_folder: Path | None = None
) -> CertFiles:
    """Make the CA (once) and a server certificate for `hosts` (when missing, stale or expiring).

    Returns the files. Keys are readable by their owner only; certificates by everyone.
    """
    files = CertFiles(folder, key_folder)
    folder.mkdir(parents=True, exist_ok=True)
    files.ca_key.parent.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    if not files.ca_cert.exists() or not files.ca_key.exists():
        _new_ca(files, now)
    if _server_cert_current(files, hosts, now):
        return files
    ca_cert, ca_key = _load_ca(files)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName(_subject_names(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    write_atomically(files.server_key, _key_pem(key))
    write_atomically(files.server_cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return files
