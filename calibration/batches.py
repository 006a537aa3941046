"""The one shape calibration data takes inside xslim-ort.

A ``BatchSource`` is a callable; each call starts a fresh pass over the same batches,
each batch a ``{input_name: ndarray}`` dict. Collectors that need several passes call it
several times; the stream-once cache makes repeated passes cheap.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np

Batch = dict[str, np.ndarray]
BatchSource = Callable[[], Iterator[Batch]]


def source_from_batches(batches: Sequence[Batch]) -> BatchSource:
    """A BatchSource over batches already in memory (tests, small API uses)."""

    def passes() -> Iterator[Batch]:
        return iter(batches)

    return passes
