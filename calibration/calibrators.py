"""ONNX Runtime integration: a calibrator with ORT's interface over our streaming statistics.

ORT's histogram calibrators keep every activation of every sample in memory; this one
keeps only scalars and fixed-size histograms (``collectors``) and turns them into ranges
with ``methods``. A ``CalibrationDataReader`` can be read only once, while the statistics
need two or three passes, so ``collect_data`` spools the batches to a temporary folder
and ``compute_data`` streams them back from there.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization.calibrate import (
    CalibraterBase,
    CalibrationDataReader,
    CalibrationMethod,
    TensorData,
    TensorsData,
)

from .batches import Batch
from .collectors import TensorStats, collect_statistics
from .methods import compute_ranges, needs_histogram


class StreamingCalibrater(CalibraterBase):
    """``collect_data`` then ``compute_data``, as ORT's calibrators; methods may differ per tensor.

    ``method``/``max_percentile`` are one value or a mapping from tensor name (tensors not
    in the mapping use ``default`` / 0.9999). After ``compute_data`` the statistics stay
    available as ``statistics`` for later stages (tuning, reports).
    """

    def __init__(
        self,
        model_path: str | Path,
        op_types_to_calibrate: Sequence[str] | None = None,
        augmented_model_path: str = "augmented_model.onnx",
        *,
        method: str | Mapping[str, str] = "default",
        max_percentile: float | Mapping[str, float] = 0.9999,
        num_bins: int = 2048,
        providers: Sequence[str] | None = None,
        session_options: ort.SessionOptions | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__(model_path, op_types_to_calibrate, augmented_model_path)
        self.method = method
        self.max_percentile = max_percentile
        self.num_bins = num_bins
        if providers:
            self.execution_providers = list(providers)
        self.session_options = session_options
        self.progress = progress
        self.statistics: dict[str, TensorStats] = {}
        self._spool = _Spool()

    def augment_graph(self) -> None:
        """Nothing to do: ``collect_statistics`` builds its own graphs for each pass."""

    def create_inference_session(self) -> None:
        """Nothing to do: sessions live only inside ``compute_data``."""

    def collect_data(self, data_reader: CalibrationDataReader) -> None:
        """Spool the reader's batches (may be called several times; all batches are used)."""
        while True:
            batch = data_reader.get_next()
            if not batch:
                break
            self._spool.append(batch)

    def compute_data(self) -> TensorsData:
        """Ranges of every float tensor ORT would calibrate, from all spooled batches."""
        if not len(self._spool):
            raise ValueError("no calibration data collected: call collect_data with a non-empty reader")
        tensors, _ = self.select_tensors_to_calibrate(self.model)
        names = sorted(tensors)
        if isinstance(self.method, str):
            hist: bool | set[str] = needs_histogram(self.method)
        else:
            hist = {n for n in names if needs_histogram(self.method.get(n, "default"))}
        self.statistics = collect_statistics(
            self.model, names, self._spool.batches, histograms=hist, num_bins=self.num_bins,
            providers=self.execution_providers, progress=self.progress,
            session_options=self.session_options,
        )
        ranges = compute_ranges(self.statistics, self.method, max_percentile=self.max_percentile)
        data = {
            name: TensorData(lowest=np.float32(lo), highest=np.float32(hi)) for name, (lo, hi) in ranges.items()
        }
        return TensorsData(CalibrationMethod.MinMax, data)

    def clear_collected_data(self) -> None:
        """Forget spooled batches and statistics."""
        self._spool = _Spool()
        self.statistics = {}


class _Spool:
    """Batches saved one file each in a temporary folder (removed with the object)."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="xslim_spool.")
        self._names: list[list[str]] = []

    def __len__(self) -> int:
        return len(self._names)

    def append(self, batch: Mapping[str, np.ndarray]) -> None:
        names = list(batch)
        path = Path(self._dir.name) / f"{len(self._names):08d}.npz"
        np.savez(path, *[np.asarray(batch[n]) for n in names])
        self._names.append(names)

    def batches(self) -> Iterator[Batch]:
        for i, names in enumerate(self._names):
            with np.load(Path(self._dir.name) / f"{i:08d}.npz") as f:
                yield {n: f[f"arr_{k}"] for k, n in enumerate(names)}
