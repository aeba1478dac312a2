"""Encryption of stored secrets (push credentials) with a key kept in the data dir.

AES-256-GCM; the record's id is the associated data, so a ciphertext copied onto another
record does not decrypt. The key file is created on first use with mode 0600 and is
refused when others may read it, because then the secrets it protects are exposed.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sipwake.store.base import StoreError

KEY_FILE = "secret.key"
_KEY_BYTES = 32
_NONCE_BYTES = 12
_VERSION = b"\x01"


class SecretBox:
    """Encrypts and decrypts secret blobs bound to a record id."""

    def __init__(self, key: bytes) -> None:
        if len(key) != _KEY_BYTES:
            raise StoreError(f"secret key must be {_KEY_BYTES} bytes, got {len(key)}")
        self._aead = AESGCM(key)

    @classmethod
    def from_data_dir(cls, data_dir: Path) -> SecretBox:
        """Load ``secret.key`` from ``data_dir``, creating it (0600) on first use."""
        return cls(load_or_create_key(data_dir / KEY_FILE))

    def encrypt(self, record_id: str, secret: bytes) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return _VERSION + nonce + self._aead.encrypt(nonce, secret, record_id.encode())

    def decrypt(self, record_id: str, blob: bytes) -> bytes:
        if blob[:1] != _VERSION or len(blob) < 1 + _NONCE_BYTES + 16:
            raise StoreError(f"secret of {record_id}: unknown format")
        nonce = blob[1 : 1 + _NONCE_BYTES]
        try:
            return self._aead.decrypt(nonce, blob[1 + _NONCE_BYTES :], record_id.encode())
        except InvalidTag:
            raise StoreError(
                f"secret of {record_id}: cannot decrypt (the key file is not the one it was "
                "stored with, or the data was altered)"
            ) from None


def load_or_create_key(path: Path) -> bytes:
    """The key in ``path``; created atomically with mode 0600 when the file is missing."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"{path.parent}: cannot create data dir: {exc.strerror}") from None
    if path.exists():
        return _read_key(path)
    # Written aside then linked into place, so a concurrent starter never sees half a key.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    key = os.urandom(_KEY_BYTES)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, key)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return _read_key(path)
        finally:
            tmp.unlink()
    except OSError as exc:
        raise StoreError(f"{path}: cannot create key file: {exc.strerror}") from None
    return key


def _read_key(path: Path) -> bytes:
    try:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise StoreError(
                f"{path}: key file is accessible to other users (mode {stat.S_IMODE(mode):o}); "
                "run chmod 600 on it"
            )
        key = path.read_bytes()
    except OSError as exc:
        raise StoreError(f"{path}: cannot read key file: {exc.strerror}") from None
    if len(key) != _KEY_BYTES:
        raise StoreError(f"{path}: key file must hold {_KEY_BYTES} bytes, found {len(key)}")
    return key
