"""The typed XSlim config: loaded once at the door, validated strictly, passed on as objects.

The JSON Schema shipped in ``xslim_ort/schema/config.schema.json`` is the single source of
truth for keys, types, allowed values and defaults; the validator below interprets it (the
subset the schema uses) so that error messages can name the path and suggest the closest
key. The dataclasses mirror the schema; a test keeps the two in step.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import ConfigError

INPUT_LIST_KEYS = ("input_parametres", "input_parameters")


@cache
def config_schema() -> dict[str, Any]:
    """The JSON Schema of the config (also shipped for editors)."""
    text = resources.files("xslim_ort").joinpath("schema/config.schema.json").read_text("utf-8")
    return json.loads(text)


@dataclass
class InputParameter:
    """One entry of ``input_parametres``: how to read the data of one model input."""

    input_name: str | None = None
    input_shape: list[int] | None = None
    dtype: str | None = None
    file_type: str = "img"
    color_format: str = "bgr"
    mean_value: list[float] | None = None
    std_value: list[float] | None = None
    preprocess_file: str | None = None
    data_list_path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ModelParameters:
    onnx_model: str | None = None
    output_prefix: str | None = None
    working_dir: str | None = None
    skip_onnxsim: bool = False
    opset: int | None = None


@dataclass
class CalibrationParameters:
    calibration_step: int = 100
    calibration_device: str | None = None
    calibration_type: str = "default"
    calibration_batch_size: int | None = None
    input_parametres: list[InputParameter] = field(default_factory=list)


@dataclass
class CustomSetting:
    """Overrides for the nodes on paths from ``input_names`` to ``output_names``."""

    input_names: list[str]
    output_names: list[str]
    precision_level: int | None = None
    calibration_type: str | None = None
    max_percentile: float | None = None


@dataclass
class QuantizationParameters:
    analysis_enable: bool = True
    analysis_samples: int = 32
    precision_level: int = 0
    finetune_level: int = 1
    max_percentile: float = 0.9999
    custom_setting: list[CustomSetting] = field(default_factory=list)
    truncate_var_names: list[str] = field(default_factory=list)
    ignore_op_types: list[str] = field(default_factory=list)
    ignore_op_names: list[str] = field(default_factory=list)
    target: str = "spacemit"
    bias_mode: str | None = None


@dataclass
class Config:
    """A validated config. ``base_dir`` is the config file's folder (None for a dict)."""

    model_parameters: ModelParameters = field(default_factory=ModelParameters)
    calibration_parameters: CalibrationParameters = field(default_factory=CalibrationParameters)
    quantization_parameters: QuantizationParameters = field(default_factory=QuantizationParameters)
    base_dir: Path | None = None
    source: str = "<dict>"

    def to_dict(self) -> dict[str, Any]:
        """The config as XSlim JSON (round-trips through ``load_config``)."""
        out = {
            "model_parameters": asdict(self.model_parameters),
            "calibration_parameters": asdict(self.calibration_parameters),
            "quantization_parameters": asdict(self.quantization_parameters),
        }
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @property
    def inputs(self) -> list[InputParameter]:
        return self.calibration_parameters.input_parametres

    def resolve_input_path(self, value: str, what: str) -> Path:
        """Find a relative path in the current directory, then in the config's folder."""
        return resolve_path(value, self.base_dir, what)


def resolve_path(value: str, base_dir: Path | None, what: str) -> Path:
    """Look a path up where xslim does: as given (cwd), then next to the config file."""
    p = Path(os.path.expanduser(value))
    if p.is_absolute():
        if p.exists():
            return p
        raise ConfigError(f"{what}: file not found: {p}")
    tried = [Path.cwd() / p]
    if base_dir is not None and base_dir.resolve() != Path.cwd().resolve():
        tried.append(base_dir / p)
    for cand in tried:
        if cand.exists():
            return cand.resolve()
    where = " or ".join(str(t) for t in tried)
    raise ConfigError(f"{what}: file not found: {value} (looked in {where})")


# --------------------------------------------------------------------------- validation

_JSON_TYPES = {
    "object": dict,
    "array": list,
    "string": str,
    "boolean": bool,
    "null": type(None),
}


def json_type_ok(value: Any, type_name: str) -> bool:
    """Whether ``value`` (parsed JSON) is of the JSON Schema type ``type_name``."""
    if type_name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if type_name == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, _JSON_TYPES[type_name])


def describe_json(value: Any) -> str:
    """'an integer', 'a string', ... for error messages about parsed JSON."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _resolve_ref(node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        extra = {k: v for k, v in node.items() if k != "$ref"}
        node = {**config_schema()["$defs"][name], **extra}
    return node


def _validate(value: Any, node: dict[str, Any], path: str) -> None:
    node = _resolve_ref(node)
    types = node.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        if not any(json_type_ok(value, t) for t in types):
            allowed = " or ".join(t for t in types if t != "null")
            if "null" in types:
                allowed += " (or null)"
            raise ConfigError(f"{path}: expected {allowed}, got {describe_json(value)} {json.dumps(value)[:60]}")
    if "enum" in node and value not in node["enum"]:
        allowed = ", ".join(json.dumps(v) for v in node["enum"] if v is not None)
        raise ConfigError(f"{path}: {json.dumps(value)[:60]} is not allowed; use one of {allowed}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{path}: must be a finite number, got {value}")
        if "minimum" in node and value < node["minimum"]:
            raise ConfigError(f"{path}: must be at least {node['minimum']}, got {value}")
        if "exclusiveMinimum" in node and value <= node["exclusiveMinimum"]:
            raise ConfigError(f"{path}: must be greater than {node['exclusiveMinimum']}, got {value}")
    if isinstance(value, list):
        if len(value) < node.get("minItems", 0):
            raise ConfigError(f"{path}: needs at least {node['minItems']} item(s)")
        if "items" in node:
            for i, item in enumerate(value):
                _validate(item, node["items"], f"{path}[{i}]")
    if isinstance(value, dict):
        props = node.get("properties", {})
        for key in value:
            if not isinstance(key, str) or key not in props:
                raise ConfigError(_unknown_key_message(path, key, props))
        for key in node.get("required", []):
            if key not in value:
                raise ConfigError(f"{path}: missing required key '{key}'")
        for key, sub in value.items():
            _validate(sub, props[key], f"{path}.{key}" if path else key)


def _unknown_key_message(path: str, key: Any, known: dict[str, Any]) -> str:
    where = f"{path}.{key}" if path else str(key)
    close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(sorted(known))}"
    return f"unknown key '{where}'{hint}"


# --------------------------------------------------------------------------- loading


def _read_json_file(path: Path) -> Any:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None


def _build(cls: type, data: dict[str, Any]) -> Any:
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


def load_config(source: str | os.PathLike | dict[str, Any] | Config) -> Config:
    """Load and validate a config from a JSON file path, a dict, or pass a Config through."""
    if isinstance(source, Config):
        return source
    if isinstance(source, dict):
        data, base_dir, name = source, None, "<dict>"
    elif isinstance(source, str | os.PathLike):
        path = Path(source)
        data, base_dir, name = _read_json_file(path), path.resolve().parent, str(path)
    else:
        raise ConfigError(f"config must be a JSON file path or a dict, got {type(source).__name__}")
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: the config must be a JSON object, got {describe_json(data)}")
    try:
        return _from_dict(data, base_dir, name)
    except ConfigError as exc:
        if name != "<dict>":
            raise ConfigError(f"{name}: {exc.message}") from None
        raise


def _from_dict(data: dict[str, Any], base_dir: Path | None, name: str) -> Config:
    _validate(data, config_schema(), "")
    mp = data.get("model_parameters", {})
    cp = dict(data.get("calibration_parameters", {}))
    qp = dict(data.get("quantization_parameters", {}))
    spellings = [k for k in INPUT_LIST_KEYS if k in cp]
    if len(spellings) == 2:
        raise ConfigError("calibration_parameters: give input_parametres or input_parameters, not both")
    entries = cp.pop(spellings[0]) if spellings else []
    cp["input_parametres"] = [_input_entry(e, i) for i, e in enumerate(entries)]
    qp["custom_setting"] = [_build(CustomSetting, c) for c in qp.get("custom_setting", [])]
    qp["max_percentile"] = normalize_percentile(
        qp.get("max_percentile", 0.9999), "quantization_parameters.max_percentile"
    )
    for i, cs in enumerate(qp["custom_setting"]):
        if cs.max_percentile is not None:
            cs.max_percentile = normalize_percentile(
                cs.max_percentile, f"quantization_parameters.custom_setting[{i}].max_percentile"
            )
    return Config(
        model_parameters=_build(ModelParameters, mp),
        calibration_parameters=_build(CalibrationParameters, cp),
        quantization_parameters=_build(QuantizationParameters, qp),
        base_dir=base_dir,
        source=name,
    )


def _input_entry(entry: dict[str, Any], index: int) -> InputParameter:
    inp = _build(InputParameter, entry)
    path = f"calibration_parameters.input_parametres[{index}]"
    for key in ("mean_value", "std_value"):
        val = getattr(inp, key)
        if val is not None and len(val) == 0:
            raise ConfigError(f"{path}.{key}: needs one value per channel, got an empty list")
    if inp.mean_value and inp.std_value and len(inp.mean_value) != len(inp.std_value):
        raise ConfigError(f"{path}: mean_value has {len(inp.mean_value)} values but std_value has {len(inp.std_value)}")
    if inp.preprocess_file == "":
        inp.preprocess_file = None
    return inp


def normalize_percentile(value: float, path: str) -> float:
    """Accept 0.9999 or 99.99 (percent); both mean the same clip. Below 0.99 is rejected."""
    v = float(value)
    if v > 1.0:
        if v > 100.0:
            raise ConfigError(f"{path}: a percentile must be at most 100 (or 1.0 as a fraction), got {value}")
        v = v / 100.0
        if v < 0.99:
            raise ConfigError(f"{path}: must be at least 99 (percent) or 0.99, got {value}")
    return v
