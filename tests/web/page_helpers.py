"""What the page tests check in every request the page made (a plain module, not conftest)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def png(image: np.ndarray) -> bytes:
    """A 28x28 uint8 image as PNG file bytes, as a user would drop it on the page."""
    buffer = io.BytesIO()
    Image.fromarray(image.reshape(28, 28).astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def secret_needles(secret: bytes) -> list[bytes]:
    """16-byte pieces of the secret key's coefficient data (its last N*L*8 bytes)."""
    data = secret[len(secret) // 4 :]
    return [data[i : i + 16] for i in range(0, len(data) - 16, 512)]


def leaks(needles: list[bytes], bodies: list[bytes]) -> int:
    return sum(needle in body for needle in needles for body in bodies)
