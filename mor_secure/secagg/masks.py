"""Pairwise masks that cancel over a round's participants (Bonawitz et al. 2017, SecAgg).

For silos i and j, both derive the same 32-byte seed: HKDF-SHA256 over their
X25519 shared secret, salted with the round id's SHA-256 and bound to the pair's
names, so a new round (a restart included) gets fresh, unrelated masks. The
seed is expanded by ChaCha20 (a cryptographic PRG; not numpy's RandomState,
which Flower's SecAgg+ uses) into integers uniform in [0, t) by rejection
sampling. Silo i adds the stream of every pair with j > i and subtracts it
for j < i, so over the whole participant set every stream appears once with
each sign and the masks sum to exactly 0 mod t, while each silo's masked
vector is uniform mod t to anyone missing one of its seeds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .fixed_point import PLAIN_MODULUS, add_mod

# v2: the salt is SHA-256 of the round id (v1 used the round id itself; see pair_seed).
_INFO = b"mor-secure/secagg/pairwise-mask/v2"
_SAMPLE_BYTES = 6  # 48-bit samples; t < 2^41, so fewer than 1 in 2^7 is rejected
_LIMIT = (1 << 48) // PLAIN_MODULUS * PLAIN_MODULUS  # accept below this: uniform mod t


def pair_seed(own: x25519.X25519PrivateKey, peer: x25519.X25519PublicKey, *, round_id: str, me: str,
              other: str) -> bytes:
    """The seed silos `me` and `other` share for `round_id` (the same on both sides)."""
    low, high = sorted((me, other))
    info = _INFO + b"|" + low.encode() + b"|" + high.encode()
    # The salt is HKDF's HMAC key, and HMAC zero-pads a key under 64 bytes and hashes one over: as a raw salt,
    # "r" and "r\x00" were one key (one set of masks for two rounds the silo answers, so their difference
    # unmasked its terms; RFC 2104 section 2). A digest is fixed-length and distinct for distinct round ids.
    salt = hashlib.sha256(round_id.encode("utf-8")).digest()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(own.exchange(peer))


def expand(seed: bytes, count: int) -> np.ndarray:
    """`count` integers uniform in [0, t) from `seed` (ChaCha20 keystream, rejection sampling)."""
    stream = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor()
    out = np.empty(0, dtype=np.int64)
    while out.size < count:
        wanted = count - out.size
        raw = np.frombuffer(stream.update(b"\0" * (_SAMPLE_BYTES * (wanted + wanted // 64 + 8))), dtype=np.uint8)
        padded = np.zeros((raw.size // _SAMPLE_BYTES, 8), dtype=np.uint8)
        padded[:, :_SAMPLE_BYTES] = raw.reshape(-1, _SAMPLE_BYTES)
        samples = padded.view("<u8").ravel()
        out = np.concatenate([out, (samples[samples < _LIMIT] % PLAIN_MODULUS).astype(np.int64)])
    return out[:count]


def mask(own: x25519.X25519PrivateKey, peers: Mapping[str, x25519.X25519PublicKey], *, me: str, round_id: str,
         count: int) -> np.ndarray:
    """Silo `me`'s mask for `round_id`: + the pair streams with names after its own, - those before."""
    streams = []
    for other, peer in peers.items():
        if other == me:
            continue
        stream = expand(pair_seed(own, peer, round_id=round_id, me=me, other=other), count)
        streams.append(stream if me < other else np.mod(-stream, PLAIN_MODULUS))
    return add_mod(*streams) if streams else np.zeros(count, dtype=np.int64)
