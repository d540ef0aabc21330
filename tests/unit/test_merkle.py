"""The RFC 6962 Merkle tree of the audit log, against the reference implementation's vectors and probes.

Known-answer vectors and the negative probes come from transparency-dev/merkle;
a property test then checks that every proof we generate for random trees
verifies, and that the incremental tree's root matches a full recompute.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mor_secure.audit import merkle
from mor_secure.audit.merkle import (
    EMPTY_ROOT,
    MerkleTree,
    ProofError,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root_hash,
    verify_consistency,
    verify_inclusion,
)

# ---------------------------------------------------------------------------
# Test vectors copied from https://github.com/transparency-dev/merkle
# (commit 417fb0c314750d94e53942e9f92e79b6d35915db), Copyright Google LLC,
# licensed under the Apache License, Version 2.0:
#   - testonly/constants.go: LeafInputs, NodeHashes, RootHashes, EmptyRootHash;
#   - rfc6962/rfc6962_test.go: the empty, empty-leaf, leaf and node hashes;
#   - cmd/proofgen/main.go: inclusionProofs, consistencyProofs, sha256SomeHash and
#     the probe mutations it writes out as testdata/inclusion/** and
#     testdata/consistency/** (run by proof/verify_test.go);
#   - proof/proof_test.go: TestInclusion and TestConsistency proof shapes.

LEAF_INPUTS = [bytes.fromhex(h) for h in (
    "", "00", "10", "2021", "3031", "40414243", "5051525354555657", "606162636465666768696a6b6c6d6e6f",
)]

# NodeHashes()[level][index]: every perfect subtree of the tree over LEAF_INPUTS.
NODE_HASHES = [[bytes.fromhex(h) for h in level] for level in (
    (
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "0298d122906dcfc10892cb53a73992fc5b9f493ea4c9badb27b791b4127a7fe7",
        "07506a85fd9dd2f120eb694f86011e5bb4662e5c415a62917033d4a9624487e7",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        "4271a26be0d8a84f0bd54c8c302e7cb3a3b5d1fa6780a40bcce2873477dab658",
        "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
        "46f6ffadd3d06a09ff3c5860d2755c8b9819db7df44251788c7d8e3180de8eb1",
    ),
    (
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
    ),
    (
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ),
    ("5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",),
)]

EMPTY_ROOT_HEX = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

# RootHashes(): the root of the tree over LEAF_INPUTS[:size], indexed by size.
ROOT_HASHES = [bytes.fromhex(h) for h in (
    EMPTY_ROOT_HEX,
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
)]

SOME_HASH = bytes.fromhex("abacaba000000000000000000000000000000000000000000060061e00123456")  # sha256SomeHash

# inclusionProofs: (1-based leaf index, tree size, proof).
INCLUSION_VECTORS = [(leaf, size, [bytes.fromhex(h) for h in proof]) for leaf, size, proof in (
    (1, 1, ()),
    (1, 8, (
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    )),
    (6, 8, (
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    )),
    (3, 3, ("fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",)),
    (2, 5, (
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
    )),
)]

# consistencyProofs: (size1, size2, proof).
CONSISTENCY_VECTORS = [(size1, size2, [bytes.fromhex(h) for h in proof]) for size1, size2, proof in (
    (1, 1, ()),
    (1, 8, (
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    )),
    (6, 8, (
        "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    )),
    (2, 5, (
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
    )),
    (6, 7, (
        "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
        "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    )),
)]

# proof/proof_test.go: proofs as node ids (level, index), with the ids in
# [begin, end) folded into one hash (Nodes.Rehash: hash = H(next, hash)).
# Inclusion: (size, index, ids, rehash range); consistency: (size1, size2, ids, rehash range).
INCLUSION_SHAPES = [
    (1, 0, [], None), (2, 0, [(0, 1)], None), (2, 1, [(0, 0)], None), (3, 1, [(0, 0), (0, 2)], (1, 2)),
    (7, 0, [(0, 1), (1, 1), (0, 6), (1, 2)], (2, 4)), (7, 1, [(0, 0), (1, 1), (0, 6), (1, 2)], (2, 4)),
    (7, 2, [(0, 3), (1, 0), (0, 6), (1, 2)], (2, 4)), (7, 3, [(0, 2), (1, 0), (0, 6), (1, 2)], (2, 4)),
    (7, 4, [(0, 5), (0, 6), (2, 0)], (1, 2)), (7, 5, [(0, 4), (0, 6), (2, 0)], (1, 2)),
    (7, 6, [(1, 2), (2, 0)], None), (4, 2, [(0, 3), (1, 0)], None),
    (5, 3, [(0, 2), (1, 0), (0, 4)], (2, 3)), (6, 3, [(0, 2), (1, 0), (1, 2)], (2, 3)),
    (6, 4, [(0, 5), (2, 0)], None),
    (15, 10, [(0, 11), (1, 4), (0, 14), (1, 6), (3, 0)], (2, 4)),
    (31, 24, [(0, 25), (1, 13), (0, 30), (1, 14), (3, 2), (4, 0)], (2, 4)),
    (95, 81, [(0, 80), (1, 41), (2, 21), (0, 94), (1, 46), (2, 22), (4, 4), (6, 0)], (3, 6)),
]
CONSISTENCY_SHAPES = [
    (1, 2, [(0, 1)], None), (1, 4, [(0, 1), (1, 1)], None), (1, 6, [(0, 1), (1, 1), (1, 2)], (2, 3)),
    (2, 3, [(0, 2)], (0, 1)), (2, 8, [(1, 1), (2, 1)], None),
    (3, 7, [(0, 2), (0, 3), (1, 0), (0, 6), (1, 2)], (3, 5)), (4, 7, [(0, 6), (1, 2)], (0, 2)),
    (5, 7, [(0, 4), (0, 5), (0, 6), (2, 0)], (2, 3)), (6, 7, [(1, 2), (0, 6), (2, 0)], (1, 2)),
    (7, 8, [(0, 6), (0, 7), (1, 2), (2, 0)], None),
    (1, 1, [], None), (2, 2, [], None), (3, 3, [], None), (4, 4, [], None), (5, 5, [], None),
    (7, 7, [], None), (8, 8, [], None),
    (2, 4, [(1, 1)], None), (3, 5, [(0, 2), (0, 3), (1, 0), (0, 4)], (3, 4)),
    (3, 6, [(0, 2), (0, 3), (1, 0), (1, 2)], (3, 4)), (4, 6, [(1, 2)], (0, 1)),
    (1, 7, [(0, 1), (1, 1), (0, 6), (1, 2)], (2, 4)),
    (10, 15, [(1, 4), (1, 5), (0, 14), (1, 6), (3, 0)], (2, 4)),
    (24, 31, [(3, 2), (0, 30), (1, 14), (2, 6), (4, 0)], (1, 4)),
    (81, 95, [(0, 80), (0, 81), (1, 41), (2, 21), (0, 94), (1, 46), (2, 22), (4, 4), (6, 0)], (4, 7)),
]

GOLDEN_LEAVES = [leaf_hash(entry) for entry in LEAF_INPUTS]
# genEntries(n) of testonly/tree_test.go: entry i is the decimal string of i.
GENERATED_LEAVES = [leaf_hash(str(i).encode()) for i in range(128)]


def _flip(h: bytes, mask: int) -> bytes:
    return bytes([h[0] ^ mask]) + h[1:]


# ---------------------------------------------------------------------------
# Hashing


def test_rfc6962_hasher_vectors() -> None:
    assert EMPTY_ROOT.hex() == EMPTY_ROOT_HEX
    assert leaf_hash(b"").hex() == "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
    assert leaf_hash(b"L123456").hex() == "395aa064aa4c29f7010acfe3f25db9485bbd4b91897b6ad7ad547639252b4d56"
    assert node_hash(b"N123", b"N456").hex() == "aa217fe888e47007fa15edab33c2b492a722cb106c64667fc2b044444de66bbb"


def test_domain_separation() -> None:
    """rfc6962_test.go TestRFC6962HasherCollisions: leaves and nodes never collide, order matters."""
    h1, h2 = leaf_hash(b"Hello"), leaf_hash(b"World")
    assert h1 != h2
    assert node_hash(h1, h2) != leaf_hash(h1 + h2)
    assert node_hash(h1, h2) != node_hash(h2, h1)
    assert EMPTY_ROOT != leaf_hash(b"")


def test_node_hashes_are_the_perfect_subtrees() -> None:
    for level, hashes in enumerate(NODE_HASHES):
        for index, want in enumerate(hashes):
            width = 1 << level
            assert root_hash(GOLDEN_LEAVES[index * width:(index + 1) * width]) == want, (level, index)


# ---------------------------------------------------------------------------
# Generation reproduces the vectors


@pytest.mark.parametrize("size", range(len(ROOT_HASHES)))
def test_root_hash_vectors(size: int) -> None:
    assert root_hash(GOLDEN_LEAVES[:size]) == ROOT_HASHES[size]


@pytest.mark.parametrize(("leaf", "size", "proof"), INCLUSION_VECTORS)
def test_inclusion_proof_vectors(leaf: int, size: int, proof: list[bytes]) -> None:
    assert inclusion_proof(GOLDEN_LEAVES[:size], leaf - 1) == proof
    tree = MerkleTree()
    for h in GOLDEN_LEAVES:
        tree.append(h)
    assert tree.inclusion_proof(leaf - 1, size) == proof
    verify_inclusion(index=leaf - 1, size=size, leaf=GOLDEN_LEAVES[leaf - 1], proof=proof, root=ROOT_HASHES[size])


@pytest.mark.parametrize(("size1", "size2", "proof"), CONSISTENCY_VECTORS)
def test_consistency_proof_vectors(size1: int, size2: int, proof: list[bytes]) -> None:
    assert consistency_proof(GOLDEN_LEAVES[:size2], size1) == proof
    tree = MerkleTree()
    for h in GOLDEN_LEAVES:
        tree.append(h)
    assert tree.consistency_proof(size1, size2) == proof
    verify_consistency(
        old_size=size1, new_size=size2, old_root=ROOT_HASHES[size1], new_root=ROOT_HASHES[size2], proof=proof
    )


def _expected_from_shape(leaves: Sequence[bytes], ids: list[tuple[int, int]], rehash: Any) -> list[bytes]:
    hashes = [root_hash(leaves[index << level:(index + 1) << level]) for level, index in ids]
    if rehash is None:
        return hashes
    begin, end = rehash
    folded = hashes[begin]
    for h in hashes[begin + 1:end]:
        folded = node_hash(h, folded)
    return hashes[:begin] + [folded] + hashes[end:]


def test_shape_vectors_are_wired_to_the_golden_node_hashes() -> None:
    """The node-id translation agrees with NodeHashes(): id (1, 2) is node i, (2, 0) is node k."""
    assert _expected_from_shape(GOLDEN_LEAVES, [(1, 2), (2, 0)], None) == [NODE_HASHES[1][2], NODE_HASHES[2][0]]
    l_node = node_hash(NODE_HASHES[1][2], NODE_HASHES[0][6])  # l = H(i, j) in the size-7 tree
    assert _expected_from_shape(GOLDEN_LEAVES, [(0, 6), (1, 2)], (0, 2)) == [l_node]


@pytest.mark.parametrize(("size", "index", "ids", "rehash"), INCLUSION_SHAPES)
def test_inclusion_proof_shapes(size: int, index: int, ids: list[tuple[int, int]], rehash: Any) -> None:
    want = _expected_from_shape(GENERATED_LEAVES, ids, rehash)
    assert inclusion_proof(GENERATED_LEAVES[:size], index) == want
    verify_inclusion(index=index, size=size, leaf=GENERATED_LEAVES[index], proof=want,
                     root=root_hash(GENERATED_LEAVES[:size]))


@pytest.mark.parametrize(("size1", "size2", "ids", "rehash"), CONSISTENCY_SHAPES)
def test_consistency_proof_shapes(size1: int, size2: int, ids: list[tuple[int, int]], rehash: Any) -> None:
    want = _expected_from_shape(GENERATED_LEAVES, ids, rehash)
    assert consistency_proof(GENERATED_LEAVES[:size2], size1) == want
    verify_consistency(old_size=size1, new_size=size2, old_root=root_hash(GENERATED_LEAVES[:size1]),
                       new_root=root_hash(GENERATED_LEAVES[:size2]), proof=want)


# testonly/reference_test.go: the RFC's recursive definitions, written out directly.
def _ref_root(leaves: Sequence[bytes]) -> bytes:
    if not leaves:
        return EMPTY_ROOT
    if len(leaves) == 1:
        return leaves[0]
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    return node_hash(_ref_root(leaves[:k]), _ref_root(leaves[k:]))


def _ref_inclusion(leaves: Sequence[bytes], index: int) -> list[bytes]:
    if len(leaves) == 1:
        return []
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    if index < k:
        return _ref_inclusion(leaves[:k], index) + [_ref_root(leaves[k:])]
    return _ref_inclusion(leaves[k:], index - k) + [_ref_root(leaves[:k])]


def _ref_consistency(leaves: Sequence[bytes], size1: int, have_root1: bool = True) -> list[bytes]:
    if size1 == len(leaves):
        return [] if have_root1 else [_ref_root(leaves)]
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    if size1 <= k:
        return _ref_consistency(leaves[:k], size1, have_root1) + [_ref_root(leaves[k:])]
    return _ref_consistency(leaves[k:], size1 - k, False) + [_ref_root(leaves[:k])]


@pytest.mark.parametrize("size", [*range(1, 34), 64, 65, 100, 127, 128])
def test_against_reference_implementation(size: int) -> None:
    leaves = GENERATED_LEAVES[:size]
    assert root_hash(leaves) == _ref_root(leaves)
    for index in range(size):
        assert inclusion_proof(leaves, index) == _ref_inclusion(leaves, index), index
    for size1 in range(1, size + 1):
        assert consistency_proof(leaves, size1) == _ref_consistency(leaves, size1), size1


# ---------------------------------------------------------------------------
# Negative probes: cmd/proofgen/main.go invalidInclusionProof, staticInclusionProbes,
# singleEntryInclusionProbes, invalidConsistencyProof and staticConsistencyProbes.


def _inclusion_probes() -> list[Any]:
    probes = []
    for n, (leaf, size, proof) in enumerate(INCLUSION_VECTORS):
        index, root, lh = leaf - 1, ROOT_HASHES[size], GOLDEN_LEAVES[leaf - 1]
        cases = [
            ("leafIdx sub 1", index - 1, size, lh, proof, root),
            ("leafIdx plus 1", index + 1, size, lh, proof, root),
            ("leafIdx XOR 2", index ^ 2, size, lh, proof, root),
            ("treeSize mul 2", index, size * 2, lh, proof, root),
            ("treeSize div 2", index, size // 2, lh, proof, root),
            ("wrong leaf", index, size, b"WrongLeaf", proof, root),
            ("empty root", index, size, lh, proof, EMPTY_ROOT),
            ("random root", index, size, lh, proof, SOME_HASH),
            ("trailing garbage", index, size, lh, [*proof, b""], root),
            ("trailing root", index, size, lh, [*proof, root], root),
            ("preceding garbage", index, size, lh, [b"", *proof], root),
            ("preceding root", index, size, lh, [root, *proof], root),
        ]
        for i in range(len(proof)):
            wrong = list(proof)
            wrong[i] = _flip(wrong[i], 8)
            cases.append((f"modified proof[{i}] bit 3", index, size, lh, wrong, root))
        if proof:
            cases.append(("removed component", index, size, lh, proof[:-1], root))
        if len(proof) > 1:
            cases.append(("inserted component", index, size, lh, [proof[0], SOME_HASH, *proof[1:]], root))
        happy = (index, size, lh, proof, root)
        probes += [pytest.param(*c[1:], id=f"{n}-{c[0]}") for c in cases if c[1:] != happy]  # only real changes
    for index, size in [(0, 0), (0, 1), (1, 0), (2, 1)]:
        probes += [
            pytest.param(index, size, SOME_HASH, [], b"", id=f"additional-{index}-{size}-random leaf"),
            pytest.param(index, size, b"", [], EMPTY_ROOT, id=f"additional-{index}-{size}-empty root"),
            pytest.param(index, size, SOME_HASH, [], EMPTY_ROOT, id=f"additional-{index}-{size}-both"),
        ]
    data_hash = leaf_hash(b"data")
    probes += [
        pytest.param(0, 1, b"", [], data_hash, id="single-entry-empty leaf"),
        pytest.param(0, 1, data_hash, [], b"", id="single-entry-empty root"),
        pytest.param(0, 1, b"", [], b"", id="single-entry-empty root and leaf"),
    ]
    return probes


@pytest.mark.parametrize(("index", "size", "leaf", "proof", "root"), _inclusion_probes())
def test_inclusion_probe_rejected(index: int, size: int, leaf: bytes, proof: list[bytes], root: bytes) -> None:
    with pytest.raises(ProofError):
        verify_inclusion(index=index, size=size, leaf=leaf, proof=proof, root=root)


def test_single_entry_matching_root_and_leaf_verifies() -> None:
    data_hash = leaf_hash(b"data")
    verify_inclusion(index=0, size=1, leaf=data_hash, proof=[], root=data_hash)


def _consistency_probes() -> list[Any]:
    probes = []
    for n, (size1, size2, proof) in enumerate(CONSISTENCY_VECTORS):
        if not proof:  # proofgen mutates only non-trivial proofs; the static probes cover the rest
            continue
        r1, r2 = ROOT_HASHES[size1], ROOT_HASHES[size2]
        cases = [
            ("size1 sub 1", size1 - 1, size2, r1, r2, proof),
            ("size1 plus 1", size1 + 1, size2, r1, r2, proof),
            ("size1 XOR 2", size1 ^ 2, size2, r1, r2, proof),
            ("size2 mul 2", size1, size2 * 2, r1, r2, proof),
            ("size2 div 2", size1, size2 // 2, r1, r2, proof),
            ("wrong root1", size1, size2, b"WrongRoot", r2, proof),
            ("wrong root2", size1, size2, r1, b"WrongRoot", proof),
            ("swapped roots", size1, size2, r2, r1, proof),
            ("empty proof", size1, size2, r1, r2, []),
            ("trailing garbage", size1, size2, r1, r2, [*proof, b""]),
            ("trailing root1", size1, size2, r1, r2, [*proof, r1]),
            ("trailing root2", size1, size2, r1, r2, [*proof, r2]),
            ("preceding garbage", size1, size2, r1, r2, [b"", *proof]),
            ("preceding root1", size1, size2, r1, r2, [r1, *proof]),
            ("preceding root2", size1, size2, r1, r2, [r2, *proof]),
            ("preceding proof 0", size1, size2, r1, r2, [proof[0], *proof]),
            ("truncated proof", size1, size2, r1, r2, proof[:-1]),
        ]
        for i in range(len(proof)):
            wrong = list(proof)
            wrong[i] = _flip(wrong[i], 16)
            cases.append((f"modified proof {i} bit 4", size1, size2, r1, r2, wrong))
        happy = (size1, size2, r1, r2, proof)
        probes += [pytest.param(*c[1:], id=f"{n}-{c[0]}") for c in cases if c[1:] != happy]
    root1, root2, one_hash = b"don't care 1", b"don't care 2", [EMPTY_ROOT]
    for size1, size2, r1, r2, proof, desc in [
        (0, 0, root1, root2, [], "sizes are equal (zero) but roots are not"),
        (1, 1, root1, root2, [], "sizes are equal (one) but roots are not"),
        (0, 0, root1, root1, [], "sizes are equal (zero) and proof is empty"),
        (0, 1, root1, root2, [], "size1 is zero and does not equal size2"),
        (1, 0, root1, root2, [], "size1 is greater than size2"),
        (2, 1, root1, root2, [], "size1 is greater than size2 again"),
        (1, 2, root1, root2, [], "sizes do not match and proof is empty"),
        (0, 0, EMPTY_ROOT, root2, [], "roots do not match and sizes are zero"),
        (1, 1, EMPTY_ROOT, root2, [], "roots do not match and sizes are one"),
        (0, 0, EMPTY_ROOT, EMPTY_ROOT, one_hash, "sizes match but proof is not empty and sizes are zero"),
        (1, 1, EMPTY_ROOT, EMPTY_ROOT, one_hash, "sizes match but proof is not empty and sizes are one"),
        (0, 1, EMPTY_ROOT, root2, [], "size1 is zero and size2 is not zero"),
        (0, 1, EMPTY_ROOT, EMPTY_ROOT, one_hash, "consistency check on empty tree (size1 is zero) is useless"),
        # Ours: size1 = 0 with a non-empty proof and a true size2 root, and a real log shrinking.
        (0, 8, EMPTY_ROOT, ROOT_HASHES[8], CONSISTENCY_VECTORS[1][2], "size1 is zero, proof and root2 genuine"),
        (8, 6, ROOT_HASHES[8], ROOT_HASHES[6], CONSISTENCY_VECTORS[2][2], "genuine proof with sizes swapped"),
    ]:
        probes.append(pytest.param(size1, size2, r1, r2, proof, id=f"additional-{desc}"))
    return probes


@pytest.mark.parametrize(("size1", "size2", "root1", "root2", "proof"), _consistency_probes())
def test_consistency_probe_rejected(size1: int, size2: int, root1: bytes, root2: bytes, proof: list[bytes]) -> None:
    with pytest.raises(ProofError):
        verify_consistency(old_size=size1, new_size=size2, old_root=root1, new_root=root2, proof=proof)


def test_equal_sizes_with_equal_roots_verify() -> None:
    """staticConsistencyProbes' one accepted probe: sizes equal (one), proof empty, roots equal (any bytes)."""
    verify_consistency(old_size=1, new_size=1, old_root=b"don't care 2", new_root=b"don't care 2", proof=[])


def test_proof_errors_say_what_is_wrong() -> None:
    leaf, size, proof = INCLUSION_VECTORS[1]
    with pytest.raises(ProofError, match="want 3"):
        verify_inclusion(index=leaf - 1, size=size, leaf=GOLDEN_LEAVES[0], proof=proof[:2], root=ROOT_HASHES[8])
    with pytest.raises(ProofError, match=r"leaf_hash\(entry\)"):
        verify_inclusion(index=0, size=8, leaf=LEAF_INPUTS[5], proof=proof, root=ROOT_HASHES[8])
    with pytest.raises(ProofError, match=ROOT_HASHES[7].hex()):
        verify_inclusion(index=0, size=8, leaf=GOLDEN_LEAVES[0], proof=proof, root=ROOT_HASHES[7])
    with pytest.raises(ProofError, match="proof element 1 is 31 bytes"):
        verify_inclusion(index=0, size=8, leaf=GOLDEN_LEAVES[0], proof=[proof[0], proof[1][:31], proof[2]],
                         root=ROOT_HASHES[8])
    with pytest.raises(ProofError, match="empty tree"):
        verify_consistency(old_size=0, new_size=8, old_root=EMPTY_ROOT, new_root=ROOT_HASHES[8], proof=[])
    with pytest.raises(ProofError, match="old tree of size 6"):
        verify_consistency(old_size=6, new_size=8, old_root=ROOT_HASHES[5], new_root=ROOT_HASHES[8],
                           proof=CONSISTENCY_VECTORS[2][2])
    assert issubclass(ProofError, ValueError)


# ---------------------------------------------------------------------------
# Generator argument checks


@pytest.mark.parametrize(("size", "index"), [(0, 0), (0, 1), (1, 2), (0, 3), (7, 8), (7, 7), (5, -1)])
def test_inclusion_proof_rejects_out_of_range(size: int, index: int) -> None:
    with pytest.raises(ValueError, match="out of range|empty tree"):
        inclusion_proof(GENERATED_LEAVES[:size], index)


@pytest.mark.parametrize(("size1", "size2"), [(5, 0), (9, 8), (0, 5), (0, 0), (-1, 3)])
def test_consistency_proof_rejects_out_of_range(size1: int, size2: int) -> None:
    with pytest.raises(ValueError, match="0 < old_size <= new_size"):
        consistency_proof(GENERATED_LEAVES[:size2], size1)


# ---------------------------------------------------------------------------
# MerkleTree


def test_tree_one_leaf_at_a_time_matches_root_hashes() -> None:
    tree = MerkleTree()
    assert tree.size == 0
    assert tree.root() == ROOT_HASHES[0]
    for i, h in enumerate(GOLDEN_LEAVES):
        assert tree.append(h) == i
        assert tree.size == i + 1
        assert tree.root() == ROOT_HASHES[i + 1]
        for past in range(i + 2):
            assert tree.root_at(past) == ROOT_HASHES[past]


def test_tree_proofs_default_to_the_current_size() -> None:
    tree = MerkleTree()
    for h in GOLDEN_LEAVES[:5]:
        tree.append(h)
    assert tree.inclusion_proof(1) == INCLUSION_VECTORS[4][2]
    assert tree.consistency_proof(2) == CONSISTENCY_VECTORS[3][2]


def test_tree_root_uses_the_compact_range(monkeypatch: pytest.MonkeyPatch) -> None:
    tree = MerkleTree()
    for h in GENERATED_LEAVES[:100]:
        tree.append(h)
    calls = []
    real = merkle.node_hash
    monkeypatch.setattr(merkle, "node_hash", lambda left, right: calls.append(1) or real(left, right))
    root = tree.root()
    assert len(calls) == bin(100).count("1") - 1  # one hash per extra perfect subtree, not a recompute
    assert root == root_hash(GENERATED_LEAVES[:100])


def test_tree_rejects_bad_arguments() -> None:
    tree = MerkleTree()
    for bad in (b"", b"x" * 31, b"x" * 33, "a" * 32):
        with pytest.raises(ValueError, match="32-byte leaf hash"):
            tree.append(bad)  # type: ignore[arg-type]
    assert tree.size == 0
    for h in GOLDEN_LEAVES[:4]:
        tree.append(h)
    for call in (lambda: tree.root_at(5), lambda: tree.root_at(-1), lambda: tree.inclusion_proof(0, 5),
                 lambda: tree.inclusion_proof(4), lambda: tree.inclusion_proof(0, 0),
                 lambda: tree.consistency_proof(0), lambda: tree.consistency_proof(3, 5),
                 lambda: tree.consistency_proof(4, 3)):
        with pytest.raises(ValueError):
            call()


@pytest.mark.timeout(120)
def test_hundred_thousand_leaves() -> None:
    n = 100_000
    leaves = [leaf_hash(b"audit-%d" % i) for i in range(n)]
    tree = MerkleTree()
    for h in leaves:
        tree.append(h)
    root = tree.root()
    assert root == root_hash(leaves)
    for index in (0, 31_337, n - 1):
        verify_inclusion(index=index, size=n, leaf=leaves[index], proof=tree.inclusion_proof(index), root=root)
    old = 65_537
    verify_consistency(old_size=old, new_size=n, old_root=tree.root_at(old), new_root=root,
                       proof=tree.consistency_proof(old))


# ---------------------------------------------------------------------------
# Property: every proof we generate verifies; the incremental root is the full recompute.


@settings(max_examples=25, deadline=None)
@given(size=st.integers(min_value=1, max_value=300), salt=st.binary(max_size=8), data=st.data())
def test_random_trees_generate_verifiable_proofs(size: int, salt: bytes, data: st.DataObject) -> None:
    leaves = [hashlib.sha256(salt + i.to_bytes(4, "big")).digest() for i in range(size)]
    tree = MerkleTree()
    roots = [tree.root()]
    for i, h in enumerate(leaves):
        tree.append(h)
        roots.append(tree.root())
        assert roots[-1] == root_hash(leaves[:i + 1]), i + 1
    assert roots[0] == EMPTY_ROOT
    for index in range(size):
        verify_inclusion(index=index, size=size, leaf=leaves[index], proof=inclusion_proof(leaves, index),
                         root=roots[size])
    for old in range(1, size + 1):
        verify_consistency(old_size=old, new_size=size, old_root=roots[old], new_root=roots[size],
                           proof=consistency_proof(leaves, old))
    past = data.draw(st.integers(min_value=1, max_value=size), label="past size")
    index = data.draw(st.integers(min_value=0, max_value=past - 1), label="index")
    old = data.draw(st.integers(min_value=1, max_value=past), label="old size")
    assert tree.root_at(past) == roots[past]
    verify_inclusion(index=index, size=past, leaf=leaves[index], proof=tree.inclusion_proof(index, past),
                     root=roots[past])
    verify_consistency(old_size=old, new_size=past, old_root=roots[old], new_root=roots[past],
                       proof=tree.consistency_proof(old, past))
