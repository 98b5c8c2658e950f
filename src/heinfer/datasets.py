"""MNIST digits in and out: the IDX reader/writer, a Pillow loader for photos, the bundled sample.

The IDX reader is the one place where bytes from outside (a user's file, a download) become
arrays, so it trusts nothing: every header field is checked against the bytes actually present,
and declared sizes are capped *before* anything is allocated or decompressed, so a hostile
header or a gzip bomb costs at most `MAX_IDX_BYTES`. Everything it can name as wrong is a
`BadInputError`; only operating-system errors (missing file, permissions) pass through as
`OSError`, because those are the caller's environment, not the file's content.

Pixels stay exact bytes (uint8) end to end; dividing by 255.0 is left to the caller so that the
sample on disk, the arrays here and the values the model sees are trivially comparable.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterable
from gzip import BadGzipFile, GzipFile
from importlib import resources
from typing import Final, Literal, Protocol, overload

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps, UnidentifiedImageError

from heinfer.errors import BadInputError

__all__ = [
    "MAX_IDX_BYTES",
    "MAX_IMAGE_PIXELS",
    "load_image",
    "load_mnist",
    "load_sample",
    "read_idx",
    "write_idx",
]

StrPath = str | os.PathLike[str]
U8Array = npt.NDArray[np.uint8]

MAX_IDX_BYTES: Final = 128 * 1024 * 1024
"""Largest data section an IDX file may declare: full MNIST (70,000 digits, 55 MB) fits twice."""

MAX_IMAGE_PIXELS: Final = 64_000_000
"""Largest photo `load_image` decodes (a 48 MP phone picture fits), checked before decoding."""

_IDX_MAX_NDIM: Final = 16  # numpy cannot reshape past 64 dims; no real IDX file has more than 3
_UBYTE: Final = 0x08
_IDX_TYPE_NAMES: Final = {
    0x08: "unsigned byte",
    0x09: "signed byte",
    0x0B: "int16",
    0x0C: "int32",
    0x0D: "float32",
    0x0E: "float64",
}
_GZIP_MAGIC: Final = b"\x1f\x8b"
_SIDE: Final = 28  # MNIST digits are 28x28 ...
_BOX: Final = 20  # ... with the digit scaled to fit a 20x20 box inside, as NIST->MNIST did
_PIXELS: Final = _SIDE * _SIDE

_SAMPLE_FILES: Final = {
    "test": ("mnist-sample-images-idx3-ubyte.gz", "mnist-sample-labels-idx1-ubyte.gz"),
    "train": ("mnist-train-images-idx3-ubyte.gz", "mnist-train-labels-idx1-ubyte.gz"),
}


# --------------------------------------------------------------------------------------------
# IDX


class _Reader(Protocol):
    def read(self, size: int, /) -> bytes: ...


def _read_exact(stream: _Reader, n: int) -> bytes:
    """`read(n)` that keeps going on short reads, so a short result always means end of data."""
    chunks: list[bytes] = []
    left = n
    while left > 0:
        chunk = stream.read(left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _dims_text(dims: Iterable[int]) -> str:
    return "x".join(str(d) for d in dims)


def _parse_idx(stream: _Reader, name: str, max_bytes: int) -> U8Array:
    head = _read_exact(stream, 4)
    if len(head) < 4:
        raise BadInputError(
            f"{name}: not an IDX file: {len(head)} byte(s) where a 4-byte header was expected"
        )
    if head[0] != 0 or head[1] != 0:
        raise BadInputError(
            f"{name}: not an IDX file: wrong magic number (first bytes {head.hex(' ')}; "
            "IDX files start with 00 00, then a type code and the number of dimensions)"
        )
    code, ndim = head[2], head[3]
    if code != _UBYTE:
        kind = _IDX_TYPE_NAMES.get(code)
        what = f"dtype code 0x{code:02X} ({kind})" if kind else f"unknown dtype code 0x{code:02X}"
        raise BadInputError(
            f"{name}: unsupported IDX {what}; only 0x08 (unsigned byte, as in MNIST) is read"
        )
    if not 1 <= ndim <= _IDX_MAX_NDIM:
        raise BadInputError(
            f"{name}: IDX header declares {ndim} dimensions; expected 1 to {_IDX_MAX_NDIM}"
        )
    raw_dims = _read_exact(stream, 4 * ndim)
    if len(raw_dims) < 4 * ndim:
        raise BadInputError(
            f"{name}: truncated IDX header: {ndim} dimensions need {4 * ndim} bytes of sizes, "
            f"only {len(raw_dims)} present"
        )
    dims = tuple(int.from_bytes(raw_dims[i : i + 4], "big") for i in range(0, 4 * ndim, 4))
    size = 1
    for d in dims:
        size *= d
    if size > max_bytes:
        raise BadInputError(
            f"{name}: IDX header declares {_dims_text(dims)} = {size:,} bytes of data, over the "
            f"{max_bytes:,}-byte limit (refusing to allocate it)"
        )
    data = _read_exact(stream, size)
    if len(data) < size:
        raise BadInputError(
            f"{name}: truncated IDX data: header declares {_dims_text(dims)} = {size:,} bytes, "
            f"only {len(data):,} follow the header"
        )
    if stream.read(1):
        raise BadInputError(
            f"{name}: IDX file holds more data than its header declares "
            f"({_dims_text(dims)} = {size:,} bytes); extra bytes after the data"
        )
    # bytearray, not bytes: the caller gets a writable array without a second copy.
    return np.frombuffer(bytearray(data), dtype=np.uint8).reshape(dims)


def read_idx(path: StrPath, *, max_bytes: int = MAX_IDX_BYTES) -> U8Array:
    """Read one IDX file of unsigned bytes, gzip or raw (told apart by content, not by suffix).

    Detecting gzip by its magic bytes means a file someone decompressed without renaming, or
    named `.gz` without compressing, still reads. The shape is whatever the header declares.
    """
    name = os.fspath(path)
    with open(path, "rb") as raw:
        is_gzip = raw.read(2) == _GZIP_MAGIC
        raw.seek(0)
        if not is_gzip:
            return _parse_idx(raw, name, max_bytes)
        try:
            with GzipFile(fileobj=raw, mode="rb") as gz:
                return _parse_idx(gz, f"{name} (gzip)", max_bytes)
        except (BadGzipFile, EOFError, zlib.error) as exc:
            raise BadInputError(f"{name}: corrupt gzip stream: {exc}") from exc


def write_idx(path: StrPath, array: npt.ArrayLike, gzip: bool = True) -> None:
    """Write an IDX file of unsigned bytes with the array's own shape.

    Integer arrays are accepted when every value fits a byte; floats are refused rather than
    guessed at, because a [0, 1] image silently written as 0/1 bytes would look like a valid
    but black file. Gzip output has no timestamp or name, so the same array always gives the
    same bytes (the bundled sample is reproducible byte for byte).
    """
    arr = np.asarray(array)
    if arr.dtype != np.uint8:
        if arr.dtype.kind not in "biu":
            raise BadInputError(
                f"write_idx: dtype {arr.dtype} is not an integer type; IDX here holds unsigned "
                "bytes, so scale and cast first (for [0, 1] images: (x * 255).round())"
            )
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 255):
            raise BadInputError(
                f"write_idx: values span {int(arr.min())}..{int(arr.max())}, outside a byte's "
                "0..255"
            )
        arr = arr.astype(np.uint8)
    if not 1 <= arr.ndim <= _IDX_MAX_NDIM:
        raise BadInputError(
            f"write_idx: {arr.ndim} dimensions; IDX here takes 1 to {_IDX_MAX_NDIM}"
        )
    if any(d >= 2**32 for d in arr.shape):
        raise BadInputError(f"write_idx: shape {arr.shape} has a size that does not fit 32 bits")
    header = bytes([0, 0, _UBYTE, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    payload = header + np.ascontiguousarray(arr).tobytes()
    with open(path, "wb") as out:
        if gzip:
            with GzipFile(filename="", mode="wb", fileobj=out, compresslevel=9, mtime=0) as gz:
                gz.write(payload)
        else:
            out.write(payload)


@overload
def load_mnist(
    images: StrPath, labels: None = None, *, max_bytes: int = MAX_IDX_BYTES
) -> tuple[U8Array, None]: ...
@overload
def load_mnist(
    images: StrPath, labels: StrPath, *, max_bytes: int = MAX_IDX_BYTES
) -> tuple[U8Array, U8Array]: ...
def load_mnist(
    images: StrPath, labels: StrPath | None = None, *, max_bytes: int = MAX_IDX_BYTES
) -> tuple[U8Array, U8Array | None]:
    """Read MNIST-format images (n, 28, 28) and optional labels (n,) as uint8.

    Images come back flattened to (n, 784) because that is the feature layout every model
    here takes; the checks are MNIST's, not IDX's (28x28, labels 0-9, equal counts), so a
    labels file passed as images, or a mismatched pair, fails here with its name rather than
    as a shape error deep inside a model.
    """
    imgs = read_idx(images, max_bytes=max_bytes)
    if imgs.ndim != 3 or imgs.shape[1:] != (_SIDE, _SIDE):
        raise BadInputError(
            f"{os.fspath(images)}: expected MNIST images of shape (count, {_SIDE}, {_SIDE}), the "
            f"IDX header declares {imgs.ndim} dimension(s) {_dims_text(imgs.shape)}"
        )
    flat = imgs.reshape(imgs.shape[0], _PIXELS)
    if labels is None:
        return flat, None
    labs = read_idx(labels, max_bytes=max_bytes)
    if labs.ndim != 1:
        raise BadInputError(
            f"{os.fspath(labels)}: expected MNIST labels of shape (count,), the IDX header "
            f"declares {labs.ndim} dimensions {_dims_text(labs.shape)}"
        )
    if labs.shape[0] != flat.shape[0]:
        raise BadInputError(
            f"image/label count mismatch: {flat.shape[0]} images in {os.fspath(images)} but "
            f"{labs.shape[0]} labels in {os.fspath(labels)}"
        )
    bad = np.flatnonzero(labs > 9)
    if bad.size:
        i = int(bad[0])
        raise BadInputError(
            f"{os.fspath(labels)}: label {int(labs[i])} at index {i} is not a digit 0-9 "
            f"({bad.size} such label(s))"
        )
    return flat, labs


def load_sample(split: Literal["test", "train"] = "test") -> tuple[U8Array, U8Array]:
    """The MNIST digits shipped inside the package (see data/LICENSE-mnist.txt for provenance).

    "test" is 1,000 digits for demos and accuracy checks; "train" is 3,000 digits, enough to
    fit the demo's logistic regression on first use without any download.
    """
    if split not in _SAMPLE_FILES:
        raise BadInputError(f"unknown sample split {split!r}; choose 'test' or 'train'")
    image_name, label_name = _SAMPLE_FILES[split]
    data = resources.files("heinfer").joinpath("data")
    # as_file: the package may be imported from a zip, where there is no real path to open.
    with (
        resources.as_file(data.joinpath(image_name)) as image_path,
        resources.as_file(data.joinpath(label_name)) as label_path,
    ):
        return load_mnist(image_path, label_path)


# --------------------------------------------------------------------------------------------
# Photos and drawings


def _to_gray(img: Image.Image) -> npt.NDArray[np.float64]:
    """Luminance 0..255 as float, with transparency flattened so the strokes stay visible.

    Drawings exported from a canvas often have ink on a transparent background whose hidden
    colour is black; plain `convert("L")` would then give black ink on black. So transparent
    images are composited over white if their visible ink is dark, over black if it is light.
    """
    if img.mode.startswith("I;16") or img.mode == "I":
        a = np.asarray(img, dtype=np.float64)
        return a * (255.0 / 65535.0) if img.mode != "I" or a.max() > 255 else a
    if "A" in img.getbands() or "transparency" in img.info:
        la = np.asarray(img.convert("LA"), dtype=np.float64)
        lum, alpha = la[..., 0], la[..., 1] / 255.0
        if alpha.min() < 1.0:
            weight = alpha.sum()
            ink = float((lum * alpha).sum() / weight) if weight > 0 else 0.0
            background = 255.0 if ink < 128.0 else 0.0
            return lum * alpha + background * (1.0 - alpha)
        return lum
    return np.asarray(img.convert("L"), dtype=np.float64)


def _mnistify(gray: npt.NDArray[np.float64], name: str) -> npt.NDArray[np.float64]:
    """Turn a grayscale picture into what MNIST's own preprocessing would have produced."""
    if gray.mean() > 127.0:  # dark ink on light paper; MNIST is light ink on black
        gray = 255.0 - gray
    # Paper is rarely pure white nor ink pure black: take the median (the background, since
    # ink covers well under half a digit picture) as zero, and stretch so the typical stroke
    # core (not the single brightest pixel, which JPEG ringing inflates) is full white, as
    # MNIST's strokes are.
    gray = np.clip(gray - float(np.median(gray)), 0.0, None)
    peak = float(gray.max())
    if peak < 8.0:
        raise BadInputError(f"{name}: image is blank (no strokes stand out from the background)")
    core = float(np.median(gray[gray >= peak / 2]))
    gray = np.clip(gray * (255.0 / core), 0.0, 255.0)
    # Faint specks (paper grain, JPEG ringing) would widen the box the digit is scaled into.
    gray[gray < 0.1 * 255.0] = 0.0
    rows = np.flatnonzero(gray.any(axis=1))
    cols = np.flatnonzero(gray.any(axis=0))
    crop = gray[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    h, w = crop.shape
    scale = _BOX / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = Image.fromarray(crop.astype(np.float32)).resize(size, Image.Resampling.LANCZOS)
    patch = np.clip(np.asarray(small, dtype=np.float64), 0.0, 255.0)
    ph, pw = patch.shape
    # MNIST centres by centre of mass, not by bounding box, so a "7" sits left of centre; the
    # mass lands on pixel (14, 14) rather than the geometric 13.5 (the shared digits average
    # 14.00 on both axes), and matching that keeps real digits exactly where they were.
    mass = float(patch.sum())
    ys, xs = np.indices(patch.shape)
    cy = float((ys * patch).sum()) / mass if mass > 0 else (ph - 1) / 2
    cx = float((xs * patch).sum()) / mass if mass > 0 else (pw - 1) / 2
    top = min(max(round(_SIDE / 2 - cy), 0), _SIDE - ph)
    left = min(max(round(_SIDE / 2 - cx), 0), _SIDE - pw)
    out = np.zeros((_SIDE, _SIDE), dtype=np.float64)
    out[top : top + ph, left : left + pw] = patch
    return np.clip(out / 255.0, 0.0, 1.0).reshape(_PIXELS)


def load_image(path: StrPath) -> npt.NDArray[np.float64]:
    """Read a PNG/JPEG (any format Pillow knows) of one digit as an MNIST-like (784,) in [0, 1].

    A model trained on MNIST only sees digits the way MNIST shows them: white on black, scaled
    into a 20x20 box and centred by mass in 28x28. A photo of a handwritten digit differs in
    all of these, so this replays MNIST's preprocessing instead of a plain resize.
    """
    name = os.fspath(path)
    with open(path, "rb") as fh:  # missing file / permissions: OSError, not the file's fault
        try:
            with Image.open(fh) as opened:
                width, height = opened.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise BadInputError(
                        f"{name}: image is {width}x{height} pixels, over the "
                        f"{MAX_IMAGE_PIXELS:,}-pixel limit"
                    )
                opened.draft("L", (1024, 1024))  # JPEG: decode at reduced size, much cheaper
                img = ImageOps.exif_transpose(opened)  # phone photos are stored sideways
                img.thumbnail((1024, 1024))  # more pixels only cost time: the result is 28x28
                gray = _to_gray(img)
        except BadInputError:
            raise
        except UnidentifiedImageError as exc:
            raise BadInputError(f"{name}: not an image Pillow can read") from exc
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
            # Pillow reports corrupt or truncated image data with all of these.
            raise BadInputError(f"{name}: unreadable image data: {exc}") from exc
    return _mnistify(gray, name)
