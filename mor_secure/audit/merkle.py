"""RFC 6962 Merkle tree: the tree behind the tamper-evident audit log.

The audit log appends one entry per recorded decision. Publishing only the
root hash of the Merkle tree over those entries lets anyone holding an older
root check, with a short consistency proof, that the log was only appended to
(nothing rewritten or dropped), and check, with a short inclusion proof, that
a given entry is in it. The hashing is exactly RFC 6962 section 2.1, so proofs
interoperate with Certificate Transparency style tooling:

* leaf hash = SHA-256(0x00 || entry), node hash = SHA-256(0x01 || left || right),
  which keeps a leaf from ever being confused with an inner node;
* the root of the empty tree is SHA-256 of the empty string.

Proof generation follows RFC 6962 sections 2.1.1 (PATH) and 2.1.2 (PROOF).
Verification is a port of the reference implementation transparency-dev/merkle
(Go, ``proof/verify.go``: RootFromInclusionProof and VerifyConsistency with
their helpers decompInclProof, innerProofSize, chainInner, chainInnerRight and
chainBorderRight), including its error cases. As in the current reference, a
consistency proof from size 0 is always rejected (there is nothing to prove;
any tree extends the empty one), even when the proof is empty. One strictness
is added: each proof element must be 32 bytes, so a malformed proof is
reported as such instead of as a root mismatch.

Everything here is pure Python over ``hashlib``; nothing is thread-safe.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

__all__ = [
    "EMPTY_ROOT", "MerkleTree", "ProofError", "consistency_proof", "inclusion_proof", "leaf_hash", "node_hash",
    "root_hash", "verify_consistency", "verify_inclusion",
]

_HASH_SIZE = 32
EMPTY_ROOT: bytes = hashlib.sha256(b"").digest()


class ProofError(ValueError):
    """A proof did not verify, or its parameters cannot describe a valid proof."""


def leaf_hash(entry: bytes) -> bytes:
    """SHA-256(0x00 || entry): the hash of one log entry."""
    return hashlib.sha256(b"\x00" + bytes(entry)).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """SHA-256(0x01 || left || right): the hash of an inner node."""
    return hashlib.sha256(b"\x01" + bytes(left) + bytes(right)).digest()


# ---------------------------------------------------------------------------
# Generation (RFC 6962 section 2.1), O(n) hashes per call.


def _parent_level(level: list[bytes]) -> list[bytes]:
    """Hash neighbours pairwise and promote a lone last node unchanged: this builds exactly RFC 6962's split."""
    parents = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
    if len(level) % 2:
        parents.append(level[-1])
    return parents


def _mth(leaf_hashes: Sequence[bytes], lo: int, hi: int) -> bytes:
    """MTH(D[lo:hi]), computed level by level."""
    if hi <= lo:
        return EMPTY_ROOT
    level = list(leaf_hashes[lo:hi])
    while len(level) > 1:
        level = _parent_level(level)
    return level[0]


def root_hash(leaf_hashes: Sequence[bytes]) -> bytes:
    """The Merkle tree hash over already-hashed leaves; EMPTY_ROOT for none."""
    return _mth(leaf_hashes, 0, len(leaf_hashes))


def _inclusion_path(leaf_hashes: Sequence[bytes], index: int, size: int) -> list[bytes]:
    if size <= 0:
        raise ValueError("no inclusion proof exists in an empty tree")
    if not 0 <= index < size:
        raise ValueError(f"leaf index {index} is out of range for a tree of size {size} (want 0 <= index < {size})")
    proof: list[bytes] = []
    level = list(leaf_hashes[:size])
    while len(level) > 1:
        sibling = index ^ 1
        if sibling < len(level):  # otherwise the node is promoted unchanged: no proof element at this level
            proof.append(level[sibling])
        level, index = _parent_level(level), index >> 1
    return proof


def inclusion_proof(leaf_hashes: Sequence[bytes], index: int) -> list[bytes]:
    """PATH(index, D[n]) of RFC 6962 section 2.1.1, ordered from the leaf's sibling up to the root."""
    return _inclusion_path(leaf_hashes, index, len(leaf_hashes))


def _subproof(leaf_hashes: Sequence[bytes], m: int, lo: int, hi: int, complete: bool, out: list[bytes]) -> None:
    """SUBPROOF(m, D[lo:hi], complete), appending to `out` in RFC order (lowest node first)."""
    n = hi - lo
    if m == n:
        if not complete:
            out.append(_mth(leaf_hashes, lo, hi))
        return
    k = 1 << ((n - 1).bit_length() - 1)  # RFC 6962's k: the largest power of two smaller than n
    if m <= k:
        _subproof(leaf_hashes, m, lo, lo + k, complete, out)
        out.append(_mth(leaf_hashes, lo + k, hi))
    else:
        _subproof(leaf_hashes, m - k, lo + k, hi, False, out)
        out.append(_mth(leaf_hashes, lo, lo + k))


def _consistency(leaf_hashes: Sequence[bytes], old_size: int, new_size: int) -> list[bytes]:
    if not 0 < old_size <= new_size:
        raise ValueError(
            f"no consistency proof from size {old_size} to size {new_size} (want 0 < old_size <= new_size); "
            "a proof from the empty tree is meaningless"
        )
    out: list[bytes] = []
    _subproof(leaf_hashes, old_size, 0, new_size, True, out)
    return out


def consistency_proof(leaf_hashes: Sequence[bytes], old_size: int) -> list[bytes]:
    """PROOF(old_size, D[n]) of RFC 6962 section 2.1.2, for 0 < old_size <= n (empty when old_size == n)."""
    return _consistency(leaf_hashes, old_size, len(leaf_hashes))


# ---------------------------------------------------------------------------
# Verification: a port of transparency-dev/merkle proof/verify.go.


def _check_proof_elements(proof: Sequence[bytes]) -> None:
    for i, element in enumerate(proof):
        if len(element) != _HASH_SIZE:
            raise ProofError(f"proof element {i} is {len(element)} bytes, want {_HASH_SIZE}: the proof is malformed")


def _verify_match(calculated: bytes, expected: bytes, what: str) -> None:
    if calculated != expected:
        raise ProofError(
            f"{what} does not match: the proof yields {calculated.hex()}, expected {bytes(expected).hex() or '(empty)'}"
        )


def _decomp_incl_proof(index: int, size: int) -> tuple[int, int]:
    """Lengths of the inner and border parts of the inclusion proof for `index` in a tree of `size`."""
    inner = (index ^ (size - 1)).bit_length()  # innerProofSize: where paths to index and size-1 diverge
    border = (index >> inner).bit_count()
    return inner, border


def _chain_inner(seed: bytes, proof: Sequence[bytes], index: int) -> bytes:
    for i, h in enumerate(proof):
        seed = node_hash(seed, h) if (index >> i) & 1 == 0 else node_hash(h, seed)
    return seed


def _chain_inner_right(seed: bytes, proof: Sequence[bytes], index: int) -> bytes:
    for i, h in enumerate(proof):
        if (index >> i) & 1 == 1:
            seed = node_hash(h, seed)
    return seed


def _chain_border_right(seed: bytes, proof: Sequence[bytes]) -> bytes:
    for h in proof:
        seed = node_hash(h, seed)
    return seed


def verify_inclusion(*, index: int, size: int, leaf: bytes, proof: Sequence[bytes], root: bytes) -> None:
    """Check that `leaf`, a leaf HASH, is at `index` in the tree of `size` leaves with `root`; else ProofError."""
    if size <= 0:
        raise ProofError(f"tree size {size} holds no leaves, so nothing can be proven included")
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is out of range for a tree of size {size} (want 0 <= index < {size})")
    if len(leaf) != _HASH_SIZE:
        raise ProofError(f"leaf hash is {len(leaf)} bytes, want {_HASH_SIZE}: pass leaf_hash(entry), not the entry")
    inner, border = _decomp_incl_proof(index, size)
    if len(proof) != inner + border:
        raise ProofError(
            f"wrong inclusion proof length {len(proof)} for index {index} in a tree of size {size}, "
            f"want {inner + border}"
        )
    _check_proof_elements(proof)
    calculated = _chain_inner(bytes(leaf), proof[:inner], index)
    calculated = _chain_border_right(calculated, proof[inner:])
    _verify_match(calculated, root, f"root of the tree of size {size}")


def verify_consistency(
    *, old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """Check that the tree of `new_size` with `new_root` extends the tree of `old_size` with `old_root`.

    Requires 0 < old_size <= new_size, as transparency-dev/merkle does: a proof
    from size 0 is rejected whatever the proof. Raises ProofError otherwise.
    """
    if old_size < 0 or new_size < 0:
        raise ProofError(f"tree sizes must be non-negative, got old size {old_size} and new size {new_size}")
    if new_size < old_size:
        raise ProofError(f"old size {old_size} > new size {new_size}: an append-only log cannot shrink")
    if old_size == 0:
        raise ProofError("a consistency proof from the empty tree (old size 0) is meaningless; verify from size >= 1")
    if old_size == new_size:
        if proof:
            raise ProofError(f"old and new sizes are both {old_size}: the proof must be empty, not {len(proof)} long")
        _verify_match(bytes(old_root), new_root, f"root of the tree of size {new_size} (same size as the old tree)")
        return
    if not proof:
        raise ProofError(f"empty consistency proof, but sizes differ ({old_size} -> {new_size})")

    fork_level, border = _decomp_incl_proof(old_size - 1, new_size)
    shift = (old_size & -old_size).bit_length() - 1  # trailing zeros: height of the old tree's last perfect subtree
    inner = fork_level - shift
    # The first element is that subtree's root, unless the old tree is itself perfect (then it is old_root).
    seed, start = (bytes(old_root), 0) if old_size == 1 << shift else (proof[0], 1)
    if len(proof) != start + inner + border:
        raise ProofError(
            f"wrong consistency proof length {len(proof)} for sizes {old_size} -> {new_size}, "
            f"want {start + inner + border}"
        )
    _check_proof_elements(proof)
    rest = proof[start:]
    mask = (old_size - 1) >> shift
    if start == 1:
        calculated_old = _chain_inner_right(seed, rest[:inner], mask)
        calculated_old = _chain_border_right(calculated_old, rest[inner:])
        _verify_match(calculated_old, old_root, f"root of the old tree of size {old_size}")
    calculated_new = _chain_inner(seed, rest[:inner], mask)
    calculated_new = _chain_border_right(calculated_new, rest[inner:])
    _verify_match(calculated_new, new_root, f"root of the new tree of size {new_size}")


# ---------------------------------------------------------------------------
# Incremental tree.


class MerkleTree:
    """An append-only RFC 6962 tree over leaf hashes, as the audit log grows.

    It keeps every leaf hash (for proofs and past roots) and a compact range:
    the roots of the perfect subtrees that make up the current tree, largest
    first, one per set bit of the size. `append` is amortized O(1) hashes and
    `root()` is O(log n); `root_at` and the proofs are O(n). Not thread-safe:
    callers that share a tree between threads must hold their own lock.
    """

    def __init__(self) -> None:
        self._leaves: list[bytes] = []
        self._range: list[bytes] = []

    @property
    def size(self) -> int:
        return len(self._leaves)

    def append(self, leaf_hash: bytes) -> int:
        """Add one leaf HASH (use leaf_hash(entry)); return its index."""
        if not isinstance(leaf_hash, (bytes, bytearray, memoryview)) or len(leaf_hash) != _HASH_SIZE:
            raise ValueError(f"append() takes a {_HASH_SIZE}-byte leaf hash (leaf_hash(entry)), got {leaf_hash!r:.80}")
        index = len(self._leaves)
        node = bytes(leaf_hash)
        self._leaves.append(node)
        carry = index  # merge equal-height subtrees, like binary addition of 1
        while carry & 1:
            node = node_hash(self._range.pop(), node)
            carry >>= 1
        self._range.append(node)
        return index

    def mark(self) -> tuple[int, tuple[bytes, ...]]:
        """A point to `rewind` to: the size and compact range now (O(log n), no copy of the leaves)."""
        return len(self._leaves), tuple(self._range)

    def rewind(self, mark: tuple[int, tuple[bytes, ...]]) -> None:
        """Drop the leaves appended since `mark` (an append whose write to disk failed)."""
        size, compact_range = mark
        del self._leaves[size:]
        self._range = list(compact_range)

    def root(self) -> bytes:
        """The current root, folded from the compact range right to left."""
        if not self._range:
            return EMPTY_ROOT
        node = self._range[-1]
        for left in reversed(self._range[:-1]):
            node = node_hash(left, node)
        return node

    def _check_size(self, size: int, name: str = "size") -> int:
        if not 0 <= size <= len(self._leaves):
            raise ValueError(f"{name} {size} is out of range: the tree holds {len(self._leaves)} leaves")
        return size

    def root_at(self, size: int) -> bytes:
        """The root the tree had when it held `size` leaves."""
        return _mth(self._leaves, 0, self._check_size(size))

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """Inclusion proof for leaf `index` in the tree of `size` leaves (default: now)."""
        size = len(self._leaves) if size is None else self._check_size(size)
        return _inclusion_path(self._leaves, index, size)

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        """Consistency proof from `old_size` to `new_size` leaves (default: now)."""
        new_size = len(self._leaves) if new_size is None else self._check_size(new_size, "new_size")
        return _consistency(self._leaves, old_size, new_size)
