"""Fixed point for secure aggregation: real weighted scores as exact integers modulo the BFV plaintext modulus.

Masks cancel exactly only over integers, so each silo's terms w_k r_k are
rounded to multiples of 2^-20 (error at most 2^-21 ~ 4.8e-7 per term, so a
sum over 8 silos is within 4e-6 of the real one: well inside the 1e-4 the
protocol promises) and represented modulo t. A term must stay below 2^15 in
magnitude (standardised scores are O(1); a weight is at most 1), so the sum
of up to 16 silos' terms stays below 2^39 < t / 2 and decodes without
wrapping.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# TenSEAL BFV batching prime of DESIGN §5 (41 bits; 1 mod 2 * 8192, so 8192 slots per ciphertext).
PLAIN_MODULUS = 1099511922689
SCALE_BITS = 20
SCALE = 1 << SCALE_BITS
MAX_ABS_TERM = float(1 << 15)
# Silos whose terms one sum may add: 16 * 2^15 * 2^20 = 2^39 < t / 2 (t just above 2^40), so it never wraps.
MAX_PARTICIPANTS = 16


def encode(values: Sequence[float]) -> np.ndarray:
    """Each value times 2^20, rounded, as int64 in [0, t); ValueError for a non-finite or too large value."""
    array = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(array)):
        raise ValueError("secure aggregation takes finite terms only")
    if array.size and float(np.abs(array).max()) >= MAX_ABS_TERM:
        raise ValueError(f"a term of magnitude {float(np.abs(array).max()):g} is beyond the fixed-point range "
                         f"(< {MAX_ABS_TERM:g})")
    return np.mod(np.rint(array * SCALE).astype(np.int64), PLAIN_MODULUS)


def centred(values: np.ndarray) -> np.ndarray:
    """Residues mod t as the signed integers in (-t/2, t/2] (what a BFV vector encrypts and decrypts)."""
    values = np.mod(np.asarray(values, dtype=np.int64), PLAIN_MODULUS)
    return np.where(values > PLAIN_MODULUS // 2, values - PLAIN_MODULUS, values)


def decode(values: np.ndarray) -> np.ndarray:
    """Integers mod t (a decrypted, unblinded sum) back to floats."""
    return centred(values).astype(np.float64) / SCALE


def add_mod(*arrays: np.ndarray) -> np.ndarray:
    """Elementwise sum mod t, without int64 overflow (each operand is reduced first; t < 2^41)."""
    total = np.zeros_like(np.asarray(arrays[0], dtype=np.int64))
    for array in arrays:
        total = np.mod(total + np.mod(np.asarray(array, dtype=np.int64), PLAIN_MODULUS), PLAIN_MODULUS)
    return total

