"""Reliability: bad configs, bad data, awkward models, interruption, determinism, untrusted input.

Every bad input goes through the CLI in-process and ends one of two ways: a working model
(checked against the spacemit target and run in ONNX Runtime), or one ``error: ...`` line
with exit code 2, no traceback and nothing written. The catalogue of cases lives in
``reliability_cases.py``; the config fuzzing is property-based (hypothesis).
"""

from __future__ import annotations

import contextlib
import html
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
import psutil
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from reliability_cases import (
    CASES,
    HOSTILE_NAMES,
    NPY_ENTRY,
    Case,
    Refused,
    Setup,
    Works,
    good_npy,
    hostile_model,
    listing,
    project,
    write_big_model,
)

from xslim_ort.calibration.readers import XSlimDataReader
from xslim_ort.check import check_model
from xslim_ort.cli import main
from xslim_ort.config import config_schema, load_config
from xslim_ort.qparams import cosine
from xslim_ort.targets import load_target

from helpers import run_model

CACHE_ENTRY = re.compile(r"[0-9a-f]{64}\.json")  # the range cache, the only file a run may add beside its output


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str], str]:
    code = main(args)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.err.strip().splitlines(), captured.out


def _signature(node: onnx.NodeProto) -> tuple[str, str, list[tuple[str, Any]]]:
    """Op, domain and attributes; a subgraph by its nodes (shape inference may add value_info to it)."""
    attrs = [
        (a.name, [(n.op_type, list(n.input), list(n.output)) for n in a.g.node])
        if a.type == onnx.AttributeProto.GRAPH
        else (a.name, a.SerializeToString())
        for a in node.attribute
    ]
    return node.op_type, node.domain, attrs


def _params() -> list[Any]:
    return [
        pytest.param(c, id=c.name, marks=[pytest.mark.xfail(strict=True, reason=c.xfail)] if c.xfail else [])
        for c in CASES
    ]


def test_catalogue_is_large_and_names_are_unique() -> None:
    names = [c.name for c in CASES]
    assert len(names) == len(set(names))
    assert len(CASES) >= 40


@pytest.mark.parametrize("case", _params())
def test_bad_input(case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    setup = case.build(tmp_path)
    before = _files(tmp_path)
    code, lines, out = _run_cli(setup.args, capsys)
    added = _files(tmp_path) - before
    if isinstance(case.outcome, Refused):
        assert (code, lines[-1]) == (case.outcome.code, case.outcome.message.format(tmp=tmp_path))
        assert out == ""
        assert added == set()  # no output, no temp files, no cache left behind
        return
    expect: Works = case.outcome
    assert code == 0, lines[-1]
    assert out.strip() == str(setup.output)
    assert {a for a in added if not CACHE_ENTRY.fullmatch(a)} == {setup.output.name}
    if expect.warning is not None:
        assert expect.warning in lines
    float_model = onnx.load(setup.model)
    q = onnx.load(setup.output)
    onnx.checker.check_model(q, full_check=True)
    report = check_model(q, load_target("spacemit"), float_model)
    assert report.errors == []
    assert report.stats == {
        "quantized_weights": expect.quantized_weights,
        "activation_quantizers": expect.activation_quantizers,
    }
    by_name = {n.name: n for n in q.graph.node}
    assert set(expect.kept) <= {n.name for n in float_model.graph.node}
    for node in float_model.graph.node:
        if node.name in expect.kept:
            assert _signature(by_name[node.name]) == _signature(node)
    feeds = XSlimDataReader(load_config(setup.config), float_model).get_next()
    assert cosine(run_model(float_model, feeds)[0], run_model(q, feeds)[0]) >= expect.min_cosine


# --------------------------------------------------------------------------- config fuzzing

# Strings never hold a path separator or start with "~", so whatever path a config names
# stays inside the example's folder; NUL and other control characters are fair game.
TEXT = st.text(st.characters(codec="utf-8", exclude_characters="/\\~"), max_size=8)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=6,
)
ENTRY_LISTS = ("input_parametres", "custom_setting")  # a path through one of these goes to entry 0


def _schema_fields() -> list[tuple[tuple[str, ...], dict[str, Any]]]:
    """Every field the schema knows, with its path in a config and its schema node."""
    schema = config_schema()
    out: list[tuple[tuple[str, ...], dict[str, Any]]] = []
    for section, node in schema["properties"].items():
        out.append(((section,), node))
        out.extend(((section, key), sub) for key, sub in node["properties"].items())
    for key, sub in schema["$defs"]["input"]["properties"].items():
        out.append((("calibration_parameters", "input_parametres", key), sub))
    for key, sub in schema["$defs"]["custom_setting"]["properties"].items():
        out.append((("quantization_parameters", "custom_setting", key), sub))
    return out


FIELDS = _schema_fields()


def _plausible(node: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values the schema allows (or nearly: examples, defaults, small numbers), so runs get past validation."""
    picks = [*node.get("enum", []), *node.get("examples", [])]
    if "default" in node:
        picks.append(node["default"])
    types = node.get("type", [])
    types = [types] if isinstance(types, str) else types
    options = [st.sampled_from(picks)] if picks else []
    if "integer" in types:
        options.append(st.integers(node.get("minimum", 0) - 1, node.get("minimum", 0) + 3))
    if "number" in types:
        options.append(st.floats(0.98, 101.0))
    if "boolean" in types:
        options.append(st.booleans())
    if "array" in types:
        options.append(st.lists(st.integers(0, 16) | TEXT, max_size=4))
    return st.one_of(options) if options else JSON


FIELD_VALUE = st.sampled_from(FIELDS).flatmap(lambda f: st.tuples(st.just(f[0]), st.one_of(_plausible(f[1]), JSON)))
MUTATION = st.one_of(
    st.tuples(st.just("set"), FIELD_VALUE),
    st.tuples(st.just("delete"), st.sampled_from([p for p, _ in FIELDS])),
    st.tuples(st.just("extra"), st.tuples(st.sampled_from([p for p, _ in FIELDS]), TEXT, JSON)),
    st.tuples(st.just("move"), st.tuples(st.sampled_from([p for p, _ in FIELDS if len(p) > 1]), st.booleans())),
    st.tuples(st.just("wrap"), st.sampled_from([p for p, _ in FIELDS if len(p) == 1])),
)


def _holder(doc: Any, path: tuple[str, ...]) -> dict[str, Any] | None:
    """The dict that holds ``path[-1]`` (made on the way where missing); None where the shape is wrong."""
    node = doc
    for key in path[:-1]:
        if not isinstance(node, dict):
            return None
        if key in ENTRY_LISTS:
            entries = node.setdefault(key, [])
            if not isinstance(entries, list):
                return None
            if not entries:
                entries.append({})
            node = entries[0]
        else:
            node = node.setdefault(key, {})
    return node if isinstance(node, dict) else None


def _mutate(doc: dict[str, Any], mutation: tuple[str, Any]) -> None:
    """Apply one mutation in place; one that no longer fits the (already mangled) config is skipped."""
    kind, arg = mutation
    path = arg[0] if kind in ("set", "extra", "move") else arg
    holder = _holder(doc, path)
    if holder is None:
        return
    key = path[-1]
    if kind == "set":
        holder[key] = arg[1]
    elif kind == "delete":
        holder.pop(key, None)
    elif kind == "extra":
        target = holder.get(key)
        if isinstance(target, dict):
            target[arg[1]] = arg[2]
    elif kind == "move" and key in holder:  # wrong nesting: one level up, or to the top
        value = holder.pop(key)
        up = doc if arg[1] else (_holder(doc, path[:-1]) or doc)
        up[key] = value
    elif kind == "wrap" and key in holder:
        holder[key] = [holder[key]]


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One model and its calibration data, shared by every fuzzed config."""
    root = tmp_path_factory.mktemp("fuzz")
    project(good_npy(), NPY_ENTRY)(root)
    return root


def _base_config(root: Path, work: Path) -> dict[str, Any]:
    doc = json.loads((root / "cfg.json").read_text(encoding="utf-8"))
    doc["model_parameters"]["working_dir"] = str(work)
    return doc


def _encode(doc: Any, encoding: str, at: int) -> tuple[bytes, str | None]:
    """The config file's bytes and, for the broken encodings, the end of the exact error they must give."""
    text = json.dumps(doc, indent=2)  # ASCII only, so a byte offset is a character offset
    if encoding == "bom":
        return b"\xef\xbb\xbf" + text.encode(), None
    if encoding == "latin1":
        k = at % (len(text) + 1)
        return text[:k].encode() + b"\xe9" + text[k:].encode(), f": not UTF-8 text (byte {k})"
    if encoding == "comment":
        broken = text.replace("\n", "\n  // set by hand\n", 1) if "\n" in text else "// set by hand\n" + text
    elif encoding == "trailing_comma":
        broken = text[: text.rindex("}")].rstrip() + ",\n}"
    else:
        return text.encode(), None
    try:
        json.loads(broken)
    except json.JSONDecodeError as exc:
        return broken.encode(), f":{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}"
    raise AssertionError(f"{encoding} left valid JSON: {broken}")


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    mutations=st.lists(MUTATION, max_size=3),
    encoding=st.sampled_from(["plain", "plain", "plain", "bom", "latin1", "comment", "trailing_comma"]),
    at=st.integers(0, 10_000),
)
def test_any_config_is_accepted_or_refused_in_one_line(
    fuzz_root: Path, capsys: pytest.CaptureFixture[str], mutations: list[tuple[str, Any]], encoding: str, at: int
) -> None:
    capsys.readouterr()
    with tempfile.TemporaryDirectory(dir=fuzz_root) as tmp:
        work = Path(tmp)
        doc = _base_config(fuzz_root, work)
        for m in mutations:
            _mutate(doc, m)
        raw, broken = _encode(doc, encoding, at)
        cfg = work / "cfg.json"
        cfg.write_bytes(raw)
        before = _files(fuzz_root)
        with contextlib.chdir(work):
            code, lines, out = _run_cli([str(cfg)], capsys)
        added = _files(fuzz_root) - before
        event(f"exit {code}")
        if broken is not None:
            assert (code, lines[-1]) == (2, f"error: {cfg}{broken}")
        assert code in (0, 2), lines[-1]
        if code == 2:
            assert lines[-1].startswith("error: ")
            assert out == "" and added == set()
        else:
            output = Path(out.strip())
            assert output.is_file()
            onnx.checker.check_model(onnx.load(output))
        for name in sorted(added, reverse=True):  # children first; leave the next example a clean folder
            p = fuzz_root / name
            p.unlink() if p.is_file() else p.rmdir()


# --------------------------------------------------------------------------- interruption

SIGNALS = [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")]
SLOW_LOAD = "    time.sleep(0.05)\n    return np.stack([np.load(p) for p in paths])"
# The CLI in a child whose SIGINT raises KeyboardInterrupt even where this test's parent ignores
# SIGINT (Python keeps an inherited SIG_IGN, as background jobs in CI have).
CLI_CHILD = (
    "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "from xslim_ort.cli import main; sys.exit(main(sys.argv[1:]))"
)


@pytest.fixture
def sigint_raises() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt in this process too, whatever the parent left."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _slow_project(tmp: Path, batches: int) -> Setup:
    """A run that calibrates for ``batches`` x 50 ms: one sample listed many times, a sleepy preprocess."""
    return project(
        good_npy(1),
        {**NPY_ENTRY, "preprocess_file": "pre.py:load"},
        list_bytes=lambda names: listing(names * batches),
        cp={"calibration_step": batches},
        extra=(("pre.py", "import time\n\nimport numpy as np\n\n\ndef load(paths, entry):\n" + SLOW_LOAD + "\n"),),
    )(tmp)


@pytest.mark.parametrize(("sig", "code", "last"), SIGNALS)
def test_signal_while_calibrating_leaves_nothing_behind(tmp_path: Path, sig: int, code: int, last: str) -> None:
    setup = _slow_project(tmp_path, batches=600)
    before = _files(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-c", CLI_CHILD, *setup.args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob("xslim-calib-*/input0.bin")):  # calibration has begun filling its cache
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
        time.sleep(0.02)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, err.strip().splitlines()[-1], out) == (code, last, "")
    assert _files(tmp_path) == before  # no output, no cache folder, no temp files


@pytest.mark.parametrize(("sig", "code", "last"), SIGNALS)
@pytest.mark.usefixtures("sigint_raises")
def test_signal_while_saving_leaves_no_partial_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, sig: int, code: int, last: str
) -> None:
    setup = project(good_npy(), NPY_ENTRY)(tmp_path)
    real_replace = os.replace

    def replace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
        if str(dst) == str(setup.output):  # the temp file is complete; the signal lands before it is renamed
            assert signal.getsignal(sig) not in (signal.SIG_DFL, signal.SIG_IGN)  # else pytest dies (or ignores it)
            signal.raise_signal(sig)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    before = _files(tmp_path)
    result, lines, out = _run_cli(setup.args, capsys)
    assert (result, lines[-1], out) == (code, last, "")
    assert {a for a in _files(tmp_path) - before if not CACHE_ENTRY.fullmatch(a)} == set()


# --------------------------------------------------------------------------- determinism


def test_same_inputs_give_identical_bytes_across_processes(tmp_path: Path) -> None:
    """Hash seeds, BLAS/OpenMP threads and CPU affinity differ between the two runs; the bytes do not."""
    setup = project(good_npy(8), NPY_ENTRY, cp={"calibration_type": "default"}, qp={"analysis_enable": True})(tmp_path)
    cpus = sorted(os.sched_getaffinity(0))
    runs = [
        ("a", {"PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}, cpus[:1]),
        ("b", {"PYTHONHASHSEED": "4242", "OMP_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2"}, cpus),
    ]
    for name, env, affinity in runs:
        out = tmp_path / name / "m.onnx"
        pinned = ["taskset", "-c", ",".join(map(str, affinity)), sys.executable, "-m", "xslim_ort", "-q"]
        subprocess.run(
            [*pinned, "quantize", str(setup.config), "-o", str(out)],
            env={**os.environ, **env},
            check=True,
            capture_output=True,
        )
    a, b = tmp_path / "a", tmp_path / "b"
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    assert {"m.onnx", "m_report.md", "m_report.json", "m_report.html"} <= {p.name for p in a.iterdir()}
    for p in a.iterdir():
        assert p.read_bytes() == (b / p.name).read_bytes(), p.name


# --------------------------------------------------------------------------- models over 2 GB

# Measured on the CI machine (2 cores): about 3.5 minutes, 9.8 GB peak RSS, 7 GB of files at once.
BIG_RAM, BIG_DISK = 12 * 2**30, 8 * 2**30


@pytest.mark.slow
def test_model_over_2gb_with_external_data(tmp_path: Path) -> None:
    if psutil.virtual_memory().available < BIG_RAM or shutil.disk_usage(tmp_path).free < BIG_DISK:
        pytest.skip(f"needs {BIG_RAM >> 30} GB of free RAM and {BIG_DISK >> 30} GB of free disk")
    setup = project(good_npy(4, (1, 16384)), NPY_ENTRY, save=lambda _tiny, path: write_big_model(path))(tmp_path)
    assert (tmp_path / "model.onnx.data").stat().st_size > 2**31
    before = _files(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "xslim_ort", *setup.args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr.strip().splitlines()[-1]
    assert "model is over 2 GB: onnxsim skipped" in proc.stderr.splitlines()
    assert {a for a in _files(tmp_path) - before if not CACHE_ENTRY.fullmatch(a)} == {"out.onnx"}
    q = onnx.load(setup.output)
    assert check_model(q, load_target("spacemit")).stats == {"quantized_weights": 2, "activation_quantizers": 3}
    feeds = XSlimDataReader(load_config(setup.config), q).get_next()
    assert cosine(run_model(setup.model, feeds)[0], run_model(q, feeds)[0]) > 0.999


# --------------------------------------------------------------------------- untrusted input


def test_model_names_are_escaped_in_reports_and_never_become_paths(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "a" / "b"  # "../../x" names would land in tmp_path if a path were built from them
    work.mkdir(parents=True)
    setup = project(good_npy(), NPY_ENTRY, model=hostile_model, qp={"analysis_enable": True})(work)
    before = _files(tmp_path)
    code, lines, _ = _run_cli(setup.args, capsys)
    assert code == 0, lines[-1]
    added = {a for a in _files(tmp_path) - before if not CACHE_ENTRY.fullmatch(Path(a).name)}
    assert added == {f"a/b/out{suffix}" for suffix in (".onnx", "_report.md", "_report.json", "_report.html")}
    page = (work / "out_report.html").read_text(encoding="utf-8")
    for name in (HOSTILE_NAMES["r1"], HOSTILE_NAMES["output"]):  # the quantized tensors the report lists
        assert name not in page and html.escape(name) in page
    assert HOSTILE_NAMES["input"] in page  # path syntax is just text
