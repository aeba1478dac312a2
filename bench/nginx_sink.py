"""A fast local APNs sink: nginx serving TLS HTTP/2 on 127.0.0.1, echoing ``apns-id``.

A Python HTTP/2 server tops out far below the clients we measure, so the benchmark
needs nginx (Debian package) as the endpoint. The CA and certificate are generated per
run; nginx is started in the foreground and stopped by its PID.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CONF_TEMPLATE = Path(__file__).with_name("nginx-apns.conf")


def make_ca_and_cert(directory: Path) -> tuple[Path, Path, Path]:
    """Write ca.pem, cert.pem and key.pem for 127.0.0.1/localhost; returns their paths."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sipwake bench CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NginxSink:
    """nginx as a TLS h2 APNs look-alike that answers every POST with 200."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.ca, self.cert, self.key = make_ca_and_cert(directory)

    def start(self) -> None:
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        (self.dir / "logs").mkdir(exist_ok=True)
        conf = CONF_TEMPLATE.read_text()
        for name, value in {
            "PORT": str(self.port),
            "CERT": str(self.cert),
            "KEY": str(self.key),
            "PREFIX": str(self.dir),
        }.items():
            conf = conf.replace("@" + name + "@", value)
        conf_path = self.dir / "nginx.conf"
        conf_path.write_text(conf)
        self.proc = subprocess.Popen(
            [nginx, "-p", str(self.dir), "-c", str(conf_path), "-e", str(self.dir / "error.log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        end = time.monotonic() + 10
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                log = (self.dir / "error.log").read_text(errors="replace")
                raise RuntimeError(f"nginx exited with {self.proc.returncode}: {log}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)  # waiting for nginx to listen
        self.stop()
        raise RuntimeError("nginx did not listen within 10 s")

    def client_ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        ctx.set_alpn_protocols(["h2"])
        return ctx

    def stop(self) -> None:
        """Stop the nginx master by its PID (it takes its worker with it)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
