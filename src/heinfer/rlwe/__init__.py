"""Every piece of lattice arithmetic and sampling heinfer does itself, outside SEAL.

SEAL (through `heinfer.he`) does keys, NTTs and homomorphic evaluation; these modules do, in
numpy on uint64 residues, what the plans need at coefficient level and what the binding
cannot do fast or at all. The loops a single-image request runs per coefficient (digit splits
around the FFTs and their recombination, products at a few coefficients, the modulus switch,
error sampling from a hash stream) are compiled (`_kernels.c`), each behind one of the Python
functions here:

* `sampling`: the distributions we draw from (uniform modulo a prime from a public seed or
  from the OS, SEAL's centered binomial error, uniform flooding in a power-of-two range,
  uniform and normal floats from the OS);
* `ring`: exact modular products, negacyclic products with a ternary secret, exact integer
  linear combinations of polynomials;
* `encrypt`: the RLWE equations themselves (BFV plaintext scaling, symmetric encryption, and
  rewriting an RLWE pair for a new uniform half, which seeds public and key-switching keys).

Nothing here imports the SEAL binding; `tests/test_rlwe*.py` checks every function, compiled
loops included, against SEAL's own output. SECURITY.md lists these functions as the crypto we
wrote ourselves.
"""

__all__: list[str] = []
