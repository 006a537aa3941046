"""``xslim-ort zoo run``: manifest validation, sharding, measurements, thresholds, crashes, result files."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import onnx
import pytest

from xslim_ort.cli import main
from xslim_ort.qparams import cosine, sqnr_db
from xslim_ort.zoo.manifest import load_manifest, manifest_schema

from helpers import run_model, tiny_cnn, write_npy_samples

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "zoo" / "manifest.json"


def tiny_entry(name: str = "tiny", **extra) -> dict:
    return {
        "name": name,
        "model": "tiny.onnx",
        "config": {
            "calibration_parameters": {"input_parametres": [{"file_type": "npy", "data_list_path": "calib.txt"}]}
        },
        "eval": {"lists": ["eval.txt"]},
        "metrics": ["top1_agreement", "sqnr_db", "cosine"],
        **extra,
    }


@pytest.fixture
def tiny_zoo(tmp_path: Path) -> Path:
    """A folder with the tiny CNN, 8 calibration and 6 evaluation samples (npy)."""
    onnx.save(tiny_cnn(), tmp_path / "tiny.onnx")
    write_npy_samples(tmp_path, 8, name="calib")
    write_npy_samples(tmp_path, 6, seed=2, name="eval")
    return tmp_path


def write_manifest(folder: Path, models: list[dict], **top) -> Path:
    data = {
        "config": {
            "calibration_parameters": {"calibration_type": "minmax"},
            "quantization_parameters": {"analysis_enable": False, "finetune_level": 0},
        },
        "models": models,
        **top,
    }
    path = folder / "manifest.json"
    path.write_text(json.dumps(data, indent=2))
    return path


def eval_batches(folder: Path) -> list[dict[str, np.ndarray]]:
    files = (folder / "eval.txt").read_text().split()
    return [{"input": np.load(folder / f)} for f in files]


def outputs(model: Path, batches: list[dict]) -> np.ndarray:
    return np.concatenate([run_model(model, b)[0] for b in batches])


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(["zoo", "run", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --------------------------------------------------------------------------- manifest


def test_schema_is_a_valid_json_schema_and_the_shipped_manifest_follows_it():
    jsonschema = pytest.importorskip("jsonschema")
    schema = manifest_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(json.loads(SHIPPED.read_text()), schema)
    assert sorted(m["name"] for m in json.loads(SHIPPED.read_text())["models"]) == [
        "all_minilm_l6_v2",
        "efficientnet_lite0",
        "mobilenet_v2",
        "ppocr_v6_tiny_det",
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda m: m["models"][0].update(thresholds={"min_sqnr": 10}),
            "unknown key 'models[0].thresholds.min_sqnr'; did you mean 'min_sqnr_db'?",
        ),
        (lambda m: m.update(zoo_rot="."), "unknown key 'zoo_rot'; did you mean 'zoo_root'?"),
        (
            lambda m: m["models"][0]["eval"].update(samples="10"),
            'models[0].eval.samples: expected integer, got a string "10"',
        ),
        (
            lambda m: m["models"][0].update(metrics=["top5"]),
            'models[0].metrics[0]: "top5" is not allowed; use one of '
            '"top1_agreement", "labelled_top1", "sqnr_db", "cosine"',
        ),
        (
            lambda m: m["models"][0].update(thresholds={"min_cosine": 1.5}),
            "models[0].thresholds.min_cosine: must be at most 1, got 1.5",
        ),
        (lambda m: m["models"][0].pop("eval"), "models[0]: missing required key 'eval'"),
        (lambda m: m["models"].append(tiny_entry()), "models[1].name: 'tiny' is used by another model"),
        (
            lambda m: m["models"][0]["eval"].update(lists=["eval.txt", "eval.txt"]),
            "models[0].eval.lists: has 2 list(s) but the config has 1 input entries "
            "(one list per entry of input_parametres, in the same order)",
        ),
        (
            lambda m: m["models"][0].update(metrics=["sqnr_db"], thresholds={"min_cosine": 0.9}),
            "models[0].thresholds.min_cosine: cosine is not in models[0].metrics",
        ),
        (
            lambda m: m["models"][0]["thresholds"].update(max_regression={"labelled_top1": 0.1}),
            "models[0].thresholds.max_regression.labelled_top1: labelled_top1 is not in models[0].metrics",
        ),
        (
            lambda m: m["models"][0].update(metrics=["labelled_top1"]),
            "models[0]: labelled_top1 in metrics and eval.labels go together (give both or neither)",
        ),
        (
            lambda m: m["models"][0]["config"]["calibration_parameters"].update(calibration_steps=4),
            "models[0] (tiny) config: unknown key 'calibration_parameters.calibration_steps'; "
            "did you mean 'calibration_step'?",
        ),
        (
            lambda m: m.update(zoo_root="${XSLIM_ZOO_TEST_UNSET}"),
            "zoo_root: environment variable XSLIM_ZOO_TEST_UNSET is not set (write ${XSLIM_ZOO_TEST_UNSET:-default})",
        ),
    ],
)
def test_bad_manifest_exits_2_naming_the_field(tiny_zoo, capsys, monkeypatch, change, message):
    monkeypatch.delenv("XSLIM_ZOO_TEST_UNSET", raising=False)
    data = json.loads(write_manifest(tiny_zoo, [tiny_entry(thresholds={"min_sqnr_db": 1.0})]).read_text())
    change(data)
    path = tiny_zoo / "bad.json"
    path.write_text(json.dumps(data))
    code, out, err = run_cli([str(path)], capsys)
    assert code == 2
    assert out == ""
    assert err.strip() == f"error: {path}: {message}"


def test_zoo_root_expands_environment_variables(tmp_path, monkeypatch):
    (tmp_path / "sub" / "data").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    path = write_manifest(tmp_path, [tiny_entry()], zoo_root="${XSLIM_ZOO_TEST_ROOT:-sub}/data")
    monkeypatch.delenv("XSLIM_ZOO_TEST_ROOT", raising=False)
    default = load_manifest(path)
    assert default.zoo_root == tmp_path / "sub" / "data"
    assert default.models[0].model == tmp_path / "sub" / "data" / "tiny.onnx"
    assert default.models[0].eval_lists == (tmp_path / "sub" / "data" / "eval.txt",)
    cfg_input = default.models[0].config["calibration_parameters"]["input_parametres"][0]
    assert cfg_input["data_list_path"] == str(tmp_path / "sub" / "data" / "calib.txt")
    monkeypatch.setenv("XSLIM_ZOO_TEST_ROOT", str(tmp_path / "elsewhere"))
    (tmp_path / "elsewhere" / "data").mkdir()
    assert load_manifest(path).models[0].model == tmp_path / "elsewhere" / "data" / "tiny.onnx"


def test_model_config_merges_onto_the_shared_config(tiny_zoo):
    entry = tiny_entry()
    entry["config"]["quantization_parameters"] = {"finetune_level": 1}
    model = load_manifest(write_manifest(tiny_zoo, [entry])).models[0]
    assert model.config["quantization_parameters"] == {"analysis_enable": False, "finetune_level": 1}
    assert model.config["calibration_parameters"]["calibration_type"] == "minmax"
    assert model.config["model_parameters"] == {"onnx_model": str(tiny_zoo / "tiny.onnx")}


def test_config_file_paths_resolve_against_the_file(tiny_zoo):
    (tiny_zoo / "cfg").mkdir()
    cfg = {"calibration_parameters": {"input_parameters": [{"file_type": "npy", "data_list_path": "../calib.txt"}]}}
    (tiny_zoo / "cfg" / "tiny.json").write_text(json.dumps(cfg))
    entry = tiny_entry(config="cfg/tiny.json")
    model = load_manifest(write_manifest(tiny_zoo, [entry])).models[0]
    assert model.config["calibration_parameters"] == {
        "calibration_type": "minmax",
        "input_parametres": [{"file_type": "npy", "data_list_path": str(tiny_zoo / "calib.txt")}],
    }


def test_shards_deal_out_sorted_names(tiny_zoo, capsys):
    names = ["c", "a", "e", "d", "b"]
    manifest = load_manifest(write_manifest(tiny_zoo, [tiny_entry(n) for n in names]))
    shards = [[m.name for m in manifest.select(shard=(i, 2))] for i in (1, 2)]
    assert shards == [["c", "a", "e"], ["d", "b"]]  # a c e / b d, in manifest order
    assert [m.name for m in manifest.select(["e", "b", "a"], (2, 2))] == ["b"]
    assert [m.name for m in manifest.select(shard=(3, 3))] == ["c"]
    code, _, err = run_cli([str(manifest.path), "--shard", "3/2"], capsys)
    assert code == 2
    assert "Invalid value for '--shard': use I/N with 1 <= I <= N (e.g. 1/4), got '3/2'" in err
    code, _, err = run_cli([str(manifest.path), "--only", "bb"], capsys)
    assert code == 2
    assert err.strip() == f"error: --only: {manifest.path} has no model 'bb'; did you mean 'b'?"


# --------------------------------------------------------------------------- running


def test_run_measures_checks_and_writes_result_files(tiny_zoo, capsys):
    strict = tiny_entry("strict", thresholds={"min_sqnr_db": 99.0, "min_top1_agreement": 0.5})
    easy = tiny_entry("easy", thresholds={"min_sqnr_db": 10.0, "min_cosine": 0.99})
    path = write_manifest(tiny_zoo, [easy, strict])
    out_json, junit, md = tiny_zoo / "r.json", tiny_zoo / "r.xml", tiny_zoo / "r.md"
    work = tiny_zoo / "work"
    args = [str(path), "--json", str(out_json), "--junit", str(junit), "--markdown", str(md), "--work-dir", str(work)]
    code, out, _ = run_cli(args, capsys)
    assert code == 1

    # the numbers are the float and int8 models' own, measured independently here
    batches = eval_batches(tiny_zoo)
    ref = outputs(tiny_zoo / "tiny.onnx", batches)
    doc = json.loads(out_json.read_text())
    for model in doc["models"]:
        test = outputs(work / model["name"] / f"{model['name']}.q.onnx", batches)
        assert model["metrics"] == {
            "cosine": pytest.approx(np.mean([cosine(a, b) for a, b in zip(ref, test, strict=True)]), abs=1e-6),
            "sqnr_db": pytest.approx(sqnr_db(ref, test), abs=1e-6),
            "top1_agreement": pytest.approx(np.mean(ref.argmax(1) == test.argmax(1)), abs=1e-6),
        }
        assert model["samples"] == {"eval": 6}
    easy_m, strict_m = (m["metrics"] for m in doc["models"])
    assert easy_m["sqnr_db"] > 20.0 and easy_m["top1_agreement"] == 1.0

    sqnr = f"{strict_m['sqnr_db']:.2f}"
    assert doc["summary"] == {"models": 2, "passed": 1, "failed": 1, "errors": 0}
    assert [m["status"] for m in doc["models"]] == ["pass", "fail"]
    assert [c["message"] for c in doc["models"][1]["checks"]] == [
        "top1_agreement 1.0000 >= 0.5000 (min_top1_agreement)",
        f"sqnr_db {sqnr} < 99.00 (min_sqnr_db)",
    ]
    assert set(doc["timing"]) == {"easy", "strict"}
    lines = out.splitlines()
    assert lines[0] == "[1/2] easy: quantizing and evaluating"
    assert lines[3].startswith(f"[2/2] strict: FAIL top1_agreement 1.0000, sqnr_db {sqnr}, cosine ")
    assert lines[4] == f"    sqnr_db {sqnr} < 99.00 (min_sqnr_db)"
    assert lines[-2:] == ["zoo: 1 passed, 1 failed, 0 errors", f"FAIL strict: sqnr_db {sqnr} < 99.00 (min_sqnr_db)"]

    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite.attrib == {"name": "xslim-ort zoo", "tests": "2", "failures": "1", "errors": "0", "skipped": "0"}
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == ["easy", "strict"]
    assert cases[0].find("failure") is None
    assert cases[1].find("failure").get("message") == f"sqnr_db {sqnr} < 99.00 (min_sqnr_db)"

    rows = [line for line in md.read_text().splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 3  # header + one per model
    assert rows[1] == f"| easy | pass | 1.0000 | — | {easy_m['sqnr_db']:.2f} | {easy_m['cosine']:.4f} |  |"
    assert rows[2].endswith(f"| sqnr_db {sqnr} < 99.00 (min_sqnr_db) |")

    # same numbers, same bytes (timing apart)
    first = (md.read_bytes(), junit.read_bytes(), {k: v for k, v in doc.items() if k != "timing"})
    assert run_cli([*args, "--in-process"], capsys)[0] == 1
    again = json.loads(out_json.read_text())
    assert (md.read_bytes(), junit.read_bytes(), {k: v for k, v in again.items() if k != "timing"}) == first


def test_crash_and_errors_are_reported_and_the_others_still_run(tiny_zoo, capsys):
    (tiny_zoo / "boom.py").write_text(
        "import os, signal\n\ndef pre(paths, entry):\n    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    crash = tiny_entry("crash")
    crash["config"]["calibration_parameters"]["input_parametres"][0]["preprocess_file"] = "boom.py:pre"
    missing = tiny_entry("missing", model="nope.onnx")
    path = write_manifest(tiny_zoo, [crash, missing, tiny_entry("fine")])
    out_json = tiny_zoo / "r.json"
    code, out, _ = run_cli([str(path), "--json", str(out_json)], capsys)
    assert code == 1
    killed = "the worker process was killed by signal SIGKILL (a crash in native code, or out of memory)"
    absent = f"model_parameters.onnx_model: file not found: {tiny_zoo / 'nope.onnx'}"
    assert out.splitlines()[-3:] == [
        "zoo: 1 passed, 0 failed, 2 errors",
        f"ERROR crash: {killed}",
        f"ERROR missing: {absent}",
    ]
    doc = json.loads(out_json.read_text())
    assert [(m["name"], m["status"], m["error"]) for m in doc["models"]] == [
        ("crash", "error", killed),
        ("missing", "error", absent),
        ("fine", "pass", None),
    ]
    assert doc["models"][2]["metrics"]["top1_agreement"] == 1.0


def test_baseline_regression(tiny_zoo, capsys):
    entry = tiny_entry(thresholds={"max_regression": {"sqnr_db": 0.5, "top1_agreement": 0.0}})
    path = write_manifest(tiny_zoo, [entry])
    first, base = tiny_zoo / "first.json", tiny_zoo / "base.json"
    work = ["--work-dir", str(tiny_zoo / "work"), "--in-process"]
    assert run_cli([str(path), "--json", str(first), *work], capsys)[0] == 0
    doc = json.loads(first.read_text())
    sqnr = doc["models"][0]["metrics"]["sqnr_db"]

    assert run_cli([str(path), "--baseline", str(first), *work], capsys)[0] == 0  # against itself: no change
    doc["models"][0]["metrics"]["sqnr_db"] = sqnr + 2.0
    base.write_text(json.dumps(doc))
    code, out, _ = run_cli([str(path), "--baseline", str(base), "--json", str(first), *work], capsys)
    assert code == 1
    message = f"sqnr_db {sqnr:.2f} vs baseline {sqnr + 2:.2f} (-2.00; max_regression 0.50)"
    assert out.splitlines()[-1] == f"FAIL tiny: {message}"
    checks = json.loads(first.read_text())["models"][0]["checks"]
    assert [(c["rule"], c["passed"], c["message"]) for c in checks] == [
        ("max_regression", False, message),
        ("max_regression", True, "top1_agreement 1.0000 vs baseline 1.0000 (+0.0000; max_regression 0.0000)"),
    ]

    base.write_text('{"models": 3}')
    code, _, err = run_cli([str(path), "--baseline", str(base)], capsys)
    assert code == 2
    assert err.strip() == f"error: {base}: not a zoo results file (write one with xslim-ort zoo run --json)"


def test_labelled_top1_against_a_labels_file(tiny_zoo, capsys):
    batches = eval_batches(tiny_zoo)
    float_pred = outputs(tiny_zoo / "tiny.onnx", batches).argmax(1)
    files = (tiny_zoo / "eval.txt").read_text().split()
    labels = [int(p) if k < 4 else (int(p) + 1) % 10 for k, p in enumerate(float_pred)]  # float: 4 of 6 right
    (tiny_zoo / "labels.txt").write_text("".join(f"{f} {c}\n" for f, c in zip(files, labels, strict=True)))
    entry = tiny_entry(metrics=["labelled_top1"], thresholds={"max_top1_drop": 0.0})
    entry["eval"]["labels"] = "labels.txt"
    path = write_manifest(tiny_zoo, [entry])
    out_json = tiny_zoo / "r.json"
    work = tiny_zoo / "work"
    code, _, _ = run_cli([str(path), "--json", str(out_json), "--work-dir", str(work), "--in-process"], capsys)
    int8_pred = outputs(work / "tiny" / "tiny.q.onnx", batches).argmax(1)
    int8_acc = float(np.mean(int8_pred == np.asarray(labels)))
    metrics = json.loads(out_json.read_text())["models"][0]["metrics"]
    assert metrics == {
        "float_labelled_top1": 0.666667,
        "labelled_top1": round(int8_acc, 6),
        "top1_drop": round(4 / 6 - int8_acc, 6),
    }
    assert code == (0 if int8_acc >= 4 / 6 else 1)


# --------------------------------------------------------------------------- the zoo


@pytest.mark.zoo
def test_shipped_manifest_passes_and_fails_when_a_threshold_is_raised(zoo, tmp_path, monkeypatch, capsys):
    """MobileNetV2 of the shipped manifest, thresholds as shipped, on a CI-sized run (16 calibration
    batches, 16 evaluation and labelled images); then the same with min_sqnr_db above what it reaches."""
    monkeypatch.setenv("XSLIM_ORT_ZOO", str(zoo))
    data = json.loads(SHIPPED.read_text())
    data["config"]["calibration_parameters"]["calibration_step"] = 16
    target = next(m for m in data["models"] if m["name"] == "mobilenet_v2")
    target["eval"]["samples"] = 16
    short = tmp_path / "zoo" / "manifest.json"  # zoo_root comes from $XSLIM_ORT_ZOO
    short.parent.mkdir()
    short.write_text(json.dumps(data))
    out_json, junit, md = tmp_path / "r.json", tmp_path / "r.xml", tmp_path / "r.md"
    args = [str(short), "--only", "mobilenet_v2", "--json", str(out_json), "--junit", str(junit), "--markdown", str(md)]
    code, out, _ = run_cli(args, capsys)
    assert code == 0, out
    model = json.loads(out_json.read_text())["models"][0]
    metrics = model["metrics"]
    assert model["samples"] == {"eval": 16, "labelled": 16}
    assert metrics["float_labelled_top1"] == 0.8125  # 13 of the first 16 labelled images
    thresholds = target["thresholds"]
    assert metrics["sqnr_db"] >= thresholds["min_sqnr_db"] and metrics["cosine"] >= thresholds["min_cosine"]
    assert metrics["top1_agreement"] >= thresholds["min_top1_agreement"]
    assert metrics["top1_drop"] <= thresholds["max_top1_drop"]
    assert out.splitlines()[-1] == "zoo: 1 passed, 0 failed, 0 errors"
    assert ET.parse(junit).getroot().find("testsuite").get("failures") == "0"
    assert md.read_text().count("| mobilenet_v2 | pass |") == 1

    raised = round(metrics["sqnr_db"] + 10.0, 2)
    target["thresholds"]["min_sqnr_db"] = raised
    short.write_text(json.dumps(data))
    code, out, _ = run_cli([str(short), "--only", "mobilenet_v2", "--junit", str(junit)], capsys)
    assert code == 1
    message = f"sqnr_db {metrics['sqnr_db']:.2f} < {raised:.2f} (min_sqnr_db)"
    assert out.splitlines()[-1] == f"FAIL mobilenet_v2: {message}"
    case = ET.parse(junit).getroot().find("testsuite/testcase")
    assert (case.get("name"), case.find("failure").get("message")) == ("mobilenet_v2", message)
