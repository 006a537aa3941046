"""A cache of computed activation ranges, so re-quantizing unchanged inputs skips calibration.

An entry is ``<cache_dir>/<key>.json``; the key fingerprints the model (its graph and
weights, hashed piece by piece so models over 2 GB work too), the caller's fingerprint of
the calibration data, and the settings that shaped the ranges (methods, percentiles, bins,
tensor list...). Anything that changes any of them changes the key, so a stale entry is
never read; entries are written atomically and as deterministic JSON.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import onnx

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the meaning of cached ranges changes


def fingerprint(model: onnx.ModelProto, data_fingerprint: str, settings: Mapping) -> str:
    """Hex key of (model, calibration data, settings); ``settings`` must be JSON-serializable."""
    h = hashlib.sha256()

    def part(blob: bytes) -> None:
        h.update(len(blob).to_bytes(8, "little"))
        h.update(blob)

    part(f"xslim-ort ranges v{FORMAT}".encode())
    part(str(model.ir_version).encode())
    for opset in model.opset_import:
        part(opset.SerializeToString(deterministic=True))
    for function in model.functions:
        part(function.SerializeToString(deterministic=True))
    g = model.graph
    for group in (g.input, g.output, g.node, g.initializer, g.sparse_initializer):
        part(str(len(group)).encode())
        for item in group:
            part(item.SerializeToString(deterministic=True))
    part(data_fingerprint.encode())
    part(json.dumps(settings, sort_keys=True, separators=(",", ":"), allow_nan=False).encode())
    return h.hexdigest()


def load_ranges(cache_dir: str | os.PathLike, key: str) -> dict[str, tuple[float, float]] | None:
    """The ranges stored under ``key``, or None if absent or unreadable (then recomputed)."""
    path = _entry(cache_dir, key)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("format") != FORMAT or doc.get("key") != key:
            return None
        return {str(name): (float(lo), float(hi)) for name, (lo, hi) in doc["ranges"].items()}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError) as e:
        log.warning("ignoring unreadable range cache entry %s: %s", path, e)
        return None


def save_ranges(cache_dir: str | os.PathLike, key: str, ranges: Mapping[str, tuple[float, float]]) -> None:
    """Store ``ranges`` under ``key``: a temp file in the same folder, then an atomic rename."""
    for name, (lo, hi) in ranges.items():
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"range of {name} is not finite: ({lo}, {hi})")
    path = _entry(cache_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "format": FORMAT,
        "key": key,
        "ranges": {name: [float(lo), float(hi)] for name, (lo, hi) in ranges.items()},
    }
    text = json.dumps(doc, sort_keys=True, indent=1, allow_nan=False) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _entry(cache_dir: str | os.PathLike, key: str) -> Path:
    if not key or not all(c in "0123456789abcdef" for c in key):
        raise ValueError(f"not a range cache key: {key!r}")
    return Path(cache_dir) / f"{key}.json"
