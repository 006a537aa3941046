"""Calibration data readers: list files in, ``{input_name: batch}`` dicts out.

``XSlimDataReader`` is an ONNX Runtime ``CalibrationDataReader`` so that ORT-style scripts can
use it directly; inside xslim-ort it feeds the stream-once ``BatchCache``. It decodes each sample
only when its batch is asked for, so memory holds one batch whatever the list length.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper
from onnxruntime.quantization import CalibrationDataReader

from ..config import Config, InputParameter
from ..errors import ConfigError, DataError
from .preprocess import (
    PRESETS,
    ImageTransform,
    UserFunction,
    call_user_function,
    load_user_function,
    parse_user_reference,
)

logger = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


@dataclass(frozen=True)
class InputSpec:
    """One model input as calibration feeds it.

    ``dtype`` is what the model takes (data of another type are converted to it when the
    conversion keeps the kind); ``layout`` is set for image inputs only.
    """

    name: str
    shape: tuple[int, ...]  # fully resolved, batch dim = batch size
    dtype: np.dtype
    layout: str | None  # "NCHW", "NHWC" or None (not an image)


@dataclass(frozen=True)
class _Resolved:
    pairs: list[tuple[InputParameter, InputSpec]]
    indices: list[int]  # each pair's position in input_parametres (for error messages)
    fixed_batch: bool  # the model's batch dimension is a fixed number


def _entry_path(index: int) -> str:
    return f"calibration_parameters.input_parametres[{index}]"


def _model_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are really fed (initializers listed as inputs are not)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _model_dims(vi: onnx.ValueInfoProto) -> list[int | str] | None:
    """The input's dims: an int where fixed, the dim's name (or "?") where symbolic; None if unknown."""
    tensor = vi.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    return [d.dim_value if d.dim_value > 0 else (d.dim_param or "?") for d in tensor.shape.dim]


def _layout(shape: tuple[int, ...]) -> str:
    """NHWC only where the shape says so: last dim 1 or 3 and dim 1 not a channel count."""
    if shape[3] in (1, 3) and shape[1] not in (1, 3):
        return "NHWC"
    return "NCHW"


def _match_entries(config: Config, inputs: list[onnx.ValueInfoProto]) -> dict[str, tuple[int, InputParameter]]:
    names = [i.name for i in inputs]
    entries = config.inputs
    if len(entries) > len(inputs):
        raise DataError(
            f"calibration_parameters.input_parametres has {len(entries)} entries but the model has "
            f"{len(inputs)} input(s): {', '.join(names)}"
        )
    matched: dict[str, tuple[int, InputParameter]] = {}
    for index, entry in enumerate(entries):
        if entry.input_name is None:
            name = names[index]
        elif entry.input_name in names:
            name = entry.input_name
        else:
            raise DataError(
                f"{_entry_path(index)}.input_name: the model has no input {entry.input_name!r}; "
                f"its inputs are: {', '.join(names)}"
            )
        if name in matched:
            raise DataError(
                f"{_entry_path(index)}: input {name!r} already has an entry ({_entry_path(matched[name][0])})"
            )
        matched[name] = (index, entry)
    missing = [n for n in names if n not in matched]
    if missing:
        raise DataError(
            f"calibration_parameters.input_parametres: no entry for model input(s) {', '.join(missing)} "
            "(one entry per model input, in model input order)"
        )
    return matched


def _resolve(config: Config, model: onnx.ModelProto) -> _Resolved:
    inputs = _model_inputs(model)
    matched = _match_entries(config, inputs)
    batch_override = config.calibration_parameters.calibration_batch_size
    pairs, indices, fixed_any = [], [], False
    for vi in inputs:
        index, entry = matched[vi.name]
        where = f"{_entry_path(index)} (input {vi.name!r})"
        if not vi.type.HasField("tensor_type"):
            raise DataError(f"{where}: only tensor inputs can be calibrated")
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))
        if entry.dtype is not None and not np.can_cast(np.dtype(entry.dtype), dtype, "same_kind"):
            raise DataError(f"{where}: dtype is {entry.dtype} in the config but the model takes {dtype}")
        dims = _model_dims(vi)
        if entry.input_shape is not None:
            shape = list(entry.input_shape)
            if dims is not None:
                _check_given_shape(where, shape, dims)
        elif dims is None:
            raise DataError(f"{where}: the model gives no shape; set input_shape")
        else:
            shape = _fill_symbolic(where, dims)
        if not shape:
            raise DataError(f"{where}: a scalar input has no batch dimension to calibrate over")
        fixed = dims is not None and isinstance(dims[0], int)
        if batch_override is not None:
            if fixed and batch_override != shape[0]:
                raise DataError(
                    f"{where}: calibration_batch_size is {batch_override} but the model's batch "
                    f"dimension is fixed at {shape[0]}"
                )
            shape[0] = batch_override
        layout = None
        if entry.file_type == "img":
            if len(shape) != 4:
                raise DataError(f"{where}: file_type img needs a 4-D NCHW or NHWC input, the shape is {shape}")
            layout = _layout(tuple(shape))
        pairs.append((entry, InputSpec(vi.name, tuple(shape), dtype, layout)))
        indices.append(index)
        fixed_any = fixed_any or fixed
    sizes = {spec.name: spec.shape[0] for _, spec in pairs}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{n!r} has {b}" for n, b in sizes.items())
        raise DataError(f"all inputs need the same batch size (line i of every list is sample i): {listed}")
    return _Resolved(pairs, indices, fixed_any)


def _check_given_shape(where: str, shape: list[int], dims: list[int | str]) -> None:
    if len(shape) != len(dims):
        raise DataError(f"{where}: input_shape {shape} has {len(shape)} dims but the model's input has {len(dims)}")
    for axis, (given, model_dim) in enumerate(zip(shape, dims, strict=True)):
        if isinstance(model_dim, int) and model_dim != given:
            raise DataError(
                f"{where}: input_shape {shape} gives {given} for dimension {axis}, which the model fixes at {model_dim}"
            )


def _fill_symbolic(where: str, dims: list[int | str]) -> list[int]:
    """A symbolic batch dim becomes 1; any other symbolic dim needs an input_shape."""
    for axis, d in enumerate(dims[1:], start=1):
        if not isinstance(d, int):
            raise DataError(
                f"{where}: dimension {axis} ({d!r}) of shape {dims} is symbolic; set input_shape in this entry"
            )
    return [dims[0] if isinstance(dims[0], int) else 1, *dims[1:]]


def resolve_inputs(config: Config, model: onnx.ModelProto) -> list[tuple[InputParameter, InputSpec]]:
    """Match config entries to the model's fed inputs (by input_name, else by position), in model order."""
    return _resolve(config, model).pairs


# --------------------------------------------------------------------------- list files


@dataclass(frozen=True)
class Sample:
    """One line of a list file: the data file and where it was named (for error messages)."""

    path: Path
    list_file: Path
    line: int

    @property
    def where(self) -> str:
        return f"{self.list_file}:{self.line}"


def _find_file(config: Config, value: str, what: str) -> Path:
    """Where xslim looks (cwd, then the config's folder); not finding data is a DataError."""
    try:
        return config.resolve_input_path(value, what)
    except ConfigError as exc:
        raise DataError(exc.message) from None


def list_file_path(config: Config, entry: InputParameter, index: int) -> Path:
    """The entry's data_list_path, found on disk."""
    what = f"{_entry_path(index)}.data_list_path"
    if not entry.data_list_path:
        raise DataError(f"{what}: required for static quantization (a text file with one sample path per line)")
    return _find_file(config, entry.data_list_path, what)


def _user_function_file(config: Config, entry: InputParameter, index: int) -> tuple[Path, str, str] | None:
    """File, function and reference of a ``path.py:function`` preprocess_file; None for none or a preset."""
    ref = entry.preprocess_file
    if ref is None or ref in PRESETS:
        return None
    path, func = parse_user_reference(ref)
    return _find_file(config, path, f"{_entry_path(index)}.preprocess_file"), func, ref


def read_list(list_file: Path) -> list[Sample]:
    """Parse a list: one path per line, relative to the list's folder; blank lines skipped.

    Tolerates a UTF-8 BOM, CRLF line ends and surrounding spaces, which editors on other
    systems leave behind.
    """
    try:
        raw = list_file.read_bytes()
    except OSError as exc:
        raise DataError(f"{list_file}: cannot read the list file: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{list_file}: the list file is not UTF-8 text (byte {exc.start})") from None
    folder = list_file.parent
    # split("\n") rather than splitlines(): form feeds and the like must not shift line numbers
    samples = [
        Sample(folder / line.strip(), list_file, number)
        for number, line in enumerate(text.split("\n"), start=1)
        if line.strip()
    ]
    if not samples:
        raise DataError(f"{list_file}: no samples (the list file is empty or has only blank lines)")
    return samples


# --------------------------------------------------------------------------- per-input loaders

SampleLoader = Callable[[Sample], np.ndarray]


def _same_kind(arr: np.ndarray, dtype: np.dtype, what: str, name: str) -> np.ndarray:
    if arr.dtype != dtype and not np.can_cast(arr.dtype, dtype, "same_kind"):
        raise DataError(f"{what} holds {arr.dtype} data but input {name!r} takes {dtype}")
    return np.ascontiguousarray(arr, dtype=dtype)


_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # .npz


def _npy_loader(spec: InputSpec) -> SampleLoader:
    sample_shape = spec.shape[1:]

    def load(s: Sample) -> np.ndarray:
        try:
            with open(s.path, "rb") as fh:
                magic = fh.read(len(_NPY_MAGIC))
            # np.load takes anything else for a pickle, and its message would suggest allow_pickle
            if not magic.startswith((_NPY_MAGIC, *_ZIP_MAGICS)):
                what = "it is empty" if not magic else "it does not start with the NumPy header"
                raise DataError(f"{s.where}: {s.path} is not an .npy file ({what})")
            arr = np.load(s.path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise DataError(f"{s.where}: cannot read .npy file {s.path}: {exc}") from None
        if not isinstance(arr, np.ndarray):
            raise DataError(f"{s.where}: {s.path} is an .npz archive, not an .npy array")
        if arr.shape == (1, *sample_shape):
            arr = arr[0]
        elif arr.shape != sample_shape:
            raise DataError(
                f"{s.where}: {s.path} has shape {list(arr.shape)}; input {spec.name!r} needs "
                f"{list(sample_shape)} per sample (or {[1, *sample_shape]})"
            )
        return _same_kind(arr, spec.dtype, f"{s.where}: {s.path}", spec.name)

    return load


def _raw_loader(spec: InputSpec, entry: InputParameter) -> SampleLoader:
    sample_shape = spec.shape[1:]
    file_dtype = np.dtype(entry.dtype) if entry.dtype else spec.dtype
    expected = math.prod(sample_shape) * file_dtype.itemsize

    def load(s: Sample) -> np.ndarray:
        try:
            size = s.path.stat().st_size
            if size != expected:
                raise DataError(
                    f"{s.where}: {s.path} has {size} bytes; expected {expected} ({file_dtype} {list(sample_shape)})"
                )
            arr = np.fromfile(s.path, dtype=file_dtype).reshape(sample_shape)
        except OSError as exc:
            raise DataError(f"{s.where}: cannot read {s.path}: {exc.strerror or exc}") from None
        return _same_kind(arr, spec.dtype, f"{s.where}: {s.path}", spec.name)

    return load


def _image_loader(spec: InputSpec, entry: InputParameter, index: int) -> SampleLoader:
    nhwc = spec.layout == "NHWC"
    channels = spec.shape[3] if nhwc else spec.shape[1]
    height, width = (spec.shape[1], spec.shape[2]) if nhwc else (spec.shape[2], spec.shape[3])
    if channels not in (1, 3):
        raise DataError(
            f"{_entry_path(index)} (input {spec.name!r}): images give 1 or 3 channels, "
            f"the input has {channels} (shape {list(spec.shape)}, {spec.layout})"
        )
    stats = {}
    for key, default in (("mean_value", 0.0), ("std_value", 1.0)):
        values = getattr(entry, key) or [default]
        if len(values) not in (1, channels):
            raise DataError(
                f"{_entry_path(index)}.{key}: has {len(values)} values; input {spec.name!r} has {channels} channel(s)"
            )
        stats[key] = np.asarray(values, dtype=np.float32)
    transform = ImageTransform(
        height=height,
        width=width,
        channels=channels,
        rgb=entry.color_format == "rgb",
        mean=stats["mean_value"],
        std=stats["std_value"],
        nhwc=nhwc,
        preset=entry.preprocess_file if entry.preprocess_file in PRESETS else None,
        dtype=spec.dtype,
    )
    return lambda s: transform(s.path, s.where)


def _check_finite(arr: np.ndarray, samples: list[Sample], what: str) -> None:
    """NaN/Inf would poison every range statistic; name the first sample that has one."""
    if not np.issubdtype(arr.dtype, np.floating):
        return
    flat = arr.reshape(arr.shape[0], -1)
    bad = ~np.isfinite(flat).all(axis=1)
    if bad.any():
        s = samples[int(np.argmax(bad))]
        raise DataError(f"{s.where}: NaN or Inf in {what}{s.path}")


class _InputStream:
    """The samples of one input and how to turn a run of them into a batch array."""

    def __init__(self, config: Config, index: int, entry: InputParameter, spec: InputSpec) -> None:
        self.entry = entry
        self.spec = spec
        self.list_file = list_file_path(config, entry, index)
        self.samples = read_list(self.list_file)
        self.batch: Callable[[int, int], np.ndarray]
        user = _user_function_file(config, entry, index)
        if user is not None:
            self.batch = self._user_batches(load_user_function(*user), user[2])
            return
        ref = entry.preprocess_file
        if ref is not None and entry.file_type != "img":
            raise DataError(
                f"{_entry_path(index)}.preprocess_file: {ref} is an image preset but file_type is {entry.file_type}"
            )
        if entry.file_type == "img":
            loader = _image_loader(spec, entry, index)
        elif entry.file_type == "npy":
            loader = _npy_loader(spec)
        else:
            loader = _raw_loader(spec, entry)
        self.batch = self._sample_batches(loader)

    def _sample_batches(self, loader: SampleLoader) -> Callable[[int, int], np.ndarray]:
        def batch(start: int, stop: int) -> np.ndarray:
            samples = self.samples[start:stop]
            out = np.empty((len(samples), *self.spec.shape[1:]), dtype=self.spec.dtype)
            for i, s in enumerate(samples):
                out[i] = loader(s)
            _check_finite(out, samples, "")
            return out

        return batch

    def _user_batches(self, fn: UserFunction, ref: str) -> Callable[[int, int], np.ndarray]:
        entry = self.entry.to_dict()
        entry.update(input_name=self.spec.name, input_shape=list(self.spec.shape), dtype=str(self.spec.dtype))

        def batch(start: int, stop: int) -> np.ndarray:
            samples = self.samples[start:stop]
            shape = (len(samples), *self.spec.shape[1:])
            where = f"{samples[0].where}-{samples[-1].line}"
            paths = [s.path for s in samples]
            out = call_user_function(fn, ref, paths, dict(entry), shape, self.spec.dtype, where)
            _check_finite(out, samples, f"what {ref} returned for ")
            return out

        return batch


class XSlimDataReader(CalibrationDataReader):
    """Batches of calibration data read from the config's list files, decoded on demand.

    At most ``calibration_step`` batches (or ``max_batches`` when given); ``max_samples``
    caps the samples read. A final partial batch is fed unless the model's batch dimension
    is fixed, where it could not be fed.
    """

    def __init__(
        self,
        config: Config,
        model: onnx.ModelProto,
        *,
        max_batches: int | None = None,
        max_samples: int | None = None,
    ) -> None:
        resolved = _resolve(config, model)
        self.specs = [spec for _, spec in resolved.pairs]
        self._streams = [
            _InputStream(config, index, entry, spec)
            for index, (entry, spec) in zip(resolved.indices, resolved.pairs, strict=True)
        ]
        first = self._streams[0]
        for other in self._streams[1:]:
            if len(other.samples) != len(first.samples):
                raise DataError(
                    f"the list files differ in length: {first.list_file} has {len(first.samples)} samples, "
                    f"{other.list_file} has {len(other.samples)} (line i of every list is sample i)"
                )
        samples = len(first.samples) if max_samples is None else min(max_samples, len(first.samples))
        self.batch_size = self.specs[0].shape[0]
        batches = samples // self.batch_size
        if samples % self.batch_size and not resolved.fixed_batch:
            batches += 1
        limit = config.calibration_parameters.calibration_step if max_batches is None else max_batches
        self._num_batches = min(batches, limit)
        self._num_samples = min(samples, self._num_batches * self.batch_size)
        if self._num_batches == 0:
            raise DataError(
                f"{first.list_file}: {samples} sample(s) do not fill one batch of {self.batch_size}, "
                "and the model's batch dimension is fixed"
            )
        for stream in self._streams:
            for s in stream.samples[: self._num_samples]:
                if not s.path.is_file():
                    raise DataError(f"{s.where}: file not found: {s.path}")
        self._next = 0

    def __len__(self) -> int:
        return self._num_batches

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= self._num_batches:
            return None
        start = self._next * self.batch_size
        stop = min(start + self.batch_size, self._num_samples)
        batch = {stream.spec.name: stream.batch(start, stop) for stream in self._streams}
        self._next += 1  # only once the batch is built, so a failed batch is not silently skipped
        return batch

    def rewind(self) -> None:
        self._next = 0


# --------------------------------------------------------------------------- fingerprint, devices


def data_fingerprint(config: Config, model: onnx.ModelProto) -> str:
    """A hash that changes when the calibration data or their preprocessing could change.

    Covers the list contents, every listed file's size and mtime, the entries' settings,
    the resolved specs, calibration_step and any user preprocess file's bytes — so range
    caches can be reused safely without decoding anything.
    """
    h = hashlib.sha256()
    resolved = _resolve(config, model)
    h.update(json.dumps({"steps": config.calibration_parameters.calibration_step}).encode())
    for index, (entry, spec) in zip(resolved.indices, resolved.pairs, strict=True):
        settings = {**entry.to_dict(), "spec": [spec.name, list(spec.shape), str(spec.dtype), spec.layout]}
        h.update(json.dumps(settings, sort_keys=True).encode())
        list_file = list_file_path(config, entry, index)
        h.update(list_file.read_bytes())
        for s in read_list(list_file):
            try:
                st = s.path.stat()
                h.update(f"{s.path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{s.path}\0missing\n".encode())
        user = _user_function_file(config, entry, index)
        if user is not None:
            h.update(user[0].read_bytes())
    return h.hexdigest()


@functools.cache
def _warn_no_cuda() -> None:
    logger.warning("calibration_device is cuda but ONNX Runtime has no CUDAExecutionProvider here; using CPU")


def providers_for(device: str | None) -> list[str]:
    """ORT execution providers for calibration_device: cuda falls back to CPU with one warning."""
    if device not in (None, "cuda", "cpu"):
        raise ConfigError(f"calibration_parameters.calibration_device: use cuda or cpu, got {device!r}")
    if device == "cpu":
        return [CPU]
    if CUDA in ort.get_available_providers():
        return [CUDA, CPU]
    if device == "cuda":
        _warn_no_cuda()
    return [CPU]
