"""What the page tests check in every request the page made (a plain module, not conftest)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image


def png(image: np.ndarray) -> bytes:
    """A 28x28 uint8 image as PNG file bytes, as a user would drop it on the page."""
    buffer = io.BytesIO()
    Image.fromarray(image.reshape(28, 28).astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def drop_and_run(page: Any, images: np.ndarray, timeout_ms: int) -> dict[str, Any]:
    """Drop `images` on the page as PNG files, press the button, wait for the run to end and
    return the page's result (the status must say it is done)."""
    files = [{"name": f"{i}.png", "mimeType": "image/png", "buffer": png(image)}
             for i, image in enumerate(images)]
    page.set_input_files("#photo", files=files)
    page.wait_for_selector("#pad[data-image='1']", state="attached")
    page.click("#go")
    page.wait_for_selector("body[data-run='1'], body[data-error='1']", state="attached",
                           timeout=timeout_ms)
    assert page.inner_text("#status").startswith("Done"), page.inner_text("#status")
    return dict(page.evaluate("window.heinferPage.lastResult"))


def check_page_scores(
    result: dict[str, Any], model: Any, X: np.ndarray, layout: str
) -> np.ndarray:
    """Assert that the page's run sent all of X in `layout` and that its scores match the
    plaintext model within the manifest's stated error, with the same argmax; returns the
    plaintext scores."""
    assert result["layout"] == layout and result["samples"] == len(X)
    scores = np.array([p["scores"] for p in result["predictions"]])
    reference = model.predict_plain(X)
    assert np.abs(scores - reference).max() <= model.manifest.precision.max_abs_error
    assert (scores.argmax(1) == reference.argmax(1)).all()
    return np.asarray(reference)


def secret_needles(secret: bytes) -> list[bytes]:
    """16-byte pieces of the secret key's coefficient data (its last N*L*8 bytes)."""
    data = secret[len(secret) // 4 :]
    return [data[i : i + 16] for i in range(0, len(data) - 16, 512)]


def leaks(needles: list[bytes], bodies: list[bytes]) -> int:
    return sum(needle in body for needle in needles for body in bodies)
