"""The simulator's PKI: files are reused while valid and replaced when not."""

from __future__ import annotations

import time
from pathlib import Path

from cryptography import x509

from sipwake.clock import FakeClock
from sipwake.simulator.tls import Pki


def test_reused_while_valid_and_reissued_near_expiry(tmp_path: Path) -> None:
    now = time.time()
    first = Pki(tmp_path, FakeClock(wall_start=now))
    first.ensure()
    ca, server = first.ca_file.read_bytes(), first.server_cert_file.read_bytes()

    again = Pki(tmp_path, FakeClock(wall_start=now + 86400))
    again.ensure()
    assert (again.ca_file.read_bytes(), again.server_cert_file.read_bytes()) == (ca, server)

    # The server certificate lives a year: a year later it is reissued by the same CA.
    later = Pki(tmp_path, FakeClock(wall_start=now + 365 * 86400))
    later.ensure()
    assert later.ca_file.read_bytes() == ca
    assert later.server_cert_file.read_bytes() != server
    leaf = x509.load_pem_x509_certificate(later.server_cert_file.read_bytes())
    assert later.issued_by_ca(leaf)


def test_a_new_ca_reissues_leaves(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    pki.ensure()
    client = pki.ensure_client_pem(tmp_path / "c.pem", pki.ca_cert.subject)
    old_client = client.read_bytes()
    pki.ca_key_file.write_text("garbage")  # an unusable CA is replaced

    fresh = Pki(tmp_path)
    fresh.ensure()
    server = x509.load_pem_x509_certificate(fresh.server_cert_file.read_bytes())
    assert fresh.issued_by_ca(server)
    fresh.ensure_client_pem(tmp_path / "c.pem", fresh.ca_cert.subject)
    assert client.read_bytes() != old_client
    cert = x509.load_pem_x509_certificate(client.read_bytes())
    assert fresh.issued_by_ca(cert)
    assert fresh.ca_key_file.stat().st_mode & 0o077 == 0
