# Bit packing of the wire formats (_bits.c), called through heinfer.he.backend's pack_bits,
# pack_bits_into and unpack_bits.
import numpy as np

__all__ = ["pack_into", "unpack_into"]

def pack_into(values: np.ndarray, bits: int, out: np.ndarray, offset: int) -> int: ...
def unpack_into(data: bytes | memoryview, bits: int, out: np.ndarray) -> None: ...
