"""Turning one calibration file into one model-ready sample: image decoding, presets, user code.

The image paths follow xslim 2.1.2 (OpenCV decoding, its resize and crop arithmetic) so that a
config tuned for xslim calibrates on the same pixels here. Everything works on one sample
(H, W, C) at a time; the reader stacks samples into batches.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..errors import DataError

PRESETS = ("IMAGENET", "PT_IMAGENET")
# Both presets resize the short side to H / 0.875 (256 for 224) before the centre crop;
# each keeps the arithmetic of the implementation it copies (xslim's cv2 code, torchvision).
CROP_PERCENT = 87.5

UserFunction = Callable[[list[str], dict[str, Any]], Any]


def decode_image(path: Path, channels: int, where: str) -> np.ndarray:
    """Decode an image as uint8 (H, W, channels), BGR for 3 channels.

    ``np.fromfile`` + ``cv2.imdecode`` rather than ``cv2.imread`` so that non-ASCII paths
    work on every platform. ``where`` ("list.txt:12") prefixes error messages.
    """
    try:
        buf = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise DataError(f"{where}: cannot read image {path}: {exc.strerror or exc}") from None
    flags = cv2.IMREAD_GRAYSCALE if channels == 1 else cv2.IMREAD_COLOR
    img = cv2.imdecode(buf, flags) if buf.size else None
    if img is None:
        raise DataError(f"{where}: cannot decode image {path}")
    return img.reshape(img.shape[0], img.shape[1], channels)


def resize_direct(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize straight to (width, height) with area interpolation, as xslim 2.1.2 does."""
    if img.shape[:2] == (height, width):
        return img
    out = cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA)
    return out.reshape(height, width, img.shape[2])


def preset_imagenet(img: np.ndarray, height: int, width: int, where: str) -> np.ndarray:
    """xslim's IMAGENET: aspect-preserving area resize to (H, W) / 0.875 on the short side, centre crop."""
    h, w = img.shape[:2]
    new_h = int(100.0 * height / CROP_PERCENT)
    new_w = int(100.0 * width / CROP_PERCENT)
    size = (new_w, int(new_h * h / w)) if h > w else (int(new_w * w / h), new_h)
    out = cv2.resize(img, size, interpolation=cv2.INTER_AREA).reshape(size[1], size[0], img.shape[2])
    top = int((out.shape[0] - height) / 2)
    left = int((out.shape[1] - width) / 2)
    return _crop(out, top, left, height, width, where)


def preset_pt_imagenet(img: np.ndarray, height: int, width: int, where: str) -> np.ndarray:
    """torchvision style: bilinear resize of the short side to int(H / 0.875), rounded centre crop."""
    h, w = img.shape[:2]
    short = int(height / (CROP_PERCENT / 100.0))
    size = (short, int(short * h / w)) if h > w else (int(short * w / h), short)
    out = cv2.resize(img, size, interpolation=cv2.INTER_LINEAR).reshape(size[1], size[0], img.shape[2])
    top = round((out.shape[0] - height) / 2.0)
    left = round((out.shape[1] - width) / 2.0)
    return _crop(out, top, left, height, width, where)


def _crop(img: np.ndarray, top: int, left: int, height: int, width: int, where: str) -> np.ndarray:
    if top < 0 or left < 0:
        # PT_IMAGENET sizes the short side from H alone, so an input much wider than tall can
        # end up wider than the resized image.
        raise DataError(
            f"{where}: the resized image is {img.shape[1]}x{img.shape[0]}, smaller than the {width}x{height} crop"
        )
    return img[top : top + height, left : left + width]


@dataclass(frozen=True)
class ImageTransform:
    """The per-image steps of one input: geometry, colour order, normalisation, layout."""

    height: int
    width: int
    channels: int
    rgb: bool
    mean: np.ndarray  # float32, one value per fed channel (or a single value)
    std: np.ndarray
    nhwc: bool
    preset: str | None
    dtype: np.dtype

    def __call__(self, path: Path, where: str) -> np.ndarray:
        img = decode_image(path, self.channels, where)
        if self.preset == "IMAGENET":
            img = preset_imagenet(img, self.height, self.width, where)
        elif self.preset == "PT_IMAGENET":
            img = preset_pt_imagenet(img, self.height, self.width, where)
        else:
            img = resize_direct(img, self.height, self.width)
        if self.rgb and self.channels == 3:
            img = img[:, :, ::-1]
        x = (img.astype(np.float32) - self.mean) / self.std
        if not self.nhwc:
            x = x.transpose(2, 0, 1)
        return to_dtype(x, self.dtype)


def to_dtype(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast normalised pixels to the input's type; integer inputs get rounded, clipped pixels."""
    if np.issubdtype(dtype, np.floating):
        return np.ascontiguousarray(x, dtype=dtype)
    info = np.iinfo(dtype)
    return np.clip(np.rint(x), info.min, info.max).astype(dtype)


def parse_user_reference(value: str) -> tuple[str, str]:
    """Split ``path.py:function`` (rsplit, so a Windows drive letter survives)."""
    path, sep, func = value.rpartition(":")
    if not sep or not path.endswith(".py") or not func.isidentifier():
        raise DataError(f"preprocess_file must be IMAGENET, PT_IMAGENET or path.py:function, got {value!r}")
    return path, func


def load_user_function(path: Path, func: str, reference: str) -> UserFunction:
    """Import ``func`` from the file at ``path`` without leaving its folder on sys.path.

    The folder is on sys.path only while the module runs, so that it can import helpers
    next to it; the module gets a private name (from its path) so two files called the same
    do not clash, and is registered under it so dataclasses and pickling inside it work.
    """
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    name = f"xslim_ort_user_preprocess_{digest}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise DataError(f"{reference}: cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise DataError(f"{reference}: importing {path} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        sys.path.remove(folder)
    fn = getattr(module, func, None)
    if not callable(fn):
        raise DataError(f"{reference}: {path} has no function {func!r}")
    return fn


def call_user_function(
    fn: UserFunction,
    reference: str,
    paths: Sequence[Path],
    entry: dict[str, Any],
    expected_shape: tuple[int, ...],
    dtype: np.dtype,
    where: str,
) -> np.ndarray:
    """Run a user preprocess function on one batch and check what it gives back."""
    try:
        out = fn([str(p) for p in paths], entry)
    except Exception as exc:
        raise DataError(f"{where}: {reference} failed: {type(exc).__name__}: {exc}") from exc
    arr = user_result_to_numpy(out, reference)
    if tuple(arr.shape) != tuple(expected_shape):
        raise DataError(
            f"{reference} returned shape {list(arr.shape)} for input {entry['input_name']!r}; "
            f"expected {list(expected_shape)}"
        )
    if arr.dtype != dtype and not np.can_cast(arr.dtype, dtype, "same_kind"):
        raise DataError(
            f"{reference} returned {arr.dtype} data for input {entry['input_name']!r}, "
            f"which takes {np.dtype(dtype)} (shape {list(expected_shape)})"
        )
    return np.ascontiguousarray(arr, dtype=dtype)


def user_result_to_numpy(out: Any, reference: str) -> np.ndarray:
    """A NumPy array as is; a torch tensor via detach/cpu/numpy (torch is never imported here)."""
    if isinstance(out, np.ndarray):
        return out
    if type(out).__module__.split(".")[0] == "torch":
        return out.detach().cpu().numpy()
    raise DataError(f"{reference} returned {type(out).__name__}; expected a NumPy array or a torch tensor")
