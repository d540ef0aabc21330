"""The cryptographic core of secure aggregation: exact sums, masks that hide, keys that cannot be swapped.

Real TenSEAL BFV, real X25519 and ECDSA keys from the project's PKI.
"""

from __future__ import annotations

import numpy as np
import pytest
from crafted_vectors import redeclared
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mor_secure.secagg import aggregation, he_context, masks
from mor_secure.secagg.agreement import AgreementKeyError, new_agreement_key, verified_agreement_key
from mor_secure.secagg.fixed_point import MAX_ABS_TERM, PLAIN_MODULUS, add_mod, decode, encode


@pytest.fixture(scope="module")
def contexts():
    secret = he_context.new_secret_context()
    return he_context.load_secret(he_context.secret_bytes(secret)), he_context.load_public(he_context.public_bytes(secret))


def silo_keys(count: int) -> tuple[dict, dict]:
    private = {f"silo-{i}": x25519.X25519PrivateKey.generate() for i in range(count)}
    return private, {name: key.public_key() for name, key in private.items()}


def secure_sum(terms: dict[str, np.ndarray], contexts, round_id: str = "round-1") -> np.ndarray:
    secret, public = contexts
    names = sorted(terms)
    private = {name: x25519.X25519PrivateKey.generate() for name in names}
    public_keys = {name: key.public_key() for name, key in private.items()}
    count = len(next(iter(terms.values())))
    contributions = [aggregation.contribution(terms[n], masks.mask(private[n], public_keys, me=n, round_id=round_id,
                                                                      count=count), public) for n in names]
    blinding = aggregation.new_blinding(count)
    blinded = aggregation.blind(aggregation.add([aggregation.vector(c, public, items=count) for c in contributions]),
                                blinding)
    return aggregation.unblind(aggregation.decrypt(blinded, secret), blinding, count)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(2, 8), st.integers(1, 64), st.integers(0, 2**32 - 1))
def test_the_secure_fused_reward_equals_the_clear_one(contexts, silos: int, items: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.ones(silos), size=items)  # [items, silos], rows sum to 1
    scores = rng.normal(scale=3.0, size=(items, silos))
    terms = {f"silo-{k}": weights[:, k] * scores[:, k] for k in range(silos)}
    assert np.abs(secure_sum(terms, contexts) - (weights * scores).sum(axis=1)).max() < 1e-4


def test_the_masks_cancel_exactly_over_the_participants() -> None:
    private, public = silo_keys(5)
    total = add_mod(*[masks.mask(private[n], public, me=n, round_id="r", count=500) for n in private])
    assert not total.any()
    # A different round id gives unrelated masks.
    a = masks.mask(private["silo-0"], public, me="silo-0", round_id="r", count=500)
    b = masks.mask(private["silo-0"], public, me="silo-0", round_id="r2", count=500)
    assert not np.array_equal(a, b)


# As a raw HKDF salt, a round id was an HMAC key, and HMAC pads a short key with zeros: "r" and "r\x00" were
# one key, so a coordinator could ask a silo twice under the same masks and difference the two answers.
@pytest.mark.parametrize("round_id, other", [("r", "r\x00"), ("r", "r\x00\x00"), ("x" * 63, "x" * 63 + "\x00")])
def test_every_distinct_round_id_gets_its_own_masks(round_id: str, other: str) -> None:
    private, public = silo_keys(2)
    a, b = (masks.mask(private["silo-0"], public, me="silo-0", round_id=r, count=64) for r in (round_id, other))
    assert not np.array_equal(a, b)


def test_one_silos_ciphertext_alone_decrypts_to_values_uncorrelated_with_its_scores(contexts) -> None:
    # Over 1000 items |r| of a truly random mask has a standard deviation of about 1/sqrt(1000) = 0.032, so one
    # draw exceeds 0.05 about 12% of the time: the check averages 20 independent rounds (fresh keys, round ids
    # and scores) and also asks that no single one is far off.
    secret, public = contexts
    correlations = []
    for trial in range(20):
        private, public_keys = silo_keys(3)
        terms = np.random.default_rng(trial).normal(size=1000)
        own = aggregation.contribution(terms, masks.mask(private["silo-0"], public_keys, me="silo-0",
                                                         round_id=f"r{trial}", count=1000), public)
        seen = decode(aggregation.decrypt(own, secret))  # even with the secret key, one silo's vector is noise
        correlations.append(abs(np.corrcoef(seen, terms)[0, 1]))
    assert np.mean(correlations) < 0.05 and max(correlations) < 0.15, correlations


def test_the_coordinators_public_context_cannot_decrypt(contexts) -> None:
    _, public = contexts
    ciphertext = aggregation.contribution([1.0, 2.0], np.zeros(2, dtype=np.int64), public)
    with pytest.raises(ValueError, match="doesn't hold a secret_key"):
        aggregation.decrypt(ciphertext, public)
    with pytest.raises(ValueError, match="holds the secret key; the coordinator must only ever get the public one"):
        he_context.load_public(he_context.secret_bytes(contexts[0]))


@pytest.mark.parametrize(("sizes", "copies", "declared"), [
    ([100_000], 1, "1 ciphertext.s. declaring 100000 items"),  # read 91,808 values past the 8,192 slots
    ([8193], 1, "1 ciphertext.s. declaring 8193 items"),
    ([], 1, "1 ciphertext.s. declaring 0 items"),  # decrypt read sizes[0] of an empty list
    ([2, 2], 2, "2 ciphertext.s. declaring 4 items"),
])
def test_a_vector_declaring_other_than_one_ciphertext_of_at_most_8192_items_is_refused_before_decryption(
        contexts, sizes, copies, declared) -> None:
    """TenSEAL copies as many decoded slots as a vector declares: past 8192, the decryptor's heap."""
    secret, public = contexts
    honest = aggregation.contribution([1.0, 2.0], np.zeros(2, dtype=np.int64), public)
    crafted = redeclared(honest, sizes, copies)
    with pytest.raises(ValueError, match=f"{declared}, not one ciphertext of 1 to 8192 items"):
        aggregation.decrypt(crafted, secret)
    with pytest.raises(ValueError, match=f"{declared}, not one ciphertext of 2 items"):
        aggregation.vector(crafted, public, items=2)
    assert decode(aggregation.decrypt(redeclared(honest, [2]), secret)).tolist() == [1.0, 2.0]  # the same, declared right


def test_a_swapped_key_agreement_key_is_detected(pki) -> None:
    def certificate_key(kit):
        return serialization.load_pem_private_key(kit.key_path.read_bytes(), password=None)

    hospital, bank = pki.kits["hospital-a"], pki.kits["bank-b"]
    _, signed = new_agreement_key(certificate_key(hospital), hospital.certificate())
    verified_agreement_key(signed, hospital.certificate())
    # The coordinator relays keys: one swapped for its own, under hospital-a's name, fails hospital-a's signature.
    forged = type(signed)(party=signed.party, public_key=x25519.X25519PrivateKey.generate().public_key()
                          .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw),
                          signature=signed.signature)
    with pytest.raises(AgreementKeyError, match="not signed by its certificate key"):
        verified_agreement_key(forged, hospital.certificate())
    _, bank_key = new_agreement_key(certificate_key(bank), bank.certificate())
    with pytest.raises(AgreementKeyError, match="claims to be mor://silo/bank-b's, but the certificate is"):
        verified_agreement_key(bank_key, hospital.certificate())


def test_fixed_point_round_trips_and_refuses_what_it_cannot_hold() -> None:
    values = [0.0, 1.5, -2.25, 1e-6, -(MAX_ABS_TERM - 1)]
    assert np.abs(decode(encode(values)) - values).max() <= 2 ** -21
    assert (PLAIN_MODULUS - 1) % (2 * he_context.POLY_MODULUS_DEGREE) == 0  # a batching prime: one slot per item
    for bad in ([float("nan")], [float("inf")], [MAX_ABS_TERM]):
        with pytest.raises(ValueError):
            encode(bad)
