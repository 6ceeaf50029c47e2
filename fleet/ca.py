"""The fleet's certificate authority: the broker's certificate, one client certificate
per broker identity, and the revocation list.

Everything is X.509 through ``cryptography``: an ECDSA P-256 CA (P-256 because the
secure elements and TPMs a camera might hold its key in all speak it), certificates
whose common name is the identity (the broker takes it as the user name and the
client id), and a CRL the broker rereads on SIGHUP. The CA's directory holds
``ca.key`` (mode 600; it never leaves the manager's host), ``ca.crt`` and ``crl.pem``.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge.core.errors import EdgeError
from edge.core.files import replace_file

CA_DAYS = 3650
CERT_DAYS = 825  # what browsers allow a server certificate; a camera gets a new bundle sooner or later
CA_KEY, CA_CERT, CRL = "ca.key", "ca.crt", "crl.pem"
PrivateKey = ec.EllipticCurvePrivateKey


class CAError(EdgeError):
    """The CA's files are missing, unreadable or not a CA."""


def new_key() -> PrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def write_private(path: Path, data: bytes) -> None:
    """``data`` to ``path`` (atomically), readable by its owner only."""
    replace_file(path, data, mode=0o600)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)


@dataclass
class FleetCA:
    """The CA in ``directory``: issues and revokes."""

    directory: Path
    key: PrivateKey
    cert: x509.Certificate

    @classmethod
    def open(cls, directory: Path, *, create: bool = False) -> "FleetCA":
        """The CA in ``directory``; with ``create``, made there if it is not (never overwritten)."""
        key_path, cert_path = directory / CA_KEY, directory / CA_CERT
        if not key_path.exists() and not cert_path.exists():
            if not create:
                raise CAError(f"no fleet CA in {directory} (`fleet broker config` makes one)")
            return cls._create(directory)
        try:
            if os.stat(key_path).st_mode & 0o077:
                raise CAError(f"{key_path} is readable by others; chmod 600 it")
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except (OSError, ValueError) as exc:
            raise CAError(f"the fleet CA in {directory} does not load: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
            raise CAError(f"{key_path} is not the key of {cert_path}")
        return cls(directory, key, cert)

    @classmethod
    def _create(cls, directory: Path) -> "FleetCA":
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        key = new_key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgecam fleet CA")])
        now = _now()
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=CA_DAYS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False, data_encipherment=False,
                                             key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        write_private(directory / CA_KEY, key_pem(key))
        replace_file(directory / CA_CERT, cert_pem(cert))
        ca = cls(directory, key, cert)
        ca.write_crl([])
        return ca

    @property
    def pem(self) -> bytes:
        return cert_pem(self.cert)

    def issue(self, name: str, key: PrivateKey, *, server_names: Iterable[str] = (),
              days: int = CERT_DAYS) -> x509.Certificate:
        """A certificate for ``name``: a client one (its CN is the identity), or with
        ``server_names`` the broker's (those DNS names and IP addresses as SANs)."""
        now = _now()
        server = list(server_names)
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .issuer_name(self.cert.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(min(now + datetime.timedelta(days=days), self.cert.not_valid_after_utc))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                                content_commitment=False, key_encipherment=False,
                                                data_encipherment=False, key_agreement=True, encipher_only=False,
                                                decipher_only=False), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                         else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                                  critical=False))
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName([_san(n) for n in server]), critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def write_crl(self, revoked: Iterable[tuple[str, float]]) -> Path:
        """The revocation list naming every ``(serial hex, revoked at)``, signed, as ``crl.pem``.

        Each list is dated after the last (a broker holding both prefers the newer one,
        by its last-update second), and valid as long as the CA: a list past its next
        update would make the broker refuse every client.
        """
        path = self.directory / CRL
        now = _now()
        try:
            previous = x509.load_pem_x509_crl(path.read_bytes()).last_update_utc
        except (OSError, ValueError):
            previous = None
        if previous is not None and datetime.timedelta(0) <= previous - now < datetime.timedelta(seconds=2):
            while _now() <= previous:  # a second revocation within the same second
                time.sleep(0.05)
            now = _now()
        builder = (x509.CertificateRevocationListBuilder().issuer_name(self.cert.subject)
                   .last_update(now).next_update(self.cert.not_valid_after_utc))
        for serial, at in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(int(serial, 16))
                .revocation_date(datetime.datetime.fromtimestamp(int(at), datetime.timezone.utc)).build())
        replace_file(path, builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
        return path


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def serial_hex(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")
