"""A secret sealed to one cell's agent: only the holder of the agent's private key opens it.

The agent makes an X25519 key pair with its state directory and presents the public half in
its registration; the registry binds it at the first one. A rotated broker secret then
travels in the cell's command queue sealed to that key (an ephemeral X25519 agreement, HKDF,
ChaCha20-Poly1305), with the cell and credential ids as associated data: whoever else reads
the queue, for instance a holder of the old secret, learns nothing, and a sealed secret
cannot be replayed as another cell's or another rotation's.
"""

from __future__ import annotations

import base64
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_INFO = b"substrate sealed secret v1"
_RAW = serialization.Encoding.Raw


class SealingError(Exception):
    """A sealed secret that this key cannot open (another key, or tampered with)."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def new_private_key() -> str:
    return _b64(X25519PrivateKey.generate().private_bytes_raw())


def public_key(private: str) -> str:
    key = X25519PrivateKey.from_private_bytes(_unb64(private))
    return _b64(key.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw))


def fingerprint(public: str) -> str:
    """A short name for a public key, for operators and customers to compare."""
    digest = hashes.Hash(hashes.SHA256())
    digest.update(_unb64(public))
    return digest.finalize().hex()[:16]


def _cipher(shared: bytes, ephemeral: bytes, recipient: bytes) -> ChaCha20Poly1305:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=ephemeral + recipient, info=_INFO).derive(
        shared
    )
    return ChaCha20Poly1305(key)


def seal(recipient_public: str, secret: str, context: str) -> str:
    """``secret`` sealed to ``recipient_public``; ``context`` (not secret) must be given again
    to open it."""
    recipient = _unb64(recipient_public)
    ephemeral = X25519PrivateKey.generate()
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(recipient))
    ephemeral_raw = ephemeral.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)
    nonce = os.urandom(12)
    sealed = _cipher(shared, ephemeral_raw, recipient).encrypt(
        nonce, secret.encode(), context.encode()
    )
    return _b64(ephemeral_raw + nonce + sealed)


def unseal(private: str, sealed: str, context: str) -> str:
    try:
        raw = _unb64(sealed)
        ephemeral_raw, nonce, body = raw[:32], raw[32:44], raw[44:]
        key = X25519PrivateKey.from_private_bytes(_unb64(private))
        recipient = key.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)
        shared = key.exchange(X25519PublicKey.from_public_bytes(ephemeral_raw))
        return (
            _cipher(shared, ephemeral_raw, recipient)
            .decrypt(nonce, body, context.encode())
            .decode()
        )
    except (InvalidTag, ValueError) as exc:
        raise SealingError("the sealed secret does not open with this key") from exc
