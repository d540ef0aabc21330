"""Generators nobody can regenerate: every word of the Mersenne Twister state is OS entropy, not a 32-bit seed."""

from __future__ import annotations

import torch
from silo_fakes import RightAnswerModel

from mor_secure.privacy import os_entropy
from mor_secure.privacy.os_entropy import os_entropy_generator
from silo_agent.service import SiloService


def test_a_seed_keeps_only_32_bits_which_is_why_the_state_is_filled_instead() -> None:
    """The premise: torch's CPU generator reads 32 bits of a seed, so os.urandom(8) as a seed is 2^32 streams."""
    streams = [torch.rand(8, generator=torch.Generator().manual_seed(seed)) for seed in (12345, 12345 + 2**32)]
    assert torch.equal(*streams)


def test_every_word_of_the_state_comes_from_os_entropy(monkeypatch) -> None:
    """Entropy differing only in the state's last word gives another stream: all 624 words are used (output 226
    is the first that reads word 623 after the twist, so 1000 draws see it)."""
    base = bytes(range(256)) * 9 + bytes(192)  # 2496 bytes: 624 words
    last_word_changed = base[:-4] + b"\x01\x02\x03\x04"
    draws = []
    for entropy in (base, last_word_changed, base):
        monkeypatch.setattr(os_entropy.os, "urandom", lambda n, entropy=entropy: entropy[:n])
        draws.append(torch.rand(1000, generator=os_entropy_generator()))
    assert torch.equal(draws[0], draws[2])  # the stream is the state, nothing else
    assert not torch.equal(draws[0], draws[1])
    assert torch.equal(draws[0][:226], draws[1][:226])  # as MT19937's twist says: only later outputs read word 623


def test_two_generators_differ_and_draw_standard_normals() -> None:
    first, second = os_entropy_generator(), os_entropy_generator()
    samples = torch.randn(200_000, generator=first)
    assert not torch.equal(samples[:100], torch.randn(100, generator=second))
    assert abs(samples.mean().item()) < 0.01 and abs(samples.std().item() - 1) < 0.01


def test_a_silos_randomized_response_draws_from_such_a_generator() -> None:
    """`Generator.seed()` once gave it a state that its own 32-bit initial seed reproduces."""
    generator = SiloService("hospital-a", RightAnswerModel())._generator
    reseeded = torch.Generator().manual_seed(generator.initial_seed())
    assert not torch.equal(generator.get_state(), reseeded.get_state())
