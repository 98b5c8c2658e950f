"""Uploaded keys travel seeded: the linear models' public key as a seed plus one polynomial,
the CKKS networks' keys in SEAL's own seeded form; each works as SEAL's own key does."""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import tenseal.sealapi as seal

import heinfer
from heinfer.errors import MalformedPayloadError
from heinfer.he import ckks
from heinfer.he.backend import Context, EvaluationKey, SecretKey
from heinfer.he.ckks import (
    KIND_GALOIS,
    KIND_PUBLIC,
    KIND_RELIN,
    CkksContext,
    ClientKeys,
    ServerKeys,
    galois_element,
    select_parameters,
)
from heinfer.he.scratch import SCRATCH
from heinfer.plans.linear import LinearCodec
from heinfer.rlwe.sampling import SEED_BYTES
from rlwe_helpers import bfv_context


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


# -- CKKS network keys: SEAL's own seeded form, written by us ------------------------------------


def _full_size_keys(client: Any, steps: list[int]) -> dict[str, bytes]:
    """SEAL's keys as the binding saves them (a travels whole), for comparison."""
    ctx = client.ctx
    public, relin, galois = seal.PublicKey(), seal.RelinKeys(), seal.GaloisKeys()
    client._keygen.create_public_key(public)
    client._keygen.create_relin_keys(relin)
    client._keygen.create_galois_keys([galois_element(s, ctx.n) for s in steps], galois)
    return {
        "public": ctx.wrap(KIND_PUBLIC, SCRATCH.save(public)),
        "relin": ctx.wrap(KIND_RELIN, SCRATCH.save(relin)),
        "galois": ctx.wrap(KIND_GALOIS, SCRATCH.save(galois)),
    }


def _seal_loaded(ctx: CkksContext, full: dict[str, bytes]) -> SimpleNamespace:
    """Full-form keys loaded by SEAL itself, past the server's seeded-form rule: the
    reference the seeded keys are compared with."""
    import tenseal.sealapi as seal

    from heinfer.he.ckks import KIND_GALOIS, KIND_PUBLIC, KIND_RELIN

    public = ctx._load(KIND_PUBLIC, seal.PublicKey(), full["public"])
    return SimpleNamespace(
        encryptor=ctx.encryptor(public),
        relin=ctx._load(KIND_RELIN, seal.RelinKeys(), full["relin"]),
        galois=ctx._load(KIND_GALOIS, seal.GaloisKeys(), full["galois"]),
    )


def _square_and_rotate(ctx: CkksContext, client: ClientKeys, keys: ServerKeys) -> np.ndarray:
    values = np.linspace(-1.0, 1.0, ctx.slots)
    ct = ctx.load_ciphertext(client.encrypt(values, 2.0**30))
    squared = ctx.multiply_relin_rescale(ct, ct, keys.relin)
    rotated = ctx.rotate(squared, 3, keys.galois)
    fresh = ctx.encrypt_public(keys.encryptor, ctx.encode(values, 2.0**30, ctx.top_count))
    return np.concatenate([client.decrypt_ciphertext(rotated), client.decrypt_ciphertext(fresh)])


def test_ckks_keys_travel_seeded_at_half_the_size_and_work_as_seals_own() -> None:
    ctx = CkksContext(select_parameters([40, 30, 40]))
    client = ClientKeys(ctx)
    steps = [1, 3]
    seeded = client.public_keys(steps)
    full = _full_size_keys(client, steps)
    for name in ("public", "relin", "galois"):
        assert len(seeded[name]) < 0.6 * len(full[name]), name
    values = np.linspace(-1.0, 1.0, ctx.slots)
    expected = np.concatenate([np.roll(values**2, -3), values])
    ours = _square_and_rotate(ctx, client, ServerKeys(ctx, seeded, steps, relin=True))
    with pytest.raises(MalformedPayloadError, match="seeded form"):  # the server's rule
        ServerKeys(ctx, full, steps, relin=True)
    theirs = _square_and_rotate(ctx, client, _seal_loaded(ctx, full))
    # CKKS error at scale 2**30 after a relinearization and a rotation: ~1e-6 typical, up to
    # ~1.4e-3 in the first slots (either key set); a key that does not match its seed is off
    # by > 1 (test below)
    assert np.abs(ours - expected).max() < 1e-2
    assert np.abs(theirs - expected).max() < 1e-2
    # typical error ~1.3e-6 with either key set: the seeded keys add no noise
    assert np.median(np.abs(ours - expected)) < 3 * np.median(np.abs(theirs - expected))


def test_ckks_seeded_keys_need_the_correction(monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control: without correcting k0 for the new a, the keys load but compute
    garbage, so the test above would catch a seeding that forgot it."""
    ctx = CkksContext(select_parameters([40, 30, 40]))
    client = ClientKeys(ctx)
    monkeypatch.setattr(ckks, "replace_uniform_half", lambda k0, *_: k0)
    keys = ServerKeys(ctx, client.public_keys([3]), [3], relin=True)
    values = np.linspace(-1.0, 1.0, ctx.slots)
    assert np.abs(_square_and_rotate(ctx, client, keys)[: ctx.slots]
                  - np.roll(values**2, -3)).max() > 1.0


# -- secret keys never touch a filesystem --------------------------------------------------------


def test_seal_objects_pass_through_memory_files_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Saving and loading a secret key opens no path but /proc/self/fd/N of a memfd, and with
    no memfd available the library raises instead of using a directory."""
    import builtins

    from heinfer.he import scratch

    opened: list[str] = []
    real_open = builtins.open
    monkeypatch.setattr(
        builtins, "open", lambda path, *a, **k: opened.append(str(path)) or real_open(path, *a, **k)
    )
    context = bfv_context()
    secret = SecretKey.generate(context)
    again = SecretKey.from_bytes(context, secret.to_bytes())
    monkeypatch.setattr(builtins, "open", real_open)
    assert again.ternary().tolist() == secret.ternary().tolist()
    assert opened == []  # SEAL opens the memfd itself; Python opens no file on the way
    fd, path = scratch._memory_file()
    try:
        assert os.readlink(path).startswith("/memfd:")
    finally:
        os.close(fd)
    monkeypatch.delattr(os, "memfd_create")
    with pytest.raises(scratch.ScratchUnavailableError):
        secret.to_bytes()
    monkeypatch.undo()
    monkeypatch.setattr(os.path, "exists", lambda path: False)
    with pytest.raises(scratch.ScratchUnavailableError, match="/proc"):
        secret.to_bytes()
