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

Every vector that comes from another party is read through `vector`, which
holds it to one ciphertext of 1 to 8192 items: TenSEAL takes the item counts
a serialised vector declares on trust.
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


def vector(data: bytes, context: ts.Context, *, items: int | None = None) -> ts.BFVVector:
    """`data` as a BFV vector of one ciphertext holding 1 to SLOTS items (`items` of them, when given).

    TenSEAL 0.3 decrypts a vector by copying, per ciphertext, as many decoded
    slots as the serialised vector declares (`BFVVector::decrypt`,
    bfvvector.cpp), with no bound: a Decrypt of one ciphertext declaring
    60,000 items answered 60,000 values, all but 8,192 read from past the
    decoded plaintext, the decryptor silo's heap (its own masked terms of
    earlier rounds among them), and one declaring 10^6 crashed the silo
    (SIGSEGV). With one ciphertext, a total within its slots bounds the one
    count it reads (an empty count list totals 0).
    """
    loaded = ts.bfv_vector_from(context, data)
    size, chunks = loaded.size(), len(loaded.ciphertext())
    if chunks != 1 or not 0 < size <= SLOTS or (items is not None and size != items):
        expected = f"{items} items" if items is not None else f"1 to {SLOTS} items"
        raise ValueError(f"{chunks} ciphertext(s) declaring {size} items, not one ciphertext of {expected}")
    return loaded


def contribution(terms: Sequence[float], mask: np.ndarray, context: ts.Context) -> bytes:
    """A silo's encrypted, masked terms (serialised BFV vector)."""
    _check_size(len(terms))
    if len(mask) != len(terms):
        raise ValueError(f"mask has {len(mask)} entries for {len(terms)} terms")
    masked = centred(add_mod(encode(terms), mask))
    return ts.bfv_vector(context, masked.tolist()).serialize()


def add(vectors: Sequence[ts.BFVVector]) -> ts.BFVVector:
    """The homomorphic sum of the silos' contributions, each read through `vector` (public context suffices)."""
    if not vectors:
        raise ValueError("nothing to add")
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
    """The decryptor silo's step: the plaintext integers mod t of a blinded sum (one ciphertext, see `vector`)."""
    return np.mod(np.asarray(vector(ciphertext, context).decrypt(), dtype=np.int64), PLAIN_MODULUS)


def unblind(decrypted: np.ndarray, blinding: np.ndarray, count: int) -> np.ndarray:
    """The real-valued sum of every silo's terms: decrypted - b, decoded ([count] floats)."""
    return decode(add_mod(decrypted[:count], -blinding[:count]))
