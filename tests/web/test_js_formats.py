"""The JavaScript client's own pieces of heinfer's formats, byte for byte against Python's.

web/src/formats.js re-implements what heinfer adds on top of SEAL (SHA-256 fingerprints,
SHAKE-128 seed expansion, bit packing, frames). Each case
below runs the Python client's function and formats.js (through web/tools/vectors.mjs under
Node) on the same random inputs and compares the bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from typing import Any

import numpy as np
import pytest

from heinfer.he.backend import pack_bits, unpack_bits
from heinfer.he.ckks import _ENVELOPE, KIND_CIPHERTEXT, MAGIC, VERSION, CkksParameters
from heinfer.he.galois import GALOIS_A_TAG
from heinfer.he.params import BFVParameters
from heinfer.he.serialization import seal_version
from heinfer.plans.linear.packed import Packing, automorphism
from heinfer.plans.network.frames import encode_frames
from heinfer.plans.network.plan import network_key_fingerprint
from heinfer.plans.wire import decode_response, encode_keys, encode_request, encode_response
from heinfer.rlwe.sampling import BATCH_A_TAG, PUBLIC_A_TAG, expand_uniform
from service_helpers import REPO

pytestmark = pytest.mark.web

NODE = shutil.which("node")
RNG = np.random.default_rng(18)
MNIST_PRIMES = (68719403009, 36028797018652673, 188417)
CKKS_PRIMES = (549755486209, 549755731969, 1032193, 72057594037616641, 1152921504606830593)


def run_js(cases: list[dict[str, Any]]) -> list[Any]:
    """Results of formats.js for each case (a dict with an "op"), in order."""
    assert NODE, "node is not installed (Debian: apt-get install nodejs)"
    done = subprocess.run(
        [NODE, str(REPO / "web" / "tools" / "vectors.mjs")],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    results = json.loads(done.stdout)
    for case, result in zip(cases, results, strict=True):
        assert "ok" in result, f"{case['op']}: {result.get('error')}"
    return [result["ok"] for result in results]


def words(values: np.ndarray) -> list[str]:
    return [str(int(v)) for v in values]


def test_hashes() -> None:
    datas = [os.urandom(n) for n in (0, 1, 55, 56, 64, 167, 168, 169, 1000)]
    cases = [{"op": "sha256", "data": d.hex()} for d in datas]
    cases += [{"op": "shake128", "data": d.hex(), "length": 8 * 4096 + 3} for d in datas]
    got = run_js(cases)
    expected = [hashlib.sha256(d).hexdigest() for d in datas]
    expected += [hashlib.shake_128(d).hexdigest(8 * 4096 + 3) for d in datas]
    assert got == expected


def test_bit_packing() -> None:
    cases, expected = [], []
    for bits in (1, 8, 18, 20, 36, 39, 55, 57, 60):
        for count in (1, 9, 784, 4096):
            values = RNG.integers(0, 1 << bits, count, dtype=np.uint64)
            packed = pack_bits(values, bits)
            cases.append({"op": "pack", "values": words(values), "bits": bits})
            expected.append(packed.hex())
            cases.append({"op": "unpack", "data": packed.hex(), "count": count, "bits": bits})
            expected.append(words(unpack_bits(packed, count, bits)))
    assert run_js(cases) == expected


def test_seed_expansion() -> None:
    seed = os.urandom(32)
    degree = 4096
    cases, expected = [], []
    for tag in (PUBLIC_A_TAG, BATCH_A_TAG, GALOIS_A_TAG):
        # first is the index of the first polynomial; rows j are the primes' positions
        polys = expand_uniform(seed, MNIST_PRIMES, 3, degree, first=5, tag=tag)
        for j, q in enumerate(MNIST_PRIMES):
            for i in range(3):
                cases.append(
                    {"op": "expand", "seed": seed.hex(), "q": str(q), "prime": j,
                     "index": 5 + i, "degree": degree, "tag": tag.decode()}
                )
                expected.append(words(polys[j, i]))
    # a prime far below 2**bits rejects often: the redraw path must match too
    awkward = (2**20 + 2**19 + 1,)  # 1572865: a third of masked words are rejected
    polys = expand_uniform(seed, awkward, 1, 64, tag=BATCH_A_TAG)
    cases.append({"op": "expand", "seed": seed.hex(), "q": str(awkward[0]), "prime": 0,
                  "index": 0, "degree": 64, "tag": BATCH_A_TAG.decode()})
    expected.append(words(polys[0, 0]))
    assert run_js(cases) == expected


def test_fingerprints() -> None:
    bfv = BFVParameters(4096, MNIST_PRIMES, 1 << 34)
    ckks = CkksParameters(8192, CKKS_PRIMES)
    cases = [
        {"op": "bfv_fingerprint", "scheme": bfv.to_dict()},
        {"op": "ckks_fingerprint", "params": ckks.to_dict()},
        {"op": "network_key_fingerprint", "params": ckks.to_dict()},
    ]
    assert run_js(cases) == [
        bfv.fingerprint.hex(),
        ckks.fingerprint.hex(),
        network_key_fingerprint({"params": ckks.to_dict()}).hex(),
    ]


def test_frames_and_envelopes() -> None:
    records = [os.urandom(n) for n in (0, 5, 300)]
    fingerprint = os.urandom(32)
    parts = {"public": os.urandom(40), "relin": os.urandom(3), "galois": os.urandom(9)}
    fixed = [os.urandom(12) for _ in range(3)]
    response = encode_response(fixed)
    network_response = encode_frames(b"HNR1", records)
    cases = [
        {"op": "frames", "magic": "HEQ1", "records": [r.hex() for r in records]},
        {"op": "frames", "magic": "HNQ1", "records": [r.hex() for r in records]},
        {"op": "keys", "fingerprint": fingerprint.hex(),
         "parts": [[k, v.hex()] for k, v in parts.items()]},
        {"op": "decode_fixed", "body": response.hex(), "record_bytes": 12},
        {"op": "decode_frames", "magic": "HNR1", "body": network_response.hex(),
         "max_record_bytes": 300},
        {"op": "envelope", "kind": 1, "fingerprint": fingerprint[:8].hex(), "data": "a15e"},
    ]
    wrapped = _ENVELOPE.pack(MAGIC, VERSION, KIND_CIPHERTEXT, fingerprint[:8]) + b"\xa1\x5e"
    assert run_js(cases) == [
        encode_request(records).hex(),
        encode_frames(b"HNQ1", records).hex(),
        encode_keys(fingerprint, parts).hex(),
        [r.hex() for r in decode_response(response, 12)],
        [r.hex() for r in records],
        wrapped.hex(),
    ]


def test_service_seal_version_is_what_the_service_writes() -> None:
    """The JS client writes the service's SEAL minor version into every header it uploads; a
    TenSEAL upgrade that moves SEAL's version must move SERVICE_SEAL_MINOR too."""
    assert run_js([{"op": "service_minor"}]) == [seal_version()[1]]


def test_tags_are_the_python_clients() -> None:
    """The domain-separation tags formats.js expands seeds under are the Python client's."""
    assert run_js([{"op": "tags"}]) == [
        [PUBLIC_A_TAG.decode(), BATCH_A_TAG.decode(), GALOIS_A_TAG.decode()]
    ]


def test_packed_client_levels_as_the_python_client() -> None:
    """coeff-packed's client levels: the image elements and the plaintext automorphism."""
    cases, expected = [], []
    for degree, stride, levels in ((4096, 1024, 2), (8192, 1024, 3), (8192, 2048, 2)):
        for client_levels in range(levels + 1):
            pack = Packing(degree, stride, levels, [], client_levels)
            cases.append({"op": "image_elements", "degree": degree,
                          "spec": {"stride": stride, "client_levels": client_levels}})
            expected.append(pack.image_elements)
    values = RNG.integers(0, 256, 784)
    for element in (1, 9, 17, 33, 8191, 3 * 17 % 16384):
        poly = np.zeros(8192, dtype=np.int64)
        poly[:784] = values
        cases.append({"op": "automorphism", "values": values.tolist(), "element": element,
                      "degree": 8192})
        expected.append(automorphism(poly, element).tolist())
    assert run_js(cases) == expected
