"""Random generators nobody can regenerate: torch CPU generators whose whole Mersenne Twister state is OS entropy.

Why not `torch.Generator().manual_seed(os.urandom(8))` or `.seed()`: torch's
CPU generator initialises its MT19937 from the low 32 bits of the seed, so
any seed gives one of 2^32 streams (seeds s and s + 2^32 train bit-identical
models). Whoever sees some of a stream's output can then search all 2^32
offline and predict the rest: a coordinator asking for randomized-response
bits of pairs whose truth it knows would undo every later flip. Here all 624
words of the state come from `os.urandom` (19,968 bits), as `random.seed()`
does for Python's own Mersenne Twister. Mersenne Twister is not a
cryptographic generator either; `DPConfig.secure_mode` has Opacus draw from a
CSPRNG where that is wanted.
"""

from __future__ import annotations

import os
import struct

import torch

# torch's CPU generator state as get_state/set_state read it (aten/src/ATen/CPUGeneratorImpl.cpp,
# CPUGeneratorImplStateLegacy): u64 initial seed, i32 left, i32 seeded, u64 next, u64 state[624] (each a 32-bit
# word), then the normal-sample caches; 5056 bytes in torch 2.13.
_STATE_BYTES = 5056
_LEFT_AT, _WORDS_AT, _WORDS = 8, 24, 624


def os_entropy_generator() -> torch.Generator:
    """A CPU generator whose 624-word MT19937 state is fresh OS entropy (see the module docstring)."""
    generator = torch.Generator()
    state = bytearray(generator.get_state().numpy().tobytes())
    if len(state) != _STATE_BYTES:
        raise RuntimeError(f"torch's CPU generator state is {len(state)} bytes, not the {_STATE_BYTES} this code "
                           "fills; check mor_secure/privacy/os_entropy.py against this torch version")
    words = struct.unpack(f"={_WORDS}I", os.urandom(4 * _WORDS))
    struct.pack_into(f"={_WORDS}Q", state, _WORDS_AT, *words)
    struct.pack_into("=i", state, _LEFT_AT, 1)  # one word left: the whole state is twisted before the first draw
    generator.set_state(torch.frombuffer(state, dtype=torch.uint8).clone())
    return generator
