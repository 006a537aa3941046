"""Shared fixtures: the zoo (skipped where absent) and tiny models built with onnx.helper."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def zoo_dir() -> Path | None:
    """``$XSLIM_ORT_ZOO`` or ``../shared/zoo`` next to the checkout; None where absent."""
    env = os.environ.get("XSLIM_ORT_ZOO")
    candidates = [Path(env)] if env else []
    candidates.append(REPO.parent / "shared" / "zoo")
    for c in candidates:
        if (c / "models").is_dir():
            return c
    return None


@pytest.fixture(scope="session")
def zoo() -> Path:
    path = zoo_dir()
    if path is None:
        pytest.skip("model zoo not available (set XSLIM_ORT_ZOO or provide ../shared/zoo)")
    return path
