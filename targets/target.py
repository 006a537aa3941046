"""What a target descriptor says, and how one is found.

A descriptor is a JSON file, one per chip: the op types it runs in int8 and how each is
handled, the weight and activation schemes, the bias mode, fusion patterns and range
clamps. Code reads these fields and never hard-codes a chip's rules, so a new chip is a
new ``<name>/descriptor.json`` (or a path to one), not new code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import ConfigError

HANDLER_KINDS = (
    "conv",
    "gemm",
    "matmul",
    "removable_activation",
    "passthrough",
    "maxpool",
    "pad",
    "resize",
    "split",
    "gather",
    "normalization",
    "generic",
)
# Kinds whose outputs reuse their input's scale (ORT's direct 8-bit ops).
SHARED_SCALE_KINDS = ("passthrough", "maxpool", "resize", "split", "gather")


@dataclass(frozen=True)
class WeightRule:
    """How the constant weight input of one op type is quantized."""

    input: int | None  # input index, or None for "whichever input is constant"
    dtype: str
    symmetric: bool
    axis: int | None  # per-channel axis, or None for per tensor
    power_of_two: bool


@dataclass(frozen=True)
class Fusion:
    """``pattern[0]`` followed by the activation ``pattern[1]`` share one quantization point.

    ``drop_activation``: remove the activation where the asymmetric range clamps as it does.
    """

    pattern: tuple[str, str]
    drop_activation: bool


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    min_opset: int
    activation_dtype: str
    activation_symmetric: bool
    bias: str
    ops: dict[str, str]
    weights: dict[str, WeightRule]
    fusions: tuple[Fusion, ...]
    clamps: dict[str, dict[str, Any]]
    float_ops_level2: frozenset[str]  # op types precision_level 2 keeps float
    float_elementwise_level2: frozenset[str]  # element-wise types level 2 keeps float when no input is constant
    source: str = field(default="", compare=False)

    @property
    def op_types(self) -> list[str]:
        return sorted(self.ops)

    def shares_scale(self, op_type: str) -> bool:
        """Whether the op's output reuses its input's scale."""
        return self.ops.get(op_type) in SHARED_SCALE_KINDS

    def weight_rule(self, op_type: str) -> WeightRule | None:
        return self.weights.get(op_type)


def builtin_targets() -> list[str]:
    """Names of the descriptors shipped in the package."""
    root = resources.files("xslim_ort.targets")
    names = []
    for child in root.iterdir():
        if child.is_dir() and child.joinpath("descriptor.json").is_file():
            names.append(json.loads(child.joinpath("descriptor.json").read_text("utf-8"))["name"])
    return sorted(names)


@cache
def load_target(name_or_path: str) -> Target:
    """A shipped descriptor by name (``spacemit``, ``ort-cpu``) or a descriptor JSON path."""
    path = Path(name_or_path)
    if name_or_path.endswith(".json"):
        if not path.is_file():
            raise ConfigError(f"target descriptor not found: {name_or_path}")
        text, source = path.read_text("utf-8"), str(path)
    else:
        folder = resources.files("xslim_ort.targets").joinpath(name_or_path.replace("-", "_"))
        desc = folder.joinpath("descriptor.json")
        if not desc.is_file():
            raise ConfigError(
                f"unknown target '{name_or_path}'; available: {', '.join(builtin_targets())}"
                " (or give a path to a descriptor .json)"
            )
        text, source = desc.read_text("utf-8"), f"builtin:{name_or_path}"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{source}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None
    return parse_target(data, source)


_REQUIRED = ("name", "min_opset", "activation", "bias", "weights", "ops")
_OPTIONAL = ("description", "fusions", "clamps", "float_ops_level2", "float_elementwise_level2")


def parse_target(data: dict[str, Any], source: str = "<dict>") -> Target:
    """Validate a descriptor dict; every mistake names the field."""
    for key in _REQUIRED:
        if key not in data:
            raise ConfigError(f"{source}: target descriptor is missing '{key}'")
    unknown = set(data) - set(_REQUIRED) - set(_OPTIONAL)
    if unknown:
        raise ConfigError(f"{source}: unknown target descriptor key(s): {', '.join(sorted(unknown))}")
    for op, kind in data["ops"].items():
        if kind not in HANDLER_KINDS:
            raise ConfigError(f"{source}: ops.{op}: unknown handler '{kind}'; use one of {', '.join(HANDLER_KINDS)}")
    if data["bias"] not in ("float32", "int32"):
        raise ConfigError(f"{source}: bias must be float32 or int32, got {data['bias']!r}")
    act = data["activation"]
    if act.get("dtype") not in ("int8", "uint8"):
        raise ConfigError(f"{source}: activation.dtype must be int8 or uint8")
    weights = {}
    for op, rule in data["weights"].items():
        try:
            weights[op] = WeightRule(
                input=rule["input"],
                dtype=rule["dtype"],
                symmetric=bool(rule["symmetric"]),
                axis=rule["axis"],
                power_of_two=bool(rule["power_of_two"]),
            )
        except KeyError as exc:
            raise ConfigError(f"{source}: weights.{op} is missing {exc}") from None
        if weights[op].dtype != "int8" or not weights[op].symmetric:
            raise ConfigError(f"{source}: weights.{op}: only symmetric int8 weights are supported")
    fusions = tuple(_parse_fusion(f, i, data["ops"], source) for i, f in enumerate(data.get("fusions", [])))
    for op, rule in data.get("clamps", {}).items():
        _check_clamp(op, rule, source)
    return Target(
        name=data["name"],
        description=data.get("description", ""),
        min_opset=int(data["min_opset"]),
        activation_dtype=act["dtype"],
        activation_symmetric=bool(act.get("symmetric", False)),
        bias=data["bias"],
        ops=dict(data["ops"]),
        weights=weights,
        fusions=fusions,
        clamps=dict(data.get("clamps", {})),
        float_ops_level2=frozenset(data.get("float_ops_level2", [])),
        float_elementwise_level2=frozenset(data.get("float_elementwise_level2", [])),
        source=source,
    )


def _parse_fusion(entry: dict[str, Any], index: int, ops: dict[str, str], source: str) -> Fusion:
    where = f"{source}: fusions[{index}]"
    unknown = set(entry) - {"pattern", "drop_activation"}
    if unknown:
        raise ConfigError(f"{where}: unknown key(s): {', '.join(sorted(unknown))}")
    pattern = entry.get("pattern")
    if not isinstance(pattern, list) or len(pattern) != 2:
        raise ConfigError(f"{where}.pattern: give two op types, [producer, activation]")
    if ops.get(pattern[1]) != "removable_activation":
        raise ConfigError(f"{where}.pattern: {pattern[1]} must be an op with handler 'removable_activation'")
    if pattern[0] not in ops:
        raise ConfigError(f"{where}.pattern: {pattern[0]} is not among the target's ops")
    return Fusion(pattern=(pattern[0], pattern[1]), drop_activation=bool(entry.get("drop_activation", True)))


def _check_clamp(op: str, rule: Any, source: str) -> None:
    bounds = rule.get("input") if isinstance(rule, dict) else None
    if bounds == "linear_region" and op == "HardSigmoid":
        return
    if not (isinstance(bounds, list) and len(bounds) == 2 and all(isinstance(b, int | float) for b in bounds)):
        raise ConfigError(
            f"{source}: clamps.{op}.input must be [low, high]" + (' or "linear_region"' if op == "HardSigmoid" else "")
        )
    if bounds[0] >= bounds[1]:
        raise ConfigError(f"{source}: clamps.{op}.input: low {bounds[0]} must be below high {bounds[1]}")
