"""The consortium's homomorphic-encryption context (TenSEAL BFV): the secret for silos, the public for the coordinator.

Parameters (DESIGN §5, measured here): polynomial degree N = 8192 and the
41-bit batching prime t = 1099511922689, so one ciphertext packs 8192
integers mod t and adding ciphertexts adds them exactly. Encrypting a full
vector takes ~5 ms, a ciphertext is ~430 KB; the coordinator's serialised
public context ~2.7 MB, a silo's secret one ~0.8 MB. TenSEAL's default
coefficient moduli for N = 8192 give 128-bit security (HE standard).

Silos hold the secret key (any of them can decrypt: the decryptor of a
round is one of them); the coordinator holds only the public context, which
can encrypt and add but not decrypt: `public_context` refuses to hand out a
context that still holds the secret key.
"""

from __future__ import annotations

import tenseal as ts

from .fixed_point import PLAIN_MODULUS

POLY_MODULUS_DEGREE = 8192
SLOTS = POLY_MODULUS_DEGREE


def new_secret_context() -> ts.Context:
    """A fresh BFV context with its secret key (made once, at provisioning)."""
    return ts.context(ts.SCHEME_TYPE.BFV, poly_modulus_degree=POLY_MODULUS_DEGREE, plain_modulus=PLAIN_MODULUS)


def secret_bytes(context: ts.Context) -> bytes:
    """The context with its secret key, for a silo's kit."""
    if not context.is_private():
        raise ValueError("this context holds no secret key")
    return context.serialize(save_secret_key=True)


def public_bytes(context: ts.Context) -> bytes:
    """The context without its secret key, for the coordinator's kit; checked to be public after loading."""
    data = context.serialize(save_secret_key=False)
    if not load_public(data).is_public():
        raise RuntimeError("TenSEAL serialised a public context that still holds a secret key")
    return data


def load_public(data: bytes) -> ts.Context:
    """The coordinator's context; ValueError if it can decrypt (a secret context given by mistake)."""
    context = ts.context_from(data)
    if not context.is_public():
        raise ValueError("this context holds the secret key; the coordinator must only ever get the public one")
    return context


def load_secret(data: bytes) -> ts.Context:
    """A silo's context; ValueError if it holds no secret key."""
    context = ts.context_from(data)
    if not context.is_private():
        raise ValueError("this context holds no secret key; a silo needs the secret context from its kit")
    return context
