"""The secure aggregation's cryptography, all from the ``cryptography`` package: X25519 key agreement, HKDF-SHA256,
AES-256-GCM for the shares the director relays, and AES-256-CTR as the pseudo-random generator of masks."""
from __future__ import annotations

import os

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32


def new_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def agree(private: X25519PrivateKey | bytes, public: bytes, context: bytes) -> bytes:
    """A 32-byte secret both ends derive: HKDF-SHA256 over X25519(private, public), bound to ``context``."""
    if isinstance(private, bytes):
        private = X25519PrivateKey.from_private_bytes(private)
    shared = private.exchange(X25519PublicKey.from_public_bytes(public))
    return HKDF(hashes.SHA256(), KEY_BYTES, salt=None, info=context).derive(shared)


def usable_public_key(public: bytes) -> bool:
    """Whether an X25519 public key agrees a secret (a low-order point gives the all-zero one, which the
    library refuses)."""
    try:
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:
        return False
    return True


def encrypt(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated)


def decrypt(key: bytes, ciphertext: bytes, associated: bytes) -> bytes:
    """Raises ``cryptography.exceptions.InvalidTag`` when the ciphertext or its context was altered."""
    return AESGCM(key).decrypt(ciphertext[:12], ciphertext[12:], associated)


def new_seed() -> bytes:
    return os.urandom(KEY_BYTES)


def prg(seed: bytes, size: int) -> np.ndarray:
    """``size`` pseudo-random uint64 words from a 32-byte seed (AES-256-CTR of zeros)."""
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(b"\0" * 16)).encryptor()
    return np.frombuffer(encryptor.update(bytes(8 * size)) + encryptor.finalize(), np.uint64).copy()
