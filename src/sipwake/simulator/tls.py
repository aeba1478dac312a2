"""The simulator's private PKI: a CA, a server certificate, client certificates and keys.

Everything is written as PEM files into the state directory so that users can point their
own staging at the simulator (``--ca-file``, ``--apns-key-file``, ``--apns-cert-dir``), and
is reused on the next start while still valid, so those paths stay stable across runs.
Private key files are created mode 0600. Every provider simulator (APNs now, FCM and Web
Push later) shares this one CA and server certificate.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sipwake.clock import Clock, SystemClock

CA_NAME = "sipwake simulator CA"
# Certificates are renewed when they would expire within this margin.
RENEW_MARGIN = dt.timedelta(days=7)
CA_LIFETIME = dt.timedelta(days=3650)
LEAF_LIFETIME = dt.timedelta(days=365)
SERVER_NAMES = ("localhost",)
SERVER_IPS = ("127.0.0.1",)


class PkiError(Exception):
    """The state directory holds files that cannot be used or replaced."""


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret file readable by its owner only (created 0600, never widened)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """PKCS#8 PEM, the format of Apple's ``.p8`` keys and of most TLS stacks."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def new_key() -> ec.EllipticCurvePrivateKey:
    """A P-256 key: what APNs uses for provider tokens, and quick to generate."""
    return ec.generate_private_key(ec.SECP256R1())


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Load the first private key of a PEM file (which may also hold certificates)."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:  # TypeError: the key is encrypted
        raise PkiError(f"{path}: unreadable private key ({exc})") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{path}: not an EC private key")
    return key


class Pki:
    """The CA and server certificate of one state directory, and leaves issued by it."""

    def __init__(self, state_dir: Path | str, clock: Clock | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.clock: Clock = clock or SystemClock()
        self.ca_file = self.state_dir / "ca.pem"
        self.ca_key_file = self.state_dir / "ca.key"
        self.server_cert_file = self.state_dir / "server.pem"
        self.server_key_file = self.state_dir / "server.key"
        self._ca_cert: x509.Certificate | None = None
        self._ca_key: ec.EllipticCurvePrivateKey | None = None

    # -- time -----------------------------------------------------------------------------

    def _now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.clock.wall(), tz=dt.UTC)

    def _still_valid(self, cert: x509.Certificate) -> bool:
        now = self._now()
        return cert.not_valid_before_utc <= now and cert.not_valid_after_utc - RENEW_MARGIN > now

    # -- CA -------------------------------------------------------------------------------

    def ensure(self) -> None:
        """Create (or reuse) the CA and the server certificate for 127.0.0.1/localhost."""
        self._ensure_ca()
        self._ensure_server()

    @property
    def ca_cert(self) -> x509.Certificate:
        if self._ca_cert is None:
            self._ensure_ca()
        assert self._ca_cert is not None
        return self._ca_cert

    @property
    def ca_key(self) -> ec.EllipticCurvePrivateKey:
        if self._ca_key is None:
            self._ensure_ca()
        assert self._ca_key is not None
        return self._ca_key

    def _ensure_ca(self) -> None:
        if self.ca_file.exists() and self.ca_key_file.exists():
            try:
                old = x509.load_pem_x509_certificate(self.ca_file.read_bytes())
                old_key = load_private_key(self.ca_key_file)
            except (ValueError, PkiError):
                pass
            else:
                same_key = old.public_key() == old_key.public_key()
                if same_key and self._still_valid(old):
                    self._ca_cert, self._ca_key = old, old_key
                    return
        key = new_key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME)])
        now = self._now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + CA_LIFETIME)
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
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        _write_private(self.ca_key_file, key_pem(key))
        _write_public(self.ca_file, cert.public_bytes(serialization.Encoding.PEM))
        self._ca_cert, self._ca_key = cert, key
        # A new CA invalidates every leaf issued by the old one.
        for leaf in (self.server_cert_file,):
            leaf.unlink(missing_ok=True)

    def issued_by_ca(self, cert: x509.Certificate) -> bool:
        """Whether ``cert`` was signed by this CA's key (a reused leaf must be)."""
        if cert.issuer != self.ca_cert.subject:
            return False
        try:
            cert.verify_directly_issued_by(self.ca_cert)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return True

    def _reusable_leaf(self, cert_path: Path, key_path: Path) -> x509.Certificate | None:
        if not (cert_path.exists() and key_path.exists()):
            return None
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = load_private_key(key_path)
        except (ValueError, PkiError):
            return None
        if cert.public_key() != key.public_key():
            return None
        if not (self._still_valid(cert) and self.issued_by_ca(cert)):
            return None
        return cert

    # -- leaves ---------------------------------------------------------------------------

    def issue(
        self,
        subject: x509.Name,
        key: ec.EllipticCurvePrivateKey,
        *,
        server: bool,
        extensions: Sequence[x509.ExtensionType] = (),
    ) -> x509.Certificate:
        """Sign a leaf certificate for ``key`` (server or client usage)."""
        now = self._now()
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + LEAF_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.ca_key.public_key()),
                critical=False,
            )
        )
        if server:
            names: list[x509.GeneralName] = [x509.DNSName(n) for n in SERVER_NAMES]
            names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in SERVER_IPS]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        for ext in extensions:
            builder = builder.add_extension(ext, critical=False)
        return builder.sign(self.ca_key, hashes.SHA256())

    def _ensure_server(self) -> None:
        if self._reusable_leaf(self.server_cert_file, self.server_key_file) is not None:
            return
        key = new_key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
        cert = self.issue(subject, key, server=True)
        _write_private(self.server_key_file, key_pem(key))
        _write_public(self.server_cert_file, cert.public_bytes(serialization.Encoding.PEM))

    def ensure_client_pem(
        self,
        path: Path,
        subject: x509.Name,
        extensions: Sequence[x509.ExtensionType] = (),
    ) -> Path:
        """A client certificate followed by its key in one PEM file (Flexisip's layout).

        Reused when the file holds a valid certificate of this CA with the same subject and
        extensions; otherwise reissued.
        """
        cert = self._reusable_leaf(path, path)
        if cert is not None and cert.subject == subject:
            have = {e.oid.dotted_string for e in cert.extensions}
            want = {e.oid.dotted_string for e in extensions}
            if want <= have:
                return path
        key = new_key()
        cert = self.issue(subject, key, server=False, extensions=extensions)
        _write_private(path, cert.public_bytes(serialization.Encoding.PEM) + key_pem(key))
        return path

    # -- TLS contexts ---------------------------------------------------------------------

    def server_context(self, alpn: Sequence[str] = ("h2",)) -> ssl.SSLContext:
        """TLS 1.2+ server context; asks for (but does not require) a client certificate.

        Client certificates must chain to this CA: a certificate from elsewhere fails the
        handshake, as a non-Apple certificate fails at APNs.
        """
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.server_cert_file, self.server_key_file)
        ctx.load_verify_locations(cafile=str(self.ca_file))
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.set_alpn_protocols(list(alpn))
        return ctx

    def client_context(
        self, cert_file: Path | None = None, alpn: Sequence[str] = ("h2",)
    ) -> ssl.SSLContext:
        """A client context trusting this CA (for tests and examples)."""
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        if cert_file is not None:
            ctx.load_cert_chain(cert_file)
        ctx.set_alpn_protocols(list(alpn))
        return ctx
