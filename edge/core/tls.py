"""TLS to the broker: the client context, and what a refusal means in one line.

With TLS 1.3 a client finishes its handshake before the broker has judged its
certificate, so a broker that refuses it (revoked, expired, from another CA) simply
closes the connection before it answers CONNECT, and the client sees only an EOF.
:func:`refusal` turns that into a reason, checking locally what can be checked
(expiry, issuer) and naming what cannot (a revocation).
"""

from __future__ import annotations

import datetime
import re
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from .errors import ConfigError


def client_context(ca_file: str | None, cert_file: str | None = None, key_file: str | None = None) -> ssl.SSLContext:
    """A context that verifies the broker (against ``ca_file``, else the system's CAs) and
    presents ``cert_file`` if given; ConfigError naming the file that does not load."""
    try:
        context = ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"TLS CA file {ca_file}: {_why(exc)}") from None
    if cert_file:
        try:
            context.load_cert_chain(cert_file, key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"TLS client certificate {cert_file} (key {key_file or cert_file}): {_why(exc)}") from None
    return context


def refusal(ca_file: str | None, cert_file: str | None, error: str = "") -> str:
    """Why a broker most likely closed a TLS connection before answering CONNECT;
    ``error`` is what the read said (it carries the broker's TLS alert when one arrived)."""
    alert = re.search(r"ALERT_([A-Z_]+)", error)
    if not cert_file:
        return "the broker closed the connection before answering: it wants a client certificate"
    problem = certificate_problem(ca_file, cert_file)
    if problem:
        return f"the broker refused the client certificate: {problem}"
    if alert:
        return f"the broker refused the client certificate {cert_file}: {alert.group(1).lower().replace('_', ' ')}"
    return (f"the broker closed the connection before answering: it refused the client certificate {cert_file} "
            "(revoked, or issued by a CA it does not trust)")


def certificate_problem(ca_file: str | None, cert_file: str) -> str | None:
    """What is wrong with ``cert_file`` as far as can be told here: expired, not yet
    valid, or not issued by the CA in ``ca_file``; None if nothing is."""
    try:
        cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
    except (OSError, ValueError) as exc:
        return f"{cert_file} does not load: {exc}"
    now = datetime.datetime.now(datetime.timezone.utc)
    if cert.not_valid_after_utc < now:
        return f"{cert_file} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M}Z"
    if cert.not_valid_before_utc > now:
        return f"{cert_file} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M}Z (check the clock)"
    if ca_file:
        try:
            cas = x509.load_pem_x509_certificates(Path(ca_file).read_bytes())
        except (OSError, ValueError):
            return None
        if not any(_issued_by(cert, ca) for ca in cas):
            return f"{cert_file} was not issued by the CA in {ca_file}"
    return None


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
        return True
    except (InvalidSignature, ValueError, TypeError):  # another issuer, or another key type
        return False


def _why(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
