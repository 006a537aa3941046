"""Stream once, read back many times: a disk cache of preprocessed calibration batches.

Decoding and preprocessing images is the slow part of calibration, and keeping every batch in
RAM would make memory grow with the number of samples. The first pass streams batches from
the reader and appends them to one file per input; later passes read one batch at a time back
from disk into fresh arrays, so memory holds a single batch whatever the data set size.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader

from ..config import Config
from ..errors import EXIT_FAILURE, XSlimError
from .readers import XSlimDataReader


@dataclass(frozen=True)
class _Slot:
    """Where one input's array of one batch lives in the cache."""

    file: Path
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype


class BatchCache:
    """A BatchSource: each call starts a pass; the first pass streams from the reader and writes to disk.

    A pass abandoned half way is resumed by the next one (cached batches first, then the
    reader again), so the reader is consumed exactly once. The folder is removed by
    ``close()``, by leaving a ``with`` block, or at interpreter exit.
    """

    def __init__(self, reader: CalibrationDataReader, cache_dir: str | os.PathLike | None = None) -> None:
        self._reader = reader
        if cache_dir is not None:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix="xslim-calib-", dir=cache_dir))
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.path, ignore_errors=True)
        self._index: list[dict[str, _Slot]] = []
        self._files: dict[str, Path] = {}
        self._complete = False
        self._streaming = False

    @property
    def num_batches(self) -> int | None:
        """Batches per pass: exact after the first pass, before that the reader's length if it has one."""
        if self._complete:
            return len(self._index)
        return len(self._reader) if hasattr(self._reader, "__len__") else None

    def __call__(self) -> Iterator[dict[str, np.ndarray]]:
        if not self._cleanup.alive:
            raise RuntimeError("this BatchCache is closed")
        return self._pass()

    def _pass(self) -> Iterator[dict[str, np.ndarray]]:
        i = 0
        while i < len(self._index):
            yield {name: self._load(slot) for name, slot in self._index[i].items()}
            i += 1
        if self._complete:
            return
        if self._streaming:
            raise RuntimeError("another pass over this BatchCache is still reading from the data reader")
        self._streaming = True
        try:
            while (batch := self._reader.get_next()) is not None:
                self._index.append(self._store(batch))
                yield batch
            self._complete = True
        finally:
            self._streaming = False

    def _store(self, batch: dict[str, np.ndarray]) -> dict[str, _Slot]:
        slots = {}
        try:
            for name, value in batch.items():
                arr = np.ascontiguousarray(value)
                file = self._files.setdefault(name, self.path / f"input{len(self._files)}.bin")
                with open(file, "ab") as f:
                    slots[name] = _Slot(file, f.tell(), arr.shape, arr.dtype)
                    arr.tofile(f)
        except OSError as exc:
            raise XSlimError(
                f"cannot write the calibration cache in {self.path}: {exc.strerror or exc}", EXIT_FAILURE
            ) from None
        return slots

    @staticmethod
    def _load(slot: _Slot) -> np.ndarray:
        with open(slot.file, "rb") as f:
            f.seek(slot.offset)
            count = int(np.prod(slot.shape, dtype=np.int64))
            return np.fromfile(f, dtype=slot.dtype, count=count).reshape(slot.shape)

    def close(self) -> None:
        """Remove the cache files (safe to call twice)."""
        self._cleanup()

    def __enter__(self) -> BatchCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def build_batch_source(
    config: Config,
    model: onnx.ModelProto,
    *,
    cache_dir: str | os.PathLike | None = None,
    max_batches: int | None = None,
    max_samples: int | None = None,
) -> BatchCache:
    """The calibration data of a config as a cached BatchSource.

    The cache goes in ``cache_dir``, else in the config's working_dir (where the run's other
    files go), else in the system temp folder.
    """
    reader = XSlimDataReader(config, model, max_batches=max_batches, max_samples=max_samples)
    return BatchCache(reader, cache_dir if cache_dir is not None else config.model_parameters.working_dir)
