"""The arithmetic of one secure round: masked, encrypted contributions; their sum; blinding; decoding.

Silo k: its weighted terms w_k r_k, fixed point, plus its pairwise mask,
packed into one BFV vector and encrypted (`contribution`). Coordinator: adds
the ciphertexts (`add`), adds its own random blinding b (`blind`), and asks
the round's decryptor silo to decrypt (`decrypt`, with the secret context).
The masks cancel in the sum, so the decryptor sees only sum + b, uniform to
it; the coordinator subtracts b and decodes (`unblind`): it learns the sum
and nothing of any single silo's terms (a single ciphertext decrypts to
masked noise). One ciphertext holds up to 8192 items; larger rounds are cut
into several by the caller.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import numpy as np
import tenseal as ts

from .fixed_point import PLAIN_MODULUS, add_mod, centred, decode, encode
from .he_context import SLOTS


def _check_size(count: int) -> None:
    if not 0 < count <= SLOTS:
        raise ValueError(f"one ciphertext holds 1 to {SLOTS} items, got {count}")


def contribution(terms: Sequence[float], mask: np.ndarray, context: ts.Context) -> bytes:
    """A silo's encrypted, masked terms (serialised BFV vector)."""
    _check_size(len(terms))
    if len(mask) != len(terms):
        raise ValueError(f"mask has {len(mask)} entries for {len(terms)} terms")
    masked = centred(add_mod(encode(terms), mask))
    return ts.bfv_vector(context, masked.tolist()).serialize()


def add(ciphertexts: Sequence[bytes], context: ts.Context) -> ts.BFVVector:
    """The homomorphic sum of the silos' contributions (public context suffices)."""
    if not ciphertexts:
        raise ValueError("nothing to add")
    vectors = [ts.bfv_vector_from(context, c) for c in ciphertexts]
    total = vectors[0]
    for vector in vectors[1:]:
        total = total + vector
    return total


def new_blinding(count: int) -> np.ndarray:
    """The coordinator's one-time blinding, uniform mod t from OS entropy."""
    return np.array([secrets.randbelow(PLAIN_MODULUS) for _ in range(count)], dtype=np.int64)


def blind(total: ts.BFVVector, blinding: np.ndarray) -> bytes:
    """Sum + b, serialised for the decryptor (which then sees only a uniformly random vector)."""
    return (total + centred(blinding).tolist()).serialize()


def decrypt(ciphertext: bytes, context: ts.Context) -> np.ndarray:
    """The decryptor silo's step: the plaintext integers mod t of a blinded sum."""
    return np.mod(np.asarray(ts.bfv_vector_from(context, ciphertext).decrypt(), dtype=np.int64), PLAIN_MODULUS)


def unblind(decrypted: np.ndarray, blinding: np.ndarray, count: int) -> np.ndarray:
    """The real-valued sum of every silo's terms: decrypted - b, decoded ([count] floats)."""
    return decode(add_mod(decrypted[:count], -blinding[:count]))
