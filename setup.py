"""The compiled parts of heinfer; everything else is configured in pyproject.toml.

Two small C extensions, so installing from source needs a C compiler and Python's headers:
`heinfer.rlwe._kernels` (the per-request loops of `heinfer.rlwe`; hashing, FFTs and BLAS stay
in hashlib and numpy) and `heinfer.he._bits` (the wire formats' bit packing).
"""

from setuptools import Extension, setup

_FLAGS = ["-O3", "-std=gnu11"]

setup(
    ext_modules=[
        Extension(
            "heinfer.rlwe._kernels", ["src/heinfer/rlwe/_kernels.c"], extra_compile_args=_FLAGS
        ),
        Extension("heinfer.he._bits", ["src/heinfer/he/_bits.c"], extra_compile_args=_FLAGS),
    ]
)
