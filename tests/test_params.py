"""Parameters meet >= 128-bit security per the HomomorphicEncryption.org standard table."""

from __future__ import annotations

import pytest

import heinfer
from heinfer.he.backend import Context, find_ntt_primes
from heinfer.he.params import HE_STANDARD_MAX_LOG_Q, BFVParameters, max_log_q, security_level


def test_table_rows_match_the_standard() -> None:
    # Albrecht et al., Homomorphic Encryption Security Standard (2018), Table 1, ternary secret.
    assert HE_STANDARD_MAX_LOG_Q[128] == {
        1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881,
    }
    assert max_log_q(4096, 192) == 75
    assert max_log_q(8192, 256) == 118


def test_security_level_boundaries() -> None:
    assert security_level(4096, 109) == 128
    assert security_level(4096, 110) == 0
    assert security_level(4096, 75) == 192
    assert security_level(8192, 118) == 256


def test_compiled_model_is_128_bit(mnist_model: heinfer.EncryptedModel) -> None:
    scheme = mnist_model.manifest.scheme
    params = BFVParameters.from_dict(scheme)
    assert params.security_bits >= 128
    assert params.total_log_q <= max_log_q(params.poly_modulus_degree, 128)
    assert scheme["security_bits"] >= 128
    Context(params)  # SEAL's own 128-bit check (SEC_LEVEL_TYPE.TC128) accepts it too


def test_seal_refuses_parameters_over_the_table() -> None:
    primes = find_ntt_primes(4096, [40, 40, 30])  # 110 bits > 109
    with pytest.raises(ValueError, match="SEAL rejects"):
        Context(BFVParameters(4096, primes, 1 << 20))


def test_fingerprint_changes_with_any_parameter() -> None:
    primes = find_ntt_primes(4096, [36, 55, 18])
    a = BFVParameters(4096, primes, 1 << 34)
    b = BFVParameters(4096, primes, 1 << 33)
    assert a.fingerprint != b.fingerprint
    assert BFVParameters.from_dict(a.to_dict()) == a
