"""Reading the dataset's TIFF files (and PNG images), with errors that name the file and the problem."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import imagecodecs
import numpy as np
import tifffile

from ..errors import DataError

PathLike = str | os.PathLike[str]

IMAGE_SUFFIXES = (".tif", ".tiff", ".png")
"""The image files :func:`read_image` reads (TIFF through tifffile, PNG through imagecodecs)."""

# tifffile logs its own complaint about broken files before returning nothing; we raise instead
logging.getLogger("tifffile").setLevel(logging.ERROR)


def _missing(path: Path) -> DataError:
    if path.is_symlink():
        return DataError(path, f"broken symbolic link (it points to {os.readlink(path)}, which does not exist)")
    return DataError(path, "file not found")


def _one_page(tif: tifffile.TiffFile, path: Path) -> None:
    """Refuse a multi-page TIFF: a stack of greyscale pages would otherwise read as one planar RGB image."""
    n = len(tif.pages)
    if n == 0:
        raise DataError(path, "TIFF has no image pages (truncated or incompletely written file?)")
    if n > 1:
        raise DataError(path, f"TIFF holds {n} pages (a stack or a multi-page file); expected a single 2-D image")


def _read_tiff(path: PathLike) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise _missing(path)
    try:
        with tifffile.TiffFile(path) as tif:
            _one_page(tif, path)
            arr = tif.asarray()
    except DataError:
        raise
    except Exception as e:  # tifffile/imagecodecs raise many types for broken files
        raise DataError(path, f"cannot read TIFF ({type(e).__name__}: {e}); the file may be truncated or not a TIFF") from None
    if arr.size == 0:
        raise DataError(path, "TIFF decoded to an empty array (truncated file?)")
    return arr


def _read_png(path: Path) -> np.ndarray:
    """A PNG's pixels as stored: 16-bit PNGs stay uint16 (Pillow reads 16-bit RGB as 8-bit)."""
    if not path.is_file():
        raise _missing(path)
    try:
        arr = imagecodecs.png_decode(path.read_bytes())
    except Exception as e:  # imagecodecs raises PngError (and others) for broken files
        raise DataError(path, f"cannot read PNG ({type(e).__name__}: {e}); the file may be truncated or not a PNG") from None
    if arr.size == 0:
        raise DataError(path, "PNG decoded to an empty array")
    return arr


def tiff_shape(path: PathLike) -> tuple[int, int]:
    """(height, width) of a single-page TIFF, read from its header without decoding the pixels."""
    path = Path(path)
    if not path.is_file():
        raise _missing(path)
    try:
        with tifffile.TiffFile(path) as tif:
            _one_page(tif, path)
            page = tif.pages[0]
            return int(page.imagelength), int(page.imagewidth)
    except DataError:
        raise
    except Exception as e:
        raise DataError(path, f"cannot read TIFF header ({type(e).__name__}: {e})") from None


def read_image(path: PathLike) -> np.ndarray:
    """Read an image TIFF (or a PNG, by its suffix) as RGB, without changing its values.

    Accepts RGBA, RGB and grey, uint8 or uint16 (or float in [0, 1], stored as uint16), in
    contiguous or planar layout. Alpha is dropped; grey is repeated to 3 channels. 16-bit images
    keep their 16 bits (how they become the model's [0, 1] input is ``data.intensity``, see
    :mod:`cellkit.data.intensity`).

    Returns:
        ``(H, W, 3)`` array of dtype uint8 or uint16.

    Raises:
        DataError: missing, unreadable or truncated file; a multi-page TIFF; unsupported shape or dtype.
    """
    arr = _read_png(Path(path)) if Path(path).suffix.lower() == ".png" else _read_tiff(path)
    if arr.ndim == 3 and arr.shape[0] in (1, 2, 3, 4) and arr.shape[-1] not in (1, 2, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # planar (samples, H, W)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 2, 3, 4):
        raise DataError(path, f"expected a grey, RGB or RGBA image, got an array of shape {arr.shape}")
    channels = arr.shape[-1]
    if channels in (1, 2):  # grey, grey + alpha
        arr = np.repeat(arr[..., :1], 3, axis=-1)
    else:  # RGB, RGBA
        arr = arr[..., :3]
    if arr.dtype in (np.uint8, np.uint16):
        return np.ascontiguousarray(arr)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise DataError(path, "image contains NaN or infinite values")
        if arr.min() < 0 or arr.max() > 1:
            raise DataError(path, f"float image values must lie in [0, 1], found {arr.min():g}..{arr.max():g}")
        return np.round(arr * 65535).astype(np.uint16)
    raise DataError(path, f"unsupported image dtype {arr.dtype} (expected uint8, uint16 or float in [0, 1])")


def read_label_map(path: PathLike, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read a ``classK.tif`` label map: 0 is background, each distinct non-zero value one instance.

    Args:
        path: the label map (float64 or integer TIFF).
        shape: the (H, W) of its image; a different shape is an error.

    Returns:
        ``(H, W)`` int64 array of the original (non-contiguous) instance ids; ids of 2**63 and more
        (uint64 or float maps) are numbered 1..N in their order instead (0 stays background).

    Raises:
        DataError: unreadable file, shape mismatch, NaN/infinite, negative or non-integer ids.
    """
    arr = _read_tiff(path)
    if arr.ndim == 3 and 1 in (arr.shape[0], arr.shape[-1]):
        arr = arr.reshape(arr.shape[:2] if arr.shape[-1] == 1 else arr.shape[1:])
    if arr.ndim != 2:
        raise DataError(path, f"label map must be a 2-D array, got shape {arr.shape}")
    if shape is not None and tuple(arr.shape) != tuple(shape):
        raise DataError(
            path, f"label map is {arr.shape[0]} x {arr.shape[1]} (H x W) but its image is {shape[0]} x {shape[1]}"
        )
    if np.issubdtype(arr.dtype, np.floating):
        finite = np.isfinite(arr)
        if not finite.all():
            raise DataError(path, f"label map contains {int((~finite).sum())} NaN or infinite values")
        frac = arr != np.round(arr)
        if frac.any():
            raise DataError(path, f"label map has non-integer ids (e.g. {arr[frac][0]!r}); ids must be whole numbers")
    elif not np.issubdtype(arr.dtype, np.integer) and arr.dtype != np.bool_:
        raise DataError(path, f"unsupported label map dtype {arr.dtype}")
    if arr.min() < 0:
        raise DataError(path, f"label map has negative ids (min {arr.min():g}); ids must be >= 0")
    if arr.dtype in (np.uint64, np.float64, np.float32) and arr.max() >= 2**63:
        # ids past int64 (uint64 near 2**64, floats near 2**63) would wrap to negative numbers and
        # make the background a cell: number them 1..N in their order instead (0 stays background)
        ids, inverse = np.unique(arr, return_inverse=True)
        return (inverse.reshape(arr.shape) + int(ids[0] != 0)).astype(np.int64)
    return arr.astype(np.int64, copy=False)
