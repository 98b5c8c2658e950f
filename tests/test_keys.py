"""The uploaded public key: a seed for its uniform half plus one polynomial, and as good as
SEAL's own key for the encryptions of zero that re-randomize every result."""

from __future__ import annotations

import pytest
import tenseal.sealapi as seal

import heinfer
from heinfer.errors import MalformedPayloadError
from heinfer.he.backend import SEED_BYTES, Context, EvaluationKey, SecretKey
from heinfer.plans.linear import LinearCodec


@pytest.fixture(scope="module")
def context(mnist_model: heinfer.EncryptedModel) -> Context:
    return LinearCodec(mnist_model.manifest).context


def _budgets(context: Context, secret: SecretKey, encrypt_zero: object, count: int) -> list[int]:
    decryptor = seal.Decryptor(context.seal_context, secret._secret)
    budgets = []
    for _ in range(count):
        zero = encrypt_zero()  # type: ignore[operator]
        plain = seal.Plaintext()
        decryptor.decrypt(zero, plain)
        assert plain.is_zero()
        budgets.append(decryptor.invariant_noise_budget(zero))
    return budgets


def test_public_key_upload_is_a_seed_and_one_polynomial(context: Context) -> None:
    secret = SecretKey.generate(context)
    public = secret.public_key_bytes()
    polynomial = sum((context.n * q.bit_length() + 7) // 8 for q in context.params.coeff_modulus)
    assert len(public) == context.public_key_bytes == SEED_BYTES + polynomial
    assert len(public) < 0.51 * 2 * polynomial  # SEAL's key, bit-packed, is two polynomials
    again = secret.public_key_bytes()
    assert again[:SEED_BYTES] != public[:SEED_BYTES]  # a fresh seed for every key made
    assert again[SEED_BYTES:] != public[SEED_BYTES:]


def test_seeded_public_key_encrypts_as_well_as_seals_own(context: Context) -> None:
    secret = SecretKey.generate(context)
    public = secret.public_key_bytes()
    key = EvaluationKey.from_bytes(context, public)
    seals_key = seal.PublicKey()
    seal.KeyGenerator(context.seal_context, secret._secret).create_public_key(seals_key)
    encryptor = seal.Encryptor(context.seal_context, seals_key)

    def seals_zero() -> seal.Ciphertext:
        zero = seal.Ciphertext()
        encryptor.encrypt_zero(zero)
        return zero

    ours = _budgets(context, secret, key.encrypt_zero, 8)
    theirs = _budgets(context, secret, seals_zero, 8)
    assert min(ours) >= min(theirs) - 1 and max(ours) <= max(theirs) + 1
    assert min(ours) > 30  # bits of noise budget left in a fresh encryption here


def test_a_public_key_whose_halves_do_not_match_decrypts_nothing(context: Context) -> None:
    """Negative control for the test above: another seed gives another a, and pk0 no longer
    equals -(a*s + e), so its encryptions of zero carry no noise budget at all."""
    secret = SecretKey.generate(context)
    public = secret.public_key_bytes()
    tampered = bytes([public[0] ^ 1]) + public[1:]
    key = EvaluationKey.from_bytes(context, tampered)
    decryptor = seal.Decryptor(context.seal_context, secret._secret)
    assert decryptor.invariant_noise_budget(key.encrypt_zero()) == 0


@pytest.mark.parametrize("cut", [1, SEED_BYTES, -1])
def test_public_key_of_the_wrong_size_is_refused_with_the_size_expected(
    context: Context, cut: int
) -> None:
    public = SecretKey.generate(context).public_key_bytes()
    data = public[cut:] if cut > 0 else public + b"\0"
    with pytest.raises(MalformedPayloadError, match=f"must be {len(public)} bytes"):
        EvaluationKey.from_bytes(context, data)


def test_public_key_coefficient_out_of_range_is_refused(context: Context) -> None:
    public = bytearray(SecretKey.generate(context).public_key_bytes())
    bits = context.params.coeff_modulus[0].bit_length()
    public[SEED_BYTES : SEED_BYTES + (bits + 7) // 8] = b"\xff" * ((bits + 7) // 8)
    with pytest.raises(MalformedPayloadError, match="out of range"):
        EvaluationKey.from_bytes(context, bytes(public))
