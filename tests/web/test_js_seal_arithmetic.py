"""The JavaScript client's lattice arithmetic is SEAL's, and equals the Python client's.

The browser client moves an RLWE pair (k0, a) in NTT form to a new uniform half a' (seeded
public keys, coeff-packed's Galois keys) as k0 + (a - a')*s with SEAL's own sub,
multiply_plain and add on composed ciphertexts (LinearCodec._moveUniformHalves in
web/src/heinfer.js). Run in headless Chromium on random pairs, its output must equal
`heinfer.rlwe.encrypt.replace_uniform_half` with the page's secret key, word for word; with a
different key it must not.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from heinfer.rlwe.encrypt import replace_uniform_half
from service_helpers import RunningService

pytest.importorskip("playwright.sync_api")

pytestmark = [pytest.mark.web, pytest.mark.e2e]

PAIRS = 17  # one composed ciphertext of 16 pairs, then a lone pair (SEAL needs two components)

MOVE = """async ({k0, a, fresh}) => {
    const { default: initialize } = await import('./web/vendor/node-seal/index_throws.js');
    const h = await import('./web/heinfer.js');
    const manifest = await (await fetch('./v2/models/mnist/manifest')).json();
    const codec = new h.LinearCodec(await initialize(), manifest);
    codec.keygen();
    const big = (rows) => rows.map((r) => BigUint64Array.from(r, BigInt));
    const pairs = k0.map((rows, i) => [big(rows), big(a[i])]);
    const moved = codec._moveUniformHalves(pairs, fresh.map(big));
    return {
        moved: moved.map((rows) => rows.map((r) => Array.from(r, String))),
        primes: codec.primes.map(String),
        secret: Array.from(codec.secretBytes()),
    };
}"""


def as_text(polys: np.ndarray) -> list[list[list[str]]]:
    """(pairs, L, N) words as decimal strings (JSON numbers would lose bits above 2**53)."""
    return [[[str(v) for v in row] for row in pair] for pair in polys]


def test_uniform_half_moved_by_seal_equals_python(service: RunningService, browser: Any) -> None:
    page = browser.new_page()
    page.goto(f"{service.url}/?audit=1")
    manifest = page.evaluate("async () => (await fetch('./v2/models/mnist/manifest')).json()")
    primes = [int(q) for q in manifest["scheme"]["coeff_modulus"]]
    n = int(manifest["scheme"]["poly_modulus_degree"])
    rng = np.random.default_rng(18)

    def below(shape: tuple[int, ...]) -> np.ndarray:
        return np.stack([rng.integers(0, q, size=shape, dtype=np.uint64) for q in primes], axis=-2)

    k0, a, fresh = below((PAIRS, n)), below((PAIRS, n)), below((PAIRS, n))  # (pairs, L, N)
    out = page.evaluate(MOVE, {"k0": as_text(k0), "a": as_text(a), "fresh": as_text(fresh)})
    page.close()
    assert [int(q) for q in out["primes"]] == primes
    secret = bytes(out["secret"])
    start = 16 + 48 + 16 + 8  # SEAL header, plaintext metadata, array header, count
    s = np.frombuffer(secret[start : start + 8 * n * len(primes)], "<u8").reshape(len(primes), n)
    moved = np.array([[[int(v) for v in row] for row in pair] for pair in out["moved"]], np.uint64)
    for i in range(PAIRS):
        expected = replace_uniform_half(k0[i], a[i], fresh[i], s, primes)
        np.testing.assert_array_equal(moved[i], expected)
    stranger = np.roll(s, 1, axis=1)  # another key's NTT form: the check can fail
    other = replace_uniform_half(k0[0], a[0], fresh[0], stranger, primes)
    assert not np.array_equal(moved[0], other)
