"""The zoo manifest: which models to quantize, on what data to evaluate them, what they must reach.

Loaded once and validated as strictly as the config: the shipped JSON Schema
(``manifest.schema.json``) is interpreted here so that an unknown key gets the closest
known one and a wrong type names its field. Every path is made absolute and every model's
config is merged and validated before anything runs, so a bad manifest fails in a second
(exit code 2) rather than after an hour of quantizing.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from ..calibration.preprocess import PRESETS
from ..config import INPUT_LIST_KEYS, Config, describe_json, json_type_ok, load_config
from ..errors import ConfigError

METRICS = ("top1_agreement", "labelled_top1", "sqnr_db", "cosine")
DEFAULT_METRICS = ("sqnr_db", "cosine")
#: Each absolute threshold and the metric it limits.
THRESHOLD_METRICS = {
    "min_top1_agreement": "top1_agreement",
    "max_top1_drop": "labelled_top1",
    "min_sqnr_db": "sqnr_db",
    "min_cosine": "cosine",
}

_ENV_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@cache
def manifest_schema() -> dict[str, Any]:
    """The JSON Schema of the manifest (shipped in the package for editors and CI)."""
    text = resources.files("xslim_ort.zoo").joinpath("manifest.schema.json").read_text("utf-8")
    return json.loads(text)


@dataclass(frozen=True)
class Thresholds:
    """Limits on the metrics; None means not checked."""

    min_top1_agreement: float | None = None
    max_top1_drop: float | None = None
    min_sqnr_db: float | None = None
    min_cosine: float | None = None
    max_regression: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelEntry:
    """One model, fully resolved: absolute paths and a validated config (as a dict, to pass to the API)."""

    name: str
    model: Path
    config: dict[str, Any]
    eval_lists: tuple[Path, ...]
    samples: int | None
    labels: Path | None
    output: str | None
    metrics: tuple[str, ...]
    thresholds: Thresholds


@dataclass(frozen=True)
class Manifest:
    path: Path  # as given
    zoo_root: Path
    models: tuple[ModelEntry, ...]

    def select(self, only: Sequence[str] = (), shard: tuple[int, int] | None = None) -> list[ModelEntry]:
        """The models named by ``only`` (all if empty), then those of shard ``(i, n)`` (1-based).

        Shards deal the sorted names out like cards, so a shard does not change when models
        are reordered in the file, and every model lands in exactly one shard.
        """
        names = [m.name for m in self.models]
        for name in only:
            if name not in names:
                close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
                hint = f"; did you mean '{close[0]}'?" if close else f"; its models are: {', '.join(names)}"
                raise ConfigError(f"--only: {self.path} has no model '{name}'{hint}")
        chosen = [m for m in self.models if not only or m.name in only]
        if shard is not None:
            index, count = shard
            order = sorted(m.name for m in chosen)
            mine = {name for k, name in enumerate(order) if k % count == index - 1}
            chosen = [m for m in chosen if m.name in mine]
        return chosen


# --------------------------------------------------------------------------- validation


def _deref(node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        target = manifest_schema()["$defs"][node["$ref"].rsplit("/", 1)[-1]]
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def validate(value: Any, node: dict[str, Any], path: str = "") -> None:
    """Check ``value`` against a node of the manifest schema (the keywords the schema uses)."""
    node = _deref(node)
    where = path or "the manifest"
    types = node.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        if not any(json_type_ok(value, t) for t in types):
            shown = json.dumps(value)[:60]
            raise ConfigError(f"{where}: expected {' or '.join(types)}, got {describe_json(value)} {shown}")
    if "enum" in node and value not in node["enum"]:
        allowed = ", ".join(json.dumps(v) for v in node["enum"])
        raise ConfigError(f"{where}: {json.dumps(value)[:60]} is not allowed; use one of {allowed}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in node and value < node["minimum"]:
            raise ConfigError(f"{where}: must be at least {node['minimum']}, got {value}")
        if "maximum" in node and value > node["maximum"]:
            raise ConfigError(f"{where}: must be at most {node['maximum']}, got {value}")
    if isinstance(value, str) and len(value) < node.get("minLength", 0):
        raise ConfigError(f"{where}: must not be empty")
    if isinstance(value, list):
        if len(value) < node.get("minItems", 0):
            raise ConfigError(f"{where}: needs at least {node['minItems']} item(s)")
        if node.get("uniqueItems") and len({json.dumps(v) for v in value}) != len(value):
            raise ConfigError(f"{where}: lists an item twice")
        for i, item in enumerate(value):
            validate(item, node.get("items", {}), f"{path}[{i}]")
    if isinstance(value, dict):
        props = node.get("properties", {})
        if node.get("additionalProperties", True) is False:
            for key in value:
                if key not in props:
                    raise ConfigError(_unknown_key(path, key, props))
        for key in node.get("required", []):
            if key not in value:
                raise ConfigError(f"{where}: missing required key '{key}'")
        for key, sub in value.items():
            if key in props:
                validate(sub, props[key], f"{path}.{key}" if path else key)


def _unknown_key(path: str, key: str, known: dict[str, Any]) -> str:
    full = f"{path}.{key}" if path else key
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(sorted(known))}"
    return f"unknown key '{full}'{hint}"


# --------------------------------------------------------------------------- paths


def expand_env(value: str, where: str) -> str:
    """Expand ``${VAR}`` and ``${VAR:-default}``; an unset variable without a default is an error."""

    def sub(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        env = os.environ.get(name)
        if env:
            return env
        if default is None:
            raise ConfigError(f"{where}: environment variable {name} is not set (write ${{{name}:-default}})")
        return default

    return _ENV_VAR.sub(sub, value)


def _path(value: str, base: Path, where: str) -> Path:
    p = Path(os.path.expanduser(expand_env(value, where)))
    return p if p.is_absolute() else (base / p).resolve()


def read_json(path: Path, what: str) -> Any:
    """A JSON file, with errors that name the file (and line) rather than a traceback."""
    try:
        text = path.read_text("utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None


# --------------------------------------------------------------------------- configs


def _config_source(value: dict | str, manifest_dir: Path, zoo_root: Path, where: str) -> dict[str, Any]:
    """An inline config (paths relative to zoo_root) or a config file (paths relative to it), paths made absolute."""
    if isinstance(value, str):
        path = _path(value, manifest_dir, where)
        data = read_json(path, f"{where}: config file")
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the config must be a JSON object, got {describe_json(data)}")
        base = path.parent
    else:
        data, base = copy.deepcopy(value), zoo_root
    mp = data.get("model_parameters")
    if isinstance(mp, dict) and isinstance(mp.get("onnx_model"), str):
        mp["onnx_model"] = str(_path(mp["onnx_model"], base, f"{where}.model_parameters.onnx_model"))
    cp = data.get("calibration_parameters")
    if not isinstance(cp, dict):
        return data
    spellings = [k for k in INPUT_LIST_KEYS if k in cp]
    if len(spellings) == 1 and spellings[0] != "input_parametres":
        cp["input_parametres"] = cp.pop(spellings[0])  # one spelling, so a model can override a shared list
    for i, entry in enumerate(cp.get("input_parametres") or []):
        if not isinstance(entry, dict):
            continue
        at = f"{where}.calibration_parameters.input_parametres[{i}]"
        if isinstance(entry.get("data_list_path"), str):
            entry["data_list_path"] = str(_path(entry["data_list_path"], base, f"{at}.data_list_path"))
        ref = entry.get("preprocess_file")
        if isinstance(ref, str) and ref and ref not in PRESETS:
            file, sep, func = ref.rpartition(":")
            if sep and file:
                entry["preprocess_file"] = f"{_path(file, base, f'{at}.preprocess_file')}:{func}"
    return data


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Objects merge key by key; any other value (a list too) replaces the base's."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


# --------------------------------------------------------------------------- loading


def load_manifest(path: str | os.PathLike) -> Manifest:
    """Read, validate and resolve a manifest; every problem is a ConfigError naming the file and field."""
    data = read_json(Path(path), "manifest")
    try:
        validate(data, manifest_schema())
        return _resolve(Path(path), data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc.message}") from None


def _resolve(mpath: Path, data: dict[str, Any]) -> Manifest:
    folder = mpath.resolve().parent
    zoo_root = _path(data["zoo_root"], folder, "zoo_root") if "zoo_root" in data else folder
    if not zoo_root.is_dir():
        raise ConfigError(f"zoo_root: folder not found: {zoo_root}")
    shared = _config_source(data["config"], folder, zoo_root, "config") if "config" in data else {}
    models: list[ModelEntry] = []
    seen: set[str] = set()
    for i, raw in enumerate(data["models"]):
        where = f"models[{i}]"
        if raw["name"] in seen:
            raise ConfigError(f"{where}.name: '{raw['name']}' is used by another model")
        seen.add(raw["name"])
        models.append(_model_entry(raw, where, shared, folder, zoo_root))
    return Manifest(mpath, zoo_root, tuple(models))


def _model_entry(raw: dict[str, Any], where: str, shared: dict[str, Any], folder: Path, zoo_root: Path) -> ModelEntry:
    name = raw["name"]
    own = _config_source(raw["config"], folder, zoo_root, f"{where}.config") if "config" in raw else {}
    merged = merge(shared, own)
    if "model" in raw:
        merged = merge(
            merged, {"model_parameters": {"onnx_model": str(_path(raw["model"], zoo_root, f"{where}.model"))}}
        )
    try:
        config = load_config(merged)
    except ConfigError as exc:
        raise ConfigError(f"{where} ({name}) config: {exc.message}") from None
    if config.model_parameters.onnx_model is None:
        raise ConfigError(f"{where} ({name}): no model; set {where}.model or model_parameters.onnx_model")
    ev = raw["eval"]
    lists = tuple(_path(p, zoo_root, f"{where}.eval.lists[{k}]") for k, p in enumerate(ev["lists"]))
    _check_eval(config, ev, lists, where)
    metrics = tuple(raw.get("metrics", DEFAULT_METRICS))
    labels = _path(ev["labels"], zoo_root, f"{where}.eval.labels") if "labels" in ev else None
    if ("labelled_top1" in metrics) != (labels is not None):
        raise ConfigError(f"{where}: labelled_top1 in metrics and eval.labels go together (give both or neither)")
    thresholds = _thresholds(raw.get("thresholds", {}), metrics, where)
    return ModelEntry(
        name=name,
        model=Path(config.model_parameters.onnx_model),
        config=merged,
        eval_lists=lists,
        samples=ev.get("samples"),
        labels=labels,
        output=ev.get("output"),
        metrics=metrics,
        thresholds=thresholds,
    )


def _check_eval(config: Config, ev: dict[str, Any], lists: tuple[Path, ...], where: str) -> None:
    entries = len(config.inputs)
    if len(lists) != entries:
        raise ConfigError(
            f"{where}.eval.lists: has {len(lists)} list(s) but the config has {entries} input entries "
            "(one list per entry of input_parametres, in the same order)"
        )
    if "labels" in ev and entries != 1:
        raise ConfigError(f"{where}.eval.labels: labelled images need a single-input model; the config has {entries}")


def _thresholds(raw: dict[str, Any], metrics: tuple[str, ...], where: str) -> Thresholds:
    for key in raw:
        needed = [THRESHOLD_METRICS[key]] if key in THRESHOLD_METRICS else list(raw[key])
        for metric in needed:
            if metric not in metrics:
                sub = key if key in THRESHOLD_METRICS else f"{key}.{metric}"
                raise ConfigError(f"{where}.thresholds.{sub}: {metric} is not in {where}.metrics")
    return Thresholds(
        **{k: v for k, v in raw.items() if k != "max_regression"}, max_regression=raw.get("max_regression", {})
    )
