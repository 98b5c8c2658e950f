"""CKKS keys travel seeded only: the server expands every uniform half from the client's seed.

A public key (0, 0), or any key in SEAL's full form (both polynomials from the client), would
let a client choose the uniform half of the key the server re-randomizes with; the service
refuses them with a 4xx naming the seeded form, at `check_keys` (HTTP process, before storing)
and at `load_keys` (worker), while the keys `Codec.key_upload` makes are accepted.
"""

from __future__ import annotations

import numpy as np
import pytest
import tenseal.sealapi as seal

from heinfer.errors import HeinferError, MalformedPayloadError
from heinfer.he import serialization as fmt
from heinfer.he.ckks import (
    KIND_GALOIS,
    KIND_PUBLIC,
    KIND_RELIN,
    CkksContext,
    ClientKeys,
    select_parameters,
)
from heinfer.he.scratch import SCRATCH
from heinfer.plans.network import NetworkSpec, compile_network
from heinfer.plans.wire import decode_keys, encode_keys


@pytest.fixture(scope="module")
def plan():  # type: ignore[no-untyped-def]
    """A tiny network (4 inputs, 2 hidden, 2 outputs) with rotations: every key type."""
    rng = np.random.default_rng(1)
    layers = [
        {"type": "linear", "weight": rng.normal(0, 0.5, (2, 4)), "bias": np.zeros(2)},
        {"type": "poly", "a": 1.0, "b": 0.0},
        {"type": "linear", "weight": rng.normal(0, 0.5, (2, 2)), "bias": np.zeros(2)},
    ]
    return compile_network(NetworkSpec(layers, (4,)), "tiny-keys")


def _full_forms(ctx: CkksContext, keys: ClientKeys, steps: list[int]) -> dict[str, bytes]:
    """SEAL's own keys in full form (what the binding writes without seeding)."""
    from heinfer.he.ckks import galois_element

    keygen = keys._keygen
    public = seal.PublicKey()
    keygen.create_public_key(public)
    relin = seal.RelinKeys()
    keygen.create_relin_keys(relin)
    galois = seal.GaloisKeys()
    keygen.create_galois_keys(sorted({galois_element(s, ctx.n) for s in steps}), galois)
    return {
        "public": ctx.wrap(KIND_PUBLIC, SCRATCH.save(public)),
        "relin": ctx.wrap(KIND_RELIN, SCRATCH.save(relin)),
        "galois": ctx.wrap(KIND_GALOIS, SCRATCH.save(galois)),
    }


def test_seeded_keys_are_accepted(plan) -> None:  # type: ignore[no-untyped-def]
    from heinfer.plans.base import codec_for

    codec = codec_for(plan.manifest)
    upload = codec.key_upload(codec.keygen())
    plan.check_keys(upload)
    keys = plan.load_keys(upload)
    assert keys.galois is not None and keys.relin is not None


@pytest.mark.parametrize("part", ["public", "relin", "galois"])
def test_full_form_keys_are_refused(plan, part: str) -> None:  # type: ignore[no-untyped-def]
    """Each key type alone in SEAL's full form (the rest seeded) is refused with a 400."""
    from heinfer.plans.base import codec_for

    codec = codec_for(plan.manifest)
    secret = codec.keygen()
    fingerprint, parts = decode_keys(codec.key_upload(secret))
    ctx = plan.ctx
    full = _full_forms(ctx, codec.client_keys(secret), plan.network["keys"]["galois_steps"])
    upload = encode_keys(fingerprint, {**parts, part: full[part]})
    for step in (plan.check_keys, plan.load_keys):
        with pytest.raises(MalformedPayloadError, match="seeded form") as info:
            step(upload)
        assert isinstance(info.value, HeinferError) and 400 <= info.value.status < 500
    # negative control: SEAL itself loads the full form (only our check refuses it)
    kind = {"public": KIND_PUBLIC, "relin": KIND_RELIN, "galois": KIND_GALOIS}[part]
    empty = {"public": seal.PublicKey, "relin": seal.RelinKeys, "galois": seal.GaloisKeys}[part]
    assert SCRATCH.load(empty(), ctx.seal_context, ctx.unwrap(kind, full[part])) is not None


def test_zero_public_key_is_refused(plan) -> None:  # type: ignore[no-untyped-def]
    """(0, 0): SEAL loads it and re-randomization under it changes nothing (the attack), and
    the service refuses it."""
    from heinfer.plans.base import codec_for

    codec = codec_for(plan.manifest)
    secret = codec.keygen()
    fingerprint, parts = decode_keys(codec.key_upload(secret))
    ctx = plan.ctx
    public = seal.PublicKey()
    codec.client_keys(secret)._keygen.create_public_key(public)
    saved = SCRATCH.save(public)
    zero = fmt.compose_ciphertext(
        fmt.ciphertext_prefix(saved), np.zeros_like(fmt.ciphertext_arrays(public))
    )
    wrapped = ctx.wrap(KIND_PUBLIC, zero)
    # the attack this closes: under (0, 0) a public-key encryption of zero adds nothing
    loaded = SCRATCH.load(seal.PublicKey(), ctx.seal_context, zero)
    zero_plain = ctx.encode(np.zeros(1), 2.0**28, ctx.top_count)
    rerandomizer = ctx.encrypt_public(ctx.encryptor(loaded), zero_plain)
    assert not fmt.ciphertext_arrays(rerandomizer)[1].any()  # c1 = 0: nothing re-randomized
    upload = encode_keys(fingerprint, {**parts, "public": wrapped})
    for step in (plan.check_keys, plan.load_keys):
        with pytest.raises(MalformedPayloadError, match="seeded form"):
            step(upload)


def test_seeded_form_check_is_exact() -> None:
    """Truncated or padded seeded keys are refused too (the check parses, it does not guess)."""
    params = select_parameters([39, 39, 20, 56, 60])
    ctx = CkksContext(params)
    keys = ClientKeys(ctx).public_keys([1])
    from heinfer.he.ckks import check_seeded

    for kind, name in ((KIND_PUBLIC, "public"), (KIND_RELIN, "relin"), (KIND_GALOIS, "galois")):
        check_seeded(params, kind, keys[name])
    body = ctx.unwrap(KIND_PUBLIC, keys["public"])
    payload = fmt.seal_payload(body)
    for bad in (payload + b"\0", payload[:-1]):
        with pytest.raises(MalformedPayloadError):
            check_seeded(params, KIND_PUBLIC, ctx.wrap(KIND_PUBLIC, fmt.seal_object(bad)))
