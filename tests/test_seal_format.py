"""heinfer.he.serialization against SEAL's own save and load, for every object type we read
or write: Plaintext (coefficient and NTT form), Ciphertext (first level, last level, NTT
form, SEAL's seeded form), PublicKey, SecretKey, RelinKeys and GaloisKeys. Each test parses
what SEAL saved, writes it back with our code, and has SEAL load the result and save it again
byte for byte; the header checks refuse what SEAL would refuse."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import tenseal.sealapi as seal

from heinfer.errors import MalformedPayloadError
from heinfer.he import serialization as fmt
from heinfer.he.backend import SecretKey
from heinfer.he.ckks import CkksContext, galois_element, select_parameters
from heinfer.he.scratch import SCRATCH
from rlwe_helpers import bfv_context


def _payload(obj: object) -> bytes:
    return fmt.seal_payload(SCRATCH.save(obj))


def _reloaded(kind: type, context: object, data: bytes) -> bytes:
    """SEAL loads our bytes into a fresh `kind` and saves it again: its payload."""
    return _payload(SCRATCH.load(kind(), context, data))


def test_header_is_seals_and_zstd_payloads_round_trip() -> None:
    context = bfv_context()
    saved = SCRATCH.save(seal.KeyGenerator(context.seal_context).secret_key())
    assert fmt.check_header(saved, "secret key", 1 << 30) == 2  # the binding writes zstd
    ours = fmt.seal_object(b"x" * 10)
    magic, hsize, major, minor, _c, _r, _s = fmt.HEADER.unpack_from(saved)
    assert fmt.HEADER.unpack_from(ours)[:4] == (magic, hsize, major, minor)
    payload = fmt.seal_payload(saved)
    for compress in (False, True):
        data = fmt.seal_object(payload, compress=compress)
        assert _reloaded(seal.SecretKey, context.seal_context, data) == payload


@pytest.mark.parametrize(
    ("mutate", "message", "seal_refuses"),
    [
        (lambda d: d[:10], "too short", True),
        (lambda d: b"\x00" + d[1:], "bad header", True),
        (lambda d: d[:3] + b"\x03" + d[4:], "bad header", True),  # major version 3
        (lambda d: d[:5] + b"\x01" + d[6:], "compression mode 1", True),  # zlib: not built in
        (lambda d: d[:-1], "truncated", True),
        # SEAL reads the declared size from a stream and ignores what follows; we are stricter
        (lambda d: d + b"\x00", "truncated", False),
    ],
)
def test_check_header_refuses_what_seal_would(
    mutate: object, message: str, seal_refuses: bool
) -> None:
    context = bfv_context()
    saved = SCRATCH.save(seal.KeyGenerator(context.seal_context).secret_key())
    bad = mutate(saved)  # type: ignore[operator]
    with pytest.raises(MalformedPayloadError, match=message):
        fmt.check_header(bad, "key", 1 << 30)
    if seal_refuses:
        with pytest.raises((RuntimeError, ValueError)):
            SCRATCH.load(seal.SecretKey(), context.seal_context, bad)
    with pytest.raises(MalformedPayloadError, match="exceeds"):
        fmt.check_header(saved, "key", 100)


def test_corrupt_zstd_is_malformed_input() -> None:
    data = bytearray(fmt.seal_object(b"y" * 1000, compress=True))
    data[-4:] = b"\xff\xff\xff\xff"
    with pytest.raises(MalformedPayloadError, match="corrupt compressed"):
        fmt.seal_payload(bytes(data))


def test_plaintexts_in_coefficient_and_ntt_form() -> None:
    context = bfv_context()
    values = np.random.default_rng(1).integers(0, context.params.plain_modulus, size=context.n)
    ours = fmt.plaintext_bytes(values.astype(np.uint64))
    plain = SCRATCH.load(seal.Plaintext(), context.seal_context, ours)
    assert [plain[i] for i in (0, 1, context.n - 1)] == [int(values[i]) for i in (0, 1, -1)]
    assert _payload(plain) == fmt.seal_payload(ours)
    np.testing.assert_array_equal(fmt.plaintext_arrays(plain, context.n), values)
    context.evaluator.transform_to_ntt_inplace(plain, list(context.first_parms_id))
    arrays = fmt.plaintext_arrays(plain, context.n)
    assert arrays.shape == (len(context.params.data_primes), context.n)
    assert (arrays < np.array(context.params.data_primes, dtype=np.uint64)[:, None]).all()
    assert plain.is_ntt_form() and arrays.reshape(-1).tolist()[:3] == [plain[i] for i in range(3)]


def _ciphertexts(context: object) -> dict[str, object]:
    ctx = context.seal_context  # type: ignore[attr-defined]
    secret = seal.KeyGenerator(ctx).secret_key()
    encryptor = seal.Encryptor(ctx, secret)
    plain = context.plaintext_from_coefficients(np.arange(10))  # type: ignore[attr-defined]
    first = seal.Ciphertext()
    encryptor.encrypt_symmetric(plain, first)
    last = seal.Ciphertext()
    evaluator = context.evaluator  # type: ignore[attr-defined]
    evaluator.mod_switch_to(first, list(context.last_parms_id), last)  # type: ignore[attr-defined]
    ntt = seal.Ciphertext()
    evaluator.transform_to_ntt(first, ntt)
    return {"first": first, "last": last, "ntt": ntt}


@pytest.mark.parametrize("which", ["first", "last", "ntt"])
def test_ciphertexts_compose_from_their_arrays(which: str) -> None:
    context = bfv_context()
    ciphertext = _ciphertexts(context)[which]
    saved = SCRATCH.save(ciphertext)
    arrays = fmt.ciphertext_arrays(ciphertext)
    assert arrays.shape == (2, ciphertext.coeff_modulus_size(), context.n)
    assert arrays[0, 0, :3].tolist() == [ciphertext[i] for i in range(3)]  # SEAL's own view
    composed = fmt.compose_ciphertext(fmt.ciphertext_prefix(saved), arrays)
    assert composed == fmt.seal_object(fmt.seal_payload(saved))
    assert _reloaded(seal.Ciphertext, context.seal_context, composed) == fmt.seal_payload(saved)
    with pytest.raises((RuntimeError, ValueError)):  # SEAL checks prefix and data agree
        SCRATCH.load(seal.Ciphertext(), context.seal_context, composed[:-8])


def test_seeded_ciphertexts_split_and_join_as_seal_writes_them() -> None:
    context = bfv_context()
    secret = seal.KeyGenerator(context.seal_context).secret_key()
    encryptor = seal.Encryptor(context.seal_context, secret)
    saved = SCRATCH.save(encryptor.encrypt_symmetric(context.plaintext_from_coefficients(None)))
    levels = len(context.params.data_primes)
    prefix, c0, tail = fmt.seeded_ciphertext_parts(saved, context.n, levels)
    assert fmt.seeded_ciphertext(prefix, c0, tail) == fmt.seal_object(fmt.seal_payload(saved))
    assert tail[fmt.HEADER.size] == fmt.PRNG_BLAKE2XB
    assert len(tail) == fmt.HEADER.size + 1 + fmt.PRNG_SEED_BYTES
    expanded = SCRATCH.load(seal.Ciphertext(), context.seal_context, saved)
    np.testing.assert_array_equal(fmt.ciphertext_arrays(expanded)[0], c0)
    # our seeded layout for keys is SEAL's seeded layout: rebuild SEAL's bytes from the parts
    body = fmt.seal_payload(SCRATCH.save(expanded))
    seed = tail[fmt.HEADER.size + 1 :]
    assert fmt.seeded_key_body(body, c0, seed) == fmt.seal_payload(saved)
    # the seed object is SEAL's, byte for byte, and SEAL loads it as SHAKE-256 as well
    assert fmt.seed_object(fmt.PRNG_BLAKE2XB, seed) == tail
    shake = fmt.seeded_ciphertext(prefix, c0, fmt.seed_object(fmt.PRNG_SHAKE256, seed))
    reloaded = SCRATCH.load(seal.Ciphertext(), context.seal_context, shake)
    other_c1 = fmt.ciphertext_arrays(reloaded)[1]
    assert not np.array_equal(other_c1, fmt.ciphertext_arrays(expanded)[1])


def test_ntt_form_prefix_is_the_prefix_seal_writes_for_ntt_ciphertexts() -> None:
    context = bfv_context()
    secret = seal.KeyGenerator(context.seal_context).secret_key()
    fresh = seal.Ciphertext()
    seal.Encryptor(context.seal_context, secret).encrypt_symmetric(
        context.plaintext_from_coefficients(None), fresh
    )
    prefix = fmt.ciphertext_prefix(SCRATCH.save(fresh))
    ntt = fmt.ciphertext_prefix(SCRATCH.save(context.to_ntt(fresh)))
    assert prefix != ntt and fmt.ntt_form_prefix(prefix) == ntt


def test_public_and_secret_keys() -> None:
    context = bfv_context()
    keygen = seal.KeyGenerator(context.seal_context)
    secret, public = keygen.secret_key(), seal.PublicKey()
    keygen.create_public_key(public)
    saved = SCRATCH.save(public)
    levels = len(context.params.coeff_modulus)
    arrays = fmt.key_arrays(fmt.seal_payload(saved), context.n, levels)
    np.testing.assert_array_equal(arrays, fmt.ciphertext_arrays(public))
    composed = fmt.compose_ciphertext(fmt.ciphertext_prefix(saved), arrays)
    assert _reloaded(seal.PublicKey, context.seal_context, composed) == fmt.seal_payload(saved)
    with pytest.raises(ValueError, match="layout"):
        fmt.key_arrays(fmt.seal_payload(saved), context.n, levels - 1)
    s = fmt.plaintext_arrays(secret, context.n)
    assert s.shape == (levels, context.n)
    ours = SecretKey(context, secret)
    assert SecretKey.from_bytes(context, ours.to_bytes()).ternary().tolist() == (
        ours.ternary().tolist()
    )


def test_key_switching_keys_map_and_seed_as_seal_reads_them() -> None:
    """RelinKeys and GaloisKeys: the identity map gives SEAL's payload back; seeding every
    component (`seeded_key_body`) gives keys SEAL loads and expands, keeping each k0."""
    ctx = CkksContext(select_parameters([30, 25, 30]))
    keygen = seal.KeyGenerator(ctx.seal_context)
    relin, galois = seal.RelinKeys(), seal.GaloisKeys()
    keygen.create_relin_keys(relin)
    keygen.create_galois_keys([galois_element(1, ctx.n), galois_element(5, ctx.n)], galois)
    levels = len(ctx.params.primes)
    for kind, keys in ((seal.RelinKeys, relin), (seal.GaloisKeys, galois)):
        saved = SCRATCH.save(keys)
        same = fmt.map_kswitch_keys(saved, lambda body: body)
        assert fmt.seal_payload(same) == fmt.seal_payload(saved)
        assert _reloaded(kind, ctx.seal_context, same) == fmt.seal_payload(saved)
        k0s: list[np.ndarray] = []

        def seeded(body: bytes, k0s: list[np.ndarray] = k0s) -> bytes:
            k0, _a = fmt.key_arrays(body, ctx.n, levels)
            k0s.append(k0.copy())
            return fmt.seeded_key_body(body, k0, bytes(range(64)))

        data = fmt.map_kswitch_keys(saved, seeded)
        assert len(data) < 0.6 * len(saved)
        loaded = SCRATCH.load(kind(), ctx.seal_context, data)
        reread: list[np.ndarray] = []
        fmt.map_kswitch_keys(
            SCRATCH.save(loaded),
            lambda body, out=reread: out.append(fmt.key_arrays(body, ctx.n, levels)[0].copy())
            or body,
        )
        assert len(reread) == len(k0s) > 0
        for before, after in zip(k0s, reread, strict=True):
            np.testing.assert_array_equal(before, after)
    with pytest.raises(ValueError, match="layout"):
        fmt.map_kswitch_keys(fmt.seal_object(fmt.seal_payload(SCRATCH.save(relin)) + b"\0"),
                             lambda body: body)


def test_ciphertext_meta_layout() -> None:
    context = bfv_context()
    ciphertext = _ciphertexts(context)["ntt"]
    meta = fmt.CT_META.unpack_from(_payload(ciphertext))
    assert list(meta[:4]) == list(ciphertext.parms_id())
    assert (meta[4], meta[5], meta[6], meta[7]) == (1, 2, context.n, 2)
    assert struct.calcsize("<4QBQQQdQ") == fmt.CT_META.size
