"""Calibration data: list files, readers, presets, user preprocessing, the stream-once cache.

Every expected batch is computed here independently with NumPy/OpenCV from the spec's rules,
and every bad input checks its exact one-line message.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from xslim_ort.calibration import readers
from xslim_ort.calibration.cache import BatchCache, build_batch_source
from xslim_ort.calibration.readers import (
    InputSpec,
    XSlimDataReader,
    data_fingerprint,
    providers_for,
    resolve_inputs,
)
from xslim_ort.config import load_config
from xslim_ort.errors import ConfigError, DataError

F32, I64 = TensorProto.FLOAT, TensorProto.INT64


# --------------------------------------------------------------------------- helpers


def make_model(*inputs: tuple[str, int, list[int | str]]) -> onnx.ModelProto:
    """A model passing each input through an Identity (enough for reading and for ORT)."""
    vis = [helper.make_tensor_value_info(n, t, d) for n, t, d in inputs]
    outs = [helper.make_tensor_value_info(f"{n}_out", t, d) for n, t, d in inputs]
    nodes = [helper.make_node("Identity", [n], [f"{n}_out"]) for n, _, _ in inputs]
    graph = helper.make_graph(nodes, "g", vis, outs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def write_image(path: Path, img: np.ndarray) -> Path:
    ok, buf = cv2.imencode(path.suffix, img)
    assert ok
    buf.tofile(path)  # works for the non-ASCII names used below
    return path


def write_list(path: Path, lines: list[str], *, newline: str = "\n", bom: bool = False) -> Path:
    text = newline.join(lines) + newline
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


def config(entries: list[dict[str, Any]], **calibration: Any) -> Any:
    return load_config({"calibration_parameters": {**calibration, "input_parametres": entries}})


def read_all(cfg: Any, model: onnx.ModelProto, **kwargs: Any) -> list[dict[str, np.ndarray]]:
    reader = XSlimDataReader(cfg, model, **kwargs)
    return list(iter(reader.get_next, None))


def solid(h: int, w: int, bgr: tuple[int, int, int]) -> np.ndarray:
    return np.full((h, w, 3), bgr, dtype=np.uint8)


def noise(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def data_error(fn: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    assert info.value.exit_code == 2
    return info.value.message


# --------------------------------------------------------------------------- img


def test_img_bgr_rgb_mean_std_nchw(tmp_path: Path) -> None:
    img = write_image(tmp_path / "цвет_图.png", solid(9, 11, (10, 20, 30)))
    lst = write_list(tmp_path / "calib.txt", [img.name])
    model = make_model(("x", F32, ["N", 3, 4, 5]))
    common = {"mean_value": [1, 2, 3], "std_value": [2, 4, 6], "data_list_path": str(lst)}
    (bgr,) = read_all(config([common]), model)
    (rgb,) = read_all(config([{**common, "color_format": "rgb"}]), model)
    assert bgr["x"].shape == (1, 3, 4, 5) and bgr["x"].dtype == np.float32
    np.testing.assert_allclose(bgr["x"][0, :, 0, 0], [4.5, 4.5, 27 / 6], rtol=1e-6)
    np.testing.assert_allclose(rgb["x"][0, :, 0, 0], [14.5, 4.5, 7 / 6], rtol=1e-6)
    assert np.ptp(rgb["x"][0], axis=(1, 2)).tolist() == [0, 0, 0]


def test_img_direct_resize_matches_opencv_reference(tmp_path: Path) -> None:
    raw = noise(13, 17, seed=1)
    img = write_image(tmp_path / "a.png", raw)
    lst = write_list(tmp_path / "calib.txt", [str(img)])  # absolute path in a list
    model = make_model(("x", F32, [1, 3, 6, 8]))
    mean, std = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
    cfg = config([{"color_format": "rgb", "mean_value": mean, "std_value": std, "data_list_path": str(lst)}])
    (batch,) = read_all(cfg, model)
    ref = cv2.resize(raw, (8, 6), interpolation=cv2.INTER_AREA)[:, :, ::-1].astype(np.float32)
    ref = ((ref - np.float32(mean)) / np.float32(std)).transpose(2, 0, 1)[None]
    np.testing.assert_allclose(batch["x"], ref, rtol=0, atol=1e-6)


def test_img_nhwc_input(tmp_path: Path) -> None:
    raw = noise(10, 12, seed=2)
    lst = write_list(tmp_path / "calib.txt", [write_image(tmp_path / "a.png", raw).name])
    model = make_model(("x", F32, ["N", 5, 7, 3]))
    cfg = config([{"mean_value": [128], "std_value": [64], "data_list_path": str(lst)}])
    ((_, spec),) = resolve_inputs(cfg, model)
    assert spec == InputSpec("x", (1, 5, 7, 3), np.dtype(np.float32), "NHWC")
    (batch,) = read_all(cfg, model)
    ref = (cv2.resize(raw, (7, 5), interpolation=cv2.INTER_AREA).astype(np.float32) - 128) / 64
    np.testing.assert_allclose(batch["x"], ref[None], rtol=0, atol=1e-6)


def test_img_grayscale_input_and_uint8_model(tmp_path: Path) -> None:
    gray = noise(8, 8, seed=3)[:, :, 0]
    lst = write_list(tmp_path / "calib.txt", [write_image(tmp_path / "a.png", gray).name])
    model = make_model(("g", TensorProto.UINT8, [1, 1, 4, 4]))
    (batch,) = read_all(config([{"data_list_path": str(lst)}]), model)
    ref = np.floor(gray.reshape(4, 2, 4, 2).mean(axis=(1, 3)) + 0.5).astype(np.uint8)  # 2x2 area mean
    assert batch["g"].dtype == np.uint8
    np.testing.assert_array_equal(batch["g"], ref[None, None])


def test_two_image_inputs_pair_line_i_of_each_list(tmp_path: Path) -> None:
    left = [write_image(tmp_path / f"l{i}.png", solid(6, 6, (i, i, i))).name for i in range(3)]
    right = [write_image(tmp_path / f"r{i}.jpg", solid(8, 8, (100 + 10 * i,) * 3)).name for i in range(3)]
    model = make_model(("left", F32, ["N", 3, 4, 4]), ("right", F32, ["N", 3, 2, 2]))
    cfg = config(
        [
            {"data_list_path": str(write_list(tmp_path / "left.txt", left))},
            {"data_list_path": str(write_list(tmp_path / "right.txt", right))},
        ],
        calibration_batch_size=2,
    )
    batches = read_all(cfg, model)
    assert [b["left"].shape for b in batches] == [(2, 3, 4, 4), (1, 3, 4, 4)]
    assert [b["right"].shape for b in batches] == [(2, 3, 2, 2), (1, 3, 2, 2)]
    assert [float(v) for b in batches for v in b["left"][:, 0, 0, 0]] == [0, 1, 2]
    assert [float(v) for b in batches for v in b["right"][:, 0, 0, 0]] == [100, 110, 120]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = session.run(None, batches[0])
    np.testing.assert_array_equal(out[1], batches[0]["right"])


# --------------------------------------------------------------------------- presets


def imagenet_reference(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """xslim's IMAGENET, from the spec: short side to H/0.875 (area), centre crop with int()."""
    ih, iw = img.shape[:2]
    nh, nw = int(100.0 * h / 87.5), int(100.0 * w / 87.5)
    size = (nw, int(nh * ih / iw)) if ih > iw else (int(nw * iw / ih), nh)
    r = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    top, left = int((r.shape[0] - h) / 2), int((r.shape[1] - w) / 2)
    return r[top : top + h, left : left + w]


def pt_imagenet_reference(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """torchvision's Resize(int(H/0.875)) + CenterCrop, with OpenCV bilinear."""
    ih, iw = img.shape[:2]
    short = int(h / 0.875)
    size = (short, int(short * ih / iw)) if ih > iw else (int(short * iw / ih), short)
    r = cv2.resize(img, size, interpolation=cv2.INTER_LINEAR)
    top, left = round((r.shape[0] - h) / 2.0), round((r.shape[1] - w) / 2.0)
    return r[top : top + h, left : left + w]


@pytest.mark.parametrize(
    ("preset", "reference", "crop_left"),
    [("IMAGENET", imagenet_reference, 5), ("PT_IMAGENET", pt_imagenet_reference, 6)],
)
def test_presets_match_reference(tmp_path: Path, preset: str, reference: Any, crop_left: int) -> None:
    # 60x40 resizes to 27x18 for a 16x16 input: the crop starts at 5.5, which the presets
    # round differently (int() for xslim's IMAGENET, round() for torchvision).
    landscape, portrait = noise(40, 60, seed=4), noise(61, 29, seed=5)
    names = [write_image(tmp_path / "land.png", landscape).name, write_image(tmp_path / "port.png", portrait).name]
    lst = write_list(tmp_path / "calib.txt", names)
    model = make_model(("x", F32, ["N", 3, 16, 16]))
    mean, std = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
    entry = {"color_format": "rgb", "mean_value": mean, "std_value": std, "preprocess_file": preset}
    batches = read_all(config([{**entry, "data_list_path": str(lst)}], calibration_batch_size=2), model)
    assert len(batches) == 1
    for i, raw in enumerate((landscape, portrait)):
        crop = reference(raw, 16, 16)[:, :, ::-1].astype(np.float32)
        ref = ((crop - np.float32(mean)) / np.float32(std)).transpose(2, 0, 1)
        np.testing.assert_allclose(batches[0]["x"][i], ref, rtol=0, atol=1e-5)
    wide = cv2.resize(landscape, (27, 18), interpolation=cv2.INTER_AREA if preset == "IMAGENET" else cv2.INTER_LINEAR)
    np.testing.assert_array_equal(reference(landscape, 16, 16), wide[1:17, crop_left : crop_left + 16])


def test_presets_on_zoo_mobilenet_run_in_ort(zoo: Path) -> None:
    model = onnx.load(zoo / "models" / "mobilenet_v2.onnx")
    mean, std = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
    entry = {"color_format": "rgb", "mean_value": mean, "std_value": std, "preprocess_file": "PT_IMAGENET"}
    cfg = config([{**entry, "data_list_path": str(zoo / "images" / "calib.txt")}], calibration_step=2)
    batches = read_all(cfg, model)
    assert len(batches) == 2
    first = (zoo / "images" / "calib.txt").read_text().splitlines()[0]
    raw = cv2.imdecode(np.fromfile(zoo / "images" / first, dtype=np.uint8), cv2.IMREAD_COLOR)
    crop = pt_imagenet_reference(raw, 224, 224)[:, :, ::-1].astype(np.float32)
    ref = ((crop - np.float32(mean)) / np.float32(std)).transpose(2, 0, 1)[None]
    np.testing.assert_allclose(batches[0]["input"], ref, rtol=0, atol=1e-5)
    session = ort.InferenceSession(str(zoo / "models" / "mobilenet_v2.onnx"), providers=providers_for("cpu"))
    (logits,) = session.run(None, batches[0])
    assert logits.shape == (1, 1000)


# --------------------------------------------------------------------------- npy and raw


def test_npy_all_dtypes_with_and_without_batch_dim(tmp_path: Path) -> None:
    types = {"i8": (TensorProto.INT8, [4]), "u8": (TensorProto.UINT8, [2, 2]), "i16": (TensorProto.INT16, [3])}
    types |= {"ids": (I64, [5]), "f": (F32, [2])}
    model = make_model(*[(n, t, ["N", *d]) for n, (t, d) in types.items()])
    rng = np.random.default_rng(6)
    entries, expected = [], {}
    for name, (elem, dims) in types.items():
        dtype = helper.tensor_dtype_to_np_dtype(elem)
        arrays = [rng.integers(-100, 100, dims).astype(dtype) for _ in range(3)]
        for i, a in enumerate(arrays):
            np.save(tmp_path / f"{name}{i}.npy", a[None] if i == 1 else a)  # sample 1 keeps a batch dim
        lst = write_list(tmp_path / f"{name}.txt", [f"{name}{i}.npy" for i in range(3)])
        entries.append({"file_type": "npy", "data_list_path": str(lst)})
        expected[name] = np.stack(arrays)
    batches = read_all(config(entries, calibration_batch_size=3), model)
    assert len(batches) == 1
    for name, ref in expected.items():
        assert batches[0][name].dtype == ref.dtype
        np.testing.assert_array_equal(batches[0][name], ref)


def test_npy_float64_is_cast_and_float_for_int_input_is_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.array([0.5, 1.5]))
    lst = write_list(tmp_path / "calib.txt", ["a.npy"])
    (batch,) = read_all(config([{"file_type": "npy", "data_list_path": str(lst)}]), make_model(("f", F32, [1, 2])))
    assert batch["f"].dtype == np.float32 and batch["f"].tolist() == [[0.5, 1.5]]
    msg = data_error(
        read_all, config([{"file_type": "npy", "data_list_path": str(lst)}]), make_model(("t", I64, [1, 2]))
    )
    assert msg == f"{lst}:1: {tmp_path / 'a.npy'} holds float64 data but input 't' takes int64"


def test_zoo_minilm_three_npy_lists(zoo: Path) -> None:
    model = onnx.load(zoo / "models" / "all_minilm_l6_v2.onnx")
    names = ["input_ids", "attention_mask", "token_type_ids"]
    entries = [
        {
            "input_name": n,
            "input_shape": [1, 64],
            "file_type": "npy",
            "data_list_path": str(zoo / "text" / f"calib_{n}.txt"),
        }
        for n in names
    ]
    batches = read_all(config(entries, calibration_step=2, calibration_batch_size=4), model)
    assert len(batches) == 2
    for n in names:
        files = (zoo / "text" / f"calib_{n}.txt").read_text().split()[4:8]
        ref = np.concatenate([np.load(zoo / "text" / f) for f in files])
        assert batches[1][n].dtype == np.int64
        np.testing.assert_array_equal(batches[1][n], ref)
    assert batches[0]["attention_mask"].sum() == sum(
        np.load(zoo / "text" / f).sum() for f in (zoo / "text" / "calib_attention_mask.txt").read_text().split()[:4]
    )
    session = ort.InferenceSession(str(zoo / "models" / "all_minilm_l6_v2.onnx"), providers=providers_for("cpu"))
    hidden, embedding = session.run(None, batches[0])
    assert hidden.shape == (4, 64, 384)
    np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, rtol=1e-5)


def test_raw_reshaped_and_cast_from_file_dtype(tmp_path: Path) -> None:
    values = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    for i in range(2):
        (values[i] + 100 * i).tofile(tmp_path / f"s{i}.raw")
    lst = write_list(tmp_path / "calib.txt", ["s0.raw", "s1.raw"])
    model = make_model(("x", F32, ["N", 2, 3]))
    entry = {"file_type": "raw", "dtype": "uint8", "input_shape": [2, 2, 3], "data_list_path": str(lst)}
    (batch,) = read_all(config([entry]), model)
    assert batch["x"].dtype == np.float32
    np.testing.assert_array_equal(batch["x"], [values[0], values[1] + 100])


def test_raw_size_mismatch_names_file_and_byte_counts(tmp_path: Path) -> None:
    np.zeros(6, np.float32).tofile(tmp_path / "ok.raw")
    np.zeros(5, np.float32).tofile(tmp_path / "short.raw")
    lst = write_list(tmp_path / "calib.txt", ["ok.raw", "", "short.raw"])
    cfg = config([{"file_type": "raw", "data_list_path": str(lst)}])
    msg = data_error(read_all, cfg, make_model(("x", F32, ["N", 2, 3])))
    assert msg == f"{lst}:3: {tmp_path / 'short.raw'} has 20 bytes; expected 24 (float32 [2, 3])"


# --------------------------------------------------------------------------- user preprocessing

PREPROCESS = """
import dataclasses

import numpy as np
from pp_helper import SCALE  # a sibling module: the file's folder is importable while it loads


@dataclasses.dataclass(frozen=True)
class Options:
    scale: float = SCALE


def as_numpy(paths, entry):
    n, c = len(paths), entry["input_shape"][1]
    rows = [np.load(p).astype(np.float32) * Options().scale for p in paths]
    assert entry["input_name"] == "x" and entry["dtype"] == "float32" and c == 3
    return np.stack(rows).reshape(n, c)


class FakeTensor:
    # quacks like torch.Tensor; its class claims to live in torch
    def __init__(self, array):
        self.array = array

    def detach(self):
        return self

    def cpu(self):
        return self

    def numpy(self):
        return self.array


FakeTensor.__module__ = "torch"


def as_fake_torch(paths, entry):
    return FakeTensor(as_numpy(paths, entry))


def as_torch(paths, entry):
    import torch

    return torch.from_numpy(as_numpy(paths, entry)).requires_grad_()


def wrong_shape(paths, entry):
    return np.zeros((len(paths), 2), np.float32)


def wrong_dtype(paths, entry):
    return np.zeros((len(paths), 3), np.complex64)


def a_list(paths, entry):
    return [0.0, 1.0, 2.0]


def fails(paths, entry):
    return 1 / 0


def with_nan(paths, entry):
    out = as_numpy(paths, entry)
    out[-1, 0] = np.nan
    return out
"""


@pytest.fixture
def user_data(tmp_path: Path) -> tuple[Path, Path, onnx.ModelProto]:
    (tmp_path / "pp.py").write_text(PREPROCESS)
    (tmp_path / "pp_helper.py").write_text("SCALE = 2.0\n")
    for i in range(3):
        np.save(tmp_path / f"s{i}.npy", np.array([i, 10 * i, 100 * i]))
    lst = write_list(tmp_path / "calib.txt", [f"s{i}.npy" for i in range(3)])
    return tmp_path, lst, make_model(("x", F32, ["N", 3]))


def run_user(user_data: tuple[Path, Path, onnx.ModelProto], func: str) -> list[dict[str, np.ndarray]]:
    folder, lst, model = user_data
    entry = {"file_type": "npy", "preprocess_file": f"{folder / 'pp.py'}:{func}", "data_list_path": str(lst)}
    return read_all(config([entry], calibration_batch_size=2), model)


EXPECTED_USER = [[[0, 0, 0], [2, 20, 200]], [[4, 40, 400]]]


@pytest.mark.parametrize("func", ["as_numpy", "as_fake_torch"])
def test_user_preprocess_numpy_and_tensor_like(user_data: Any, func: str) -> None:
    path_before = list(sys.path)
    batches = run_user(user_data, func)
    assert [b["x"].tolist() for b in batches] == EXPECTED_USER
    assert all(b["x"].dtype == np.float32 for b in batches)
    assert sys.path == path_before


def test_user_preprocess_torch_tensor_gives_same_batches(user_data: Any) -> None:
    pytest.importorskip("torch")
    assert [b["x"].tolist() for b in run_user(user_data, "as_torch")] == EXPECTED_USER


@pytest.mark.parametrize(
    ("func", "message"),
    [
        ("wrong_shape", "{ref} returned shape [2, 2] for input 'x'; expected [2, 3]"),
        ("wrong_dtype", "{ref} returned complex64 data for input 'x', which takes float32 (shape [2, 3])"),
        ("a_list", "{ref} returned list; expected a NumPy array or a torch tensor"),
        ("with_nan", "{lst}:2: NaN or Inf in what {ref} returned for {folder}/s1.npy"),
        ("missing", "{ref}: {folder}/pp.py has no function 'missing'"),
        ("fails", "{lst}:1-2: {ref} failed: ZeroDivisionError: division by zero"),
    ],
)
def test_user_preprocess_errors(user_data: Any, func: str, message: str) -> None:
    folder, lst, _ = user_data
    ref = f"{folder / 'pp.py'}:{func}"
    assert data_error(run_user, user_data, func) == message.format(ref=ref, lst=lst, folder=folder)


def test_user_preprocess_import_error(user_data: Any) -> None:
    folder, lst, model = user_data
    (folder / "broken.py").write_text("raise ValueError('boom')\n")
    ref = f"{folder / 'broken.py'}:f"
    entry = {"file_type": "npy", "preprocess_file": ref, "data_list_path": str(lst)}
    msg = data_error(read_all, config([entry]), model)
    assert msg == f"{ref}: importing {folder / 'broken.py'} failed: ValueError: boom"


def test_user_preprocess_reference_must_name_a_function(user_data: Any) -> None:
    _, lst, model = user_data
    entry = {"file_type": "npy", "preprocess_file": "pp.py", "data_list_path": str(lst)}
    msg = data_error(read_all, config([entry]), model)
    assert msg == "preprocess_file must be IMAGENET, PT_IMAGENET or path.py:function, got 'pp.py'"


# --------------------------------------------------------------------------- lists and batching


def test_list_tolerates_bom_crlf_spaces_and_blank_lines(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    for i in range(3):
        np.save(tmp_path / "sub" / f"s{i}.npy", np.full((1, 2), i, np.float32))
    lines = ["s0.npy  ", "", "   ", f"{tmp_path / 'sub' / 's1.npy'}\t", "s2.npy"]
    lst = write_list(tmp_path / "sub" / "calib.txt", lines, newline="\r\n", bom=True)
    batches = read_all(config([{"file_type": "npy", "data_list_path": str(lst)}]), make_model(("x", F32, ["N", 2])))
    assert [b["x"].tolist() for b in batches] == [[[0, 0]], [[1, 1]], [[2, 2]]]
    np.save(tmp_path / "sub" / "s2.npy", np.array([[np.inf, 0]], np.float32))
    msg = data_error(
        read_all, config([{"file_type": "npy", "data_list_path": str(lst)}]), make_model(("x", F32, ["N", 2]))
    )
    assert msg == f"{lst}:5: NaN or Inf in {tmp_path / 'sub' / 's2.npy'}"


def test_relative_list_path_found_next_to_config_file(tmp_path: Path, monkeypatch: Any) -> None:
    np.save(tmp_path / "a.npy", np.ones((1, 2), np.float32))
    write_list(tmp_path / "calib.txt", ["a.npy"])
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(
        '{"calibration_parameters": {"input_parametres": [{"file_type": "npy", "data_list_path": "calib.txt"}]}}'
    )
    monkeypatch.chdir(tmp_path.parent)
    (batch,) = read_all(load_config(cfg_file), make_model(("x", F32, ["N", 2])))
    assert batch["x"].tolist() == [[1, 1]]


def npy_samples(tmp_path: Path, n: int, name: str = "calib.txt") -> Path:
    for i in range(n):
        np.save(tmp_path / f"s{i}.npy", np.full((1, 2), i, np.float32))
    return write_list(tmp_path / name, [f"s{i}.npy" for i in range(n)])


@pytest.mark.parametrize(
    ("dims", "calibration", "kwargs", "sizes"),
    [
        (["N", 2], {"calibration_batch_size": 2}, {}, [2, 2, 1]),  # symbolic batch: partial batch fed
        ([2, 2], {}, {}, [2, 2]),  # fixed batch of 2: partial batch dropped
        (["N", 2], {"calibration_batch_size": 2, "calibration_step": 2}, {}, [2, 2]),
        (["N", 2], {"calibration_batch_size": 2}, {"max_samples": 3}, [2, 1]),
        (["N", 2], {"calibration_step": 1}, {"max_batches": 4}, [1, 1, 1, 1]),
    ],
)
def test_batching(tmp_path: Path, dims: list[Any], calibration: dict[str, int], kwargs: Any, sizes: list[int]) -> None:
    cfg = config([{"file_type": "npy", "data_list_path": str(npy_samples(tmp_path, 5))}], **calibration)
    reader = XSlimDataReader(cfg, make_model(("x", F32, dims)), **kwargs)
    batches = list(iter(reader.get_next, None))
    assert len(reader) == len(sizes)
    assert [len(b["x"]) for b in batches] == sizes
    assert [float(b["x"][0, 0]) for b in batches] == [sum(sizes[:i]) for i in range(len(sizes))]
    reader.rewind()
    np.testing.assert_array_equal(reader.get_next()["x"], batches[0]["x"])


def test_input_shape_batch_dim_sets_batch_size(tmp_path: Path) -> None:
    cfg = config([{"file_type": "npy", "input_shape": [3, 2], "data_list_path": str(npy_samples(tmp_path, 5))}])
    assert [len(b["x"]) for b in read_all(cfg, make_model(("x", F32, ["N", 2])))] == [3, 2]


def test_lists_of_different_length(tmp_path: Path) -> None:
    a, b = npy_samples(tmp_path, 4, "a.txt"), npy_samples(tmp_path, 3, "b.txt")
    model = make_model(("x", F32, ["N", 2]), ("y", F32, ["N", 2]))
    cfg = config([{"file_type": "npy", "data_list_path": str(a)}, {"file_type": "npy", "data_list_path": str(b)}])
    msg = data_error(read_all, cfg, model)
    assert msg == f"the list files differ in length: {a} has 4 samples, {b} has 3 (line i of every list is sample i)"


# --------------------------------------------------------------------------- matching inputs


def test_entries_matched_by_name_or_position_in_model_order(tmp_path: Path) -> None:
    lst = str(npy_samples(tmp_path, 1))
    model = make_model(("a", F32, ["N", 2]), ("b", I64, [1, "S"]))
    entries = [{"file_type": "npy", "input_shape": [1, 7], "input_name": "b", "data_list_path": lst}]
    entries.append({"file_type": "npy", "input_name": "a", "data_list_path": lst})
    pairs = resolve_inputs(config(entries), model)
    assert [spec for _, spec in pairs] == [
        InputSpec("a", (1, 2), np.dtype(np.float32), None),
        InputSpec("b", (1, 7), np.dtype(np.int64), None),
    ]
    initializer = helper.make_tensor("w", F32, [1], [1.0])
    model.graph.input.append(helper.make_tensor_value_info("w", F32, [1]))
    model.graph.initializer.append(initializer)
    assert len(resolve_inputs(config(entries), model)) == 2  # an initializer listed as input is not fed


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (
            [{"input_name": "c"}],
            "calibration_parameters.input_parametres[0].input_name: the model has no input 'c'; its inputs are: a, b",
        ),
        ([{}, {}, {}], "calibration_parameters.input_parametres has 3 entries but the model has 2 input(s): a, b"),
        (
            [{}],
            "calibration_parameters.input_parametres: no entry for model input(s) b "
            "(one entry per model input, in model input order)",
        ),
        (
            [{}, {"input_name": "a"}],
            "calibration_parameters.input_parametres[1]: input 'a' already has an entry "
            "(calibration_parameters.input_parametres[0])",
        ),
        (
            [{}, {}],
            "calibration_parameters.input_parametres[1] (input 'b'): dimension 1 ('seq') of shape "
            "['batch', 'seq'] is symbolic; set input_shape in this entry",
        ),
        (
            [{}, {"input_shape": [1, 4, 4]}],
            "calibration_parameters.input_parametres[1] (input 'b'): input_shape [1, 4, 4] has 3 dims "
            "but the model's input has 2",
        ),
        (
            [{"input_shape": [1, 3, 5, 5]}, {"input_shape": [1, 4]}],
            "calibration_parameters.input_parametres[0] (input 'a'): input_shape [1, 3, 5, 5] gives 5 for "
            "dimension 2, which the model fixes at 4",
        ),
        (
            [{}, {"input_shape": [2, 4], "file_type": "npy"}],
            "all inputs need the same batch size (line i of every list is sample i): 'a' has 1, 'b' has 2",
        ),
        (
            [{}, {"input_shape": [1, 4], "dtype": "float32"}],
            "calibration_parameters.input_parametres[1] (input 'b'): dtype is float32 in the config "
            "but the model takes int64",
        ),
        (
            [{}, {"input_shape": [1, 4]}],
            "calibration_parameters.input_parametres[1] (input 'b'): file_type img needs a 4-D NCHW or NHWC "
            "input, the shape is [1, 4]",
        ),
    ],
)
def test_resolve_inputs_errors(entries: list[dict[str, Any]], message: str) -> None:
    model = make_model(("a", F32, ["batch", 3, 4, 4]), ("b", I64, ["batch", "seq"]))
    assert data_error(resolve_inputs, config(entries), model) == message


def test_fixed_batch_and_calibration_batch_size_conflict() -> None:
    msg = data_error(resolve_inputs, config([{}], calibration_batch_size=4), make_model(("a", F32, [1, 3, 4, 4])))
    assert msg == (
        "calibration_parameters.input_parametres[0] (input 'a'): calibration_batch_size is 4 "
        "but the model's batch dimension is fixed at 1"
    )


# --------------------------------------------------------------------------- bad data


def test_bad_data_messages(tmp_path: Path) -> None:
    write_image(tmp_path / "good.png", solid(4, 4, (1, 2, 3)))
    (tmp_path / "broken.jpg").write_bytes(b"not an image at all")
    (tmp_path / "empty.png").write_bytes(b"")
    model = make_model(("x", F32, ["N", 3, 4, 4]))

    def message(lines: list[str], entry: dict[str, Any] | None = None) -> str:
        lst = write_list(tmp_path / "calib.txt", lines)
        return data_error(read_all, config([{**(entry or {}), "data_list_path": str(lst)}]), model)

    lst = tmp_path / "calib.txt"
    assert message(["good.png", "", "missing.png"]) == f"{lst}:3: file not found: {tmp_path / 'missing.png'}"
    assert message(["good.png", "broken.jpg"]) == f"{lst}:2: cannot decode image {tmp_path / 'broken.jpg'}"
    assert message(["empty.png"]) == f"{lst}:1: cannot decode image {tmp_path / 'empty.png'}"
    assert message(["", "  "]) == f"{lst}: no samples (the list file is empty or has only blank lines)"
    (tmp_path / "bad.npy").write_bytes(b"\x93NUMPY garbage")
    msg = message(["bad.npy"], {"file_type": "npy", "input_shape": [1, 3, 4, 4]})
    assert msg.startswith(f"{lst}:1: cannot read .npy file {tmp_path / 'bad.npy'}: ")
    np.save(tmp_path / "nan.npy", np.full((3, 4, 4), np.nan, np.float32))
    assert message(["nan.npy"], {"file_type": "npy"}) == f"{lst}:1: NaN or Inf in {tmp_path / 'nan.npy'}"
    np.save(tmp_path / "small.npy", np.zeros((3, 4), np.float32))
    assert message(["small.npy"], {"file_type": "npy"}) == (
        f"{lst}:1: {tmp_path / 'small.npy'} has shape [3, 4]; input 'x' needs [3, 4, 4] per sample (or [1, 3, 4, 4])"
    )
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9.png\n")
    msg = data_error(read_all, config([{"data_list_path": str(tmp_path / "latin1.txt")}]), model)
    assert msg == f"{tmp_path / 'latin1.txt'}: the list file is not UTF-8 text (byte 3)"


def test_missing_list_file(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.chdir(tmp_path)
    msg = data_error(read_all, config([{"data_list_path": "nope.txt"}]), make_model(("x", F32, [1, 3, 4, 4])))
    assert msg == (
        f"calibration_parameters.input_parametres[0].data_list_path: file not found: nope.txt "
        f"(looked in {tmp_path / 'nope.txt'})"
    )
    msg = data_error(read_all, config([{}]), make_model(("x", F32, [1, 3, 4, 4])))
    assert msg == (
        "calibration_parameters.input_parametres[0].data_list_path: required for static quantization "
        "(a text file with one sample path per line)"
    )


def test_mean_value_count_must_match_channels(tmp_path: Path) -> None:
    lst = write_list(tmp_path / "calib.txt", [write_image(tmp_path / "a.png", solid(4, 4, (0, 0, 0))).name])
    cfg = config([{"mean_value": [1, 2], "std_value": [1, 1], "data_list_path": str(lst)}])
    assert data_error(read_all, cfg, make_model(("x", F32, [1, 3, 4, 4]))) == (
        "calibration_parameters.input_parametres[0].mean_value: has 2 values; input 'x' has 3 channel(s)"
    )


# --------------------------------------------------------------------------- cache


class CountingReader(XSlimDataReader):
    """Counts get_next calls, to prove the cache decodes each batch once."""

    calls = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        self.calls += 1
        return super().get_next()


def test_cache_streams_once_and_cleans_up(tmp_path: Path) -> None:
    cfg = config([{"file_type": "npy", "data_list_path": str(npy_samples(tmp_path, 5))}], calibration_batch_size=2)
    model = make_model(("x", F32, ["N", 2]))
    reader = CountingReader(cfg, model)
    with BatchCache(reader, tmp_path / "work") as cache:
        assert cache.path.parent == tmp_path / "work"
        assert cache.num_batches == 3
        first = next(cache())  # abandoned after one batch: the next pass resumes the reader
        passes = [[b["x"].tolist() for b in cache()] for _ in range(3)]
        assert reader.calls == 4  # 3 batches + the final None, over all passes
        assert first["x"].tolist() == passes[0][0]
        assert passes == [[[[0, 0], [1, 1]], [[2, 2], [3, 3]], [[4, 4]]]] * 3
        assert sorted(p.name for p in cache.path.iterdir()) == ["input0.bin"]
        folder = cache.path
    assert not folder.exists()
    with pytest.raises(RuntimeError, match="closed"):
        cache()


def test_build_batch_source_mixed_dtypes(tmp_path: Path) -> None:
    for i in range(3):
        np.save(tmp_path / f"i{i}.npy", np.arange(4, dtype=np.int64) + i)
    ids = write_list(tmp_path / "ids.txt", [f"i{i}.npy" for i in range(3)])
    model = make_model(("x", F32, ["N", 2]), ("ids", I64, ["N", 4]))
    entries = [{"file_type": "npy", "data_list_path": str(npy_samples(tmp_path, 3))}]
    entries.append({"file_type": "npy", "data_list_path": str(ids)})
    source = build_batch_source(config(entries), model, cache_dir=tmp_path, max_samples=2)
    first, second = list(source()), list(source())
    source.close()
    assert source.num_batches == 2
    assert [b["ids"].dtype for b in second] == [np.int64, np.int64]
    for a, b in zip(first, second, strict=True):
        assert a.keys() == b.keys() == {"x", "ids"}
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    assert second[1]["ids"].tolist() == [[1, 2, 3, 4]]


def test_cache_goes_in_working_dir_by_default(tmp_path: Path) -> None:
    entry = {"file_type": "npy", "data_list_path": str(npy_samples(tmp_path, 1))}
    cfg = load_config(
        {
            "model_parameters": {"working_dir": str(tmp_path / "out")},
            "calibration_parameters": {"input_parametres": [entry]},
        }
    )
    with build_batch_source(cfg, make_model(("x", F32, ["N", 2]))) as source:
        assert source.path.parent == tmp_path / "out"
        assert [b["x"].tolist() for b in source()] == [[[0, 0]]]
    assert list((tmp_path / "out").iterdir()) == []


def test_reader_drives_ort_quantize_static(tmp_path: Path) -> None:
    """ORT-style scripts can hand the reader straight to onnxruntime.quantization."""
    from onnxruntime.quantization import QuantFormat, quantize_static

    weight = helper.make_tensor("w", F32, [2, 2], [1.0, -2.0, 0.5, 3.0])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", F32, ["N", 2])],
        [helper.make_tensor_value_info("y", F32, ["N", 2])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.save(model, tmp_path / "m.onnx")
    reader = XSlimDataReader(config([{"file_type": "npy", "data_list_path": str(npy_samples(tmp_path, 4))}]), model)
    quantize_static(tmp_path / "m.onnx", tmp_path / "q.onnx", reader, quant_format=QuantFormat.QDQ)
    q = onnx.load(tmp_path / "q.onnx")
    scales = {t.name: onnx.numpy_helper.to_array(t) for t in q.graph.initializer}
    x_scale = next(v for k, v in scales.items() if k.startswith("x_scale"))
    assert float(x_scale) == pytest.approx(3 / 255, rel=1e-6)  # calibration saw x in [0, 3]


# --------------------------------------------------------------------------- fingerprint, devices


def test_data_fingerprint_tracks_lists_files_and_settings(tmp_path: Path) -> None:
    lst = npy_samples(tmp_path, 2)
    model = make_model(("x", F32, ["N", 2]))
    base = {"file_type": "npy", "data_list_path": str(lst)}
    fp = data_fingerprint(config([base]), model)
    assert fp == data_fingerprint(config([base]), model)
    assert fp != data_fingerprint(config([{**base, "mean_value": [1.0]}]), model)
    assert fp != data_fingerprint(config([base], calibration_step=7), model)
    np.save(tmp_path / "s1.npy", np.zeros((1, 3), np.float32))  # the file changes size
    fp2 = data_fingerprint(config([base]), model)
    assert fp2 != fp
    write_list(lst, ["s1.npy", "s0.npy"])
    assert data_fingerprint(config([base]), model) not in (fp, fp2)


def test_providers_for(monkeypatch: Any, caplog: Any) -> None:
    readers._warn_no_cuda.cache_clear()

    def no_query() -> list[str]:
        raise AssertionError("cpu must not query providers")

    monkeypatch.setattr(ort, "get_available_providers", no_query)
    assert providers_for("cpu") == ["CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert providers_for("cuda") == providers_for(None) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with caplog.at_level(logging.WARNING, logger="xslim_ort.calibration.readers"):
        assert providers_for(None) == ["CPUExecutionProvider"]
        assert providers_for("cuda") == providers_for("cuda") == ["CPUExecutionProvider"]
    assert [r.getMessage() for r in caplog.records] == [
        "calibration_device is cuda but ONNX Runtime has no CUDAExecutionProvider here; using CPU"
    ]
    with pytest.raises(ConfigError, match="calibration_device: use cuda or cpu, got 'gpu'"):
        providers_for("gpu")
