"""The bad-input catalogue behind tests/test_reliability.py: bad data, awkward models, bad configs.

Each ``Case`` builds its files in a fresh folder and names the exact outcome of running the
CLI on them: a working quantized model (``Works``: the numbers ``check_model`` counts, and
any warning the run must print), or a refusal (``Refused``: the exact last stderr line and
the exit code). ``{tmp}`` in a message stands for the case's folder.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnx
import onnx.defs
from onnx import TensorProto, helper, numpy_helper

# An 8x8 Adobe CMYK JPEG (written by Pillow); OpenCV cannot write CMYK itself.
CMYK_JPEG = base64.b64decode(
    "/9j/7gAOQWRvYmUAZAAAAAAA/9sAQwADAgIDAgIDAwMDBAMDBAUIBQUEBAUKBwcGCAwKDAwLCgsLDQ4SEA0OEQ4LCxAWEBETFBUVFQwP"
    "FxgWFBgSFBUU/8AAFAgACAAIBEMRAE0RAFkRAEsRAP/EAB8AAAEFAQEBAQEBAAAAAAAAAAABAgMEBQYHCAkKC//EALUQAAIBAwMCBAMF"
    "BQQEAAABfQECAwAEEQUSITFBBhNRYQcicRQygZGhCCNCscEVUtHwJDNicoIJChYXGBkaJSYnKCkqNDU2Nzg5OkNERUZHSElKU1RVVldY"
    "WVpjZGVmZ2hpanN0dXZ3eHl6g4SFhoeIiYqSk5SVlpeYmZqio6Slpqeoqaqys7S1tre4ubrCw8TFxsfIycrS09TV1tfY2drh4uPk5ebn"
    "6Onq8fLz9PX29/j5+v/aAA4EQwBNAFkASwAAPwDu/wDgoj/zE/8AgVd3/wAPEf8AqJ/+P13f7RP7RP8Ax9f6V6/xV+jtf//Z"
)

SAMPLES = 4  # calibration samples per case: enough for stable ranges, fast on two shared cores


# --------------------------------------------------------------------------- outcomes


@dataclass(frozen=True)
class Works:
    """The run succeeds; the output passes ``check_model`` with exactly these counts."""

    quantized_weights: int
    activation_quantizers: int
    warning: str | None = None  # a line the run must print on stderr
    kept: tuple[str, ...] = ()  # nodes that must reach the output as they were (left float)
    min_cosine: float = 0.99  # quantized vs float output on the first calibration batch


@dataclass(frozen=True)
class Refused:
    """The run fails with this last stderr line and exit code, and writes nothing."""

    message: str
    code: int = 2


@dataclass(frozen=True)
class Setup:
    """What a case built: the CLI arguments, the config, the float model and the output they name."""

    args: list[str]
    config: Path
    model: Path
    output: Path


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Path], Setup]
    outcome: Works | Refused
    xfail: str | None = None  # a known bug outside this test's reach: the case must fail until fixed


# --------------------------------------------------------------------------- models


def _weight(rng: np.random.Generator, name: str, shape: tuple[int, ...], scale: float = 0.3) -> onnx.TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    inits: list[onnx.TensorProto],
    opset: int = 17,
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "reliability", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _conv_weights(rng: np.random.Generator, channels: int = 3) -> list[onnx.TensorProto]:
    return [
        _weight(rng, "w1", (4, channels, 3, 3)),
        _weight(rng, "b1", (4,), 0.1),
        _weight(rng, "w2", (4, 4, 1, 1)),
        _weight(rng, "b2", (4,), 0.1),
    ]


def conv_model(
    shape: list[int | str] | None = None, channels: int = 3, opset: int = 17, nhwc: bool = False
) -> onnx.ModelProto:
    """input -> [Transpose NHWC->NCHW] -> Conv -> Relu -> Conv -> output (4 channels, same H, W)."""
    rng = np.random.default_rng(0)
    if shape is None:
        shape = [1, 16, 16, channels] if nhwc else [1, channels, 16, 16]
    nodes = []
    x = "input"
    if nhwc:
        nodes.append(helper.make_node("Transpose", ["input"], ["nchw"], name="to_nchw", perm=[0, 3, 1, 2]))
        x = "nchw"
    nodes += [
        helper.make_node("Conv", [x, "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["output"], name="conv2"),
    ]
    h, w = (shape[1], shape[2]) if nhwc else (shape[2], shape[3])
    return _model(
        nodes,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [shape[0], 4, h, w])],
        _conv_weights(rng, channels),
        opset,
    )


def opset9_model() -> onnx.ModelProto:
    """Opset 9 spellings: Clip and Upsample with attributes/scales, Flatten, Gemm."""
    rng = np.random.default_rng(1)
    inits = [
        *_conv_weights(rng)[:2],
        numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
        _weight(rng, "wfc", (10, 4 * 16 * 16), 0.05),
        _weight(rng, "bfc", (10,), 0.1),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["c1"], ["r1"], name="clip1", min=0.0, max=6.0),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Upsample", ["p1", "scales"], ["u1"], name="up1", mode="nearest"),
        helper.make_node("Flatten", ["u1"], ["f1"], name="flatten"),
        helper.make_node("Gemm", ["f1", "wfc", "bfc"], ["output"], name="fc", transB=1),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 10])],
        inits,
        opset=9,
    )


def custom_op_model(domain: str, op_type: str) -> onnx.ModelProto:
    """Conv -> <domain>.<op_type> -> Conv: the custom op's output shape is unknown to ONNX."""
    m = conv_model()
    relu = next(n for n in m.graph.node if n.op_type == "Relu")
    relu.op_type, relu.domain, relu.name = op_type, domain, "custom"
    m.opset_import.append(helper.make_opsetid(domain, 1))
    return m


def bad_weight_model(value: float) -> onnx.ModelProto:
    """The conv model with one value of conv1's weight replaced (NaN, Inf)."""
    m = conv_model()
    w = next(i for i in m.graph.initializer if i.name == "w1")
    arr = numpy_helper.to_array(w).copy()
    arr[2, 1, 0, 0] = value
    w.CopyFrom(numpy_helper.from_array(arr, "w1"))
    return m


def if_model() -> onnx.ModelProto:
    """Conv -> If(sum > 0) {Conv a} else {Conv b} -> output; the branches read outer-scope weights."""
    rng = np.random.default_rng(2)
    inits = [*_conv_weights(rng), _weight(rng, "w3", (4, 4, 1, 1)), numpy_helper.from_array(np.float32(0.0), "zero")]

    def branch(name: str, weight: str) -> onnx.GraphProto:
        conv = helper.make_node("Conv", ["r1", weight], [f"{name}_out"], name=f"{name}_conv")
        return helper.make_graph(
            [conv], name, [], [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None)]
        )

    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("ReduceSum", ["input"], ["total"], name="total", keepdims=0),
        helper.make_node("Greater", ["total", "zero"], ["cond"], name="positive"),
        helper.make_node(
            "If",
            ["cond"],
            ["output"],
            name="branch",
            then_branch=branch("then", "w2"),
            else_branch=branch("else", "w3"),
        ),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4, 16, 16])],
        inits,
    )


def loop_model() -> onnx.ModelProto:
    """Conv -> Relu -> Loop x2 {Conv 1x1 -> Relu} -> output."""
    rng = np.random.default_rng(3)
    inits = [
        *_conv_weights(rng),
        numpy_helper.from_array(np.int64(2), "trips"),
        numpy_helper.from_array(np.bool_(True), "go"),
    ]
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going"),
            helper.make_node("Conv", ["v_in", "w2", "b2"], ["v_conv"], name="body_conv"),
            helper.make_node("Relu", ["v_conv"], ["v_out"], name="body_relu"),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [1, 4, 16, 16]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1, 4, 16, 16]),
        ],
    )
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Loop", ["trips", "go", "r1"], ["output"], name="loop", body=body),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4, 16, 16])],
        inits,
    )


def zero_size_model() -> onnx.ModelProto:
    """Conv -> Relu -> Concat(Relu, Slice(Relu)[:, 0:0]) -> Conv: one branch holds no values at all."""
    m = conv_model()
    extra = [
        numpy_helper.from_array(np.array([0], np.int64), "s_start"),
        numpy_helper.from_array(np.array([0], np.int64), "s_end"),
        numpy_helper.from_array(np.array([1], np.int64), "s_axis"),
    ]
    m.graph.initializer.extend(extra)
    conv2 = next(n for n in m.graph.node if n.name == "conv2")
    conv2.input[0] = "joined"
    at = list(m.graph.node).index(conv2)
    m.graph.node.insert(at, helper.make_node("Concat", ["r1", "empty"], ["joined"], name="join", axis=1))
    m.graph.node.insert(at, helper.make_node("Slice", ["r1", "s_start", "s_end", "s_axis"], ["empty"], name="nothing"))
    return m


def constant_node_model() -> onnx.ModelProto:
    """The conv model with every weight and bias in a Constant node instead of an initializer."""
    m = conv_model()
    constants = [
        helper.make_node("Constant", [], [t.name], name=f"const_{t.name}", value=t) for t in m.graph.initializer
    ]
    del m.graph.initializer[:]
    nodes = constants + list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


def qdq_model() -> onnx.ModelProto:
    """An already quantized model: input -> QuantizeLinear -> DequantizeLinear -> Conv ..."""
    m = conv_model()
    m.graph.initializer.extend(
        [numpy_helper.from_array(np.float32(0.02), "in_scale"), numpy_helper.from_array(np.int8(0), "in_zp")]
    )
    conv1 = next(n for n in m.graph.node if n.name == "conv1")
    conv1.input[0] = "input_dq"
    qdq = [
        helper.make_node("QuantizeLinear", ["input", "in_scale", "in_zp"], ["input_q"], name="input_QuantizeLinear"),
        helper.make_node(
            "DequantizeLinear", ["input_q", "in_scale", "in_zp"], ["input_dq"], name="input_DequantizeLinear"
        ),
    ]
    nodes = qdq + list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


def float_only_model() -> onnx.ModelProto:
    """input -> Exp -> Softmax -> output: nothing the spacemit target runs in int8."""
    nodes = [
        helper.make_node("Exp", ["input"], ["e"], name="exp"),
        helper.make_node("Softmax", ["e"], ["output"], name="softmax", axis=1),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, 16, 16])],
        [],
    )


# --------------------------------------------------------------------------- data files


def picture(seed: int, height: int = 20, width: int = 24, channels: int = 3, dtype: type = np.uint8) -> np.ndarray:
    """A smooth gradient with noise, (H, W, C) or (H, W) for one channel."""
    rng = np.random.default_rng(seed)
    top = np.iinfo(dtype).max
    ramp = np.linspace(0.0, 1.0, width)[None, :, None] * np.linspace(0.3, 1.0, height)[:, None, None]
    noisy = np.clip(ramp + rng.uniform(-0.2, 0.2, (height, width, channels)), 0.0, 1.0)
    img = (noisy * top).astype(dtype)
    return img[:, :, 0] if channels == 1 else img


def png(img: np.ndarray) -> bytes:
    return cv2.imencode(".png", img)[1].tobytes()


def jpeg(img: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", img)[1].tobytes()


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def sample(seed: int, shape: tuple[int, ...] = (3, 16, 16)) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def good_images(n: int = SAMPLES, ext: str = "png") -> list[tuple[str, bytes]]:
    encode = png if ext == "png" else jpeg
    return [(f"img{i}.{ext}", encode(picture(i))) for i in range(n)]


def good_npy(n: int = SAMPLES, shape: tuple[int, ...] = (3, 16, 16)) -> list[tuple[str, bytes]]:
    return [(f"s{i}.npy", npy(sample(i, shape))) for i in range(n)]


def with_bad(good: list[tuple[str, bytes]], bad: tuple[str, bytes]) -> list[tuple[str, bytes]]:
    """The bad file on line 2 of the list, so messages must get line numbers right."""
    return [good[0], bad, *good[2:]]


def listing(names: list[str], newline: str = "\n", bom: bool = False, trailing: str = "") -> bytes:
    text = newline.join(name + trailing for name in names) + newline
    return (b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8")


IMG_ENTRY: dict[str, Any] = {"file_type": "img", "mean_value": [127.5], "std_value": [63.75]}
NPY_ENTRY: dict[str, Any] = {"file_type": "npy"}


def project(
    files: list[tuple[str, bytes]],
    entry: dict[str, Any],
    *,
    model: Callable[[], onnx.ModelProto] = conv_model,
    list_bytes: Callable[[list[str]], bytes] = listing,
    data_dir: str = "data",
    cp: dict[str, Any] | None = None,
    qp: dict[str, Any] | None = None,
    mp: dict[str, Any] | None = None,
    save: Callable[[onnx.ModelProto, Path], None] = onnx.save,
    extra: tuple[tuple[str, str], ...] = (),
) -> Callable[[Path], Setup]:
    """A case's builder: the model, its calibration files and list, ``extra`` files beside the
    config (user preprocess code), and a config naming them; the output is ``out.onnx``."""

    def build(tmp: Path) -> Setup:
        model_path = tmp / "model.onnx"
        save(model(), model_path)
        folder = tmp / data_dir
        folder.mkdir(parents=True, exist_ok=True)
        for name, blob in files:
            (folder / name).write_bytes(blob)
        lst = folder / "list.txt"
        lst.write_bytes(list_bytes([name for name, _ in files]))
        for name, text in extra:
            (tmp / name).write_text(text, encoding="utf-8")
        cfg = {
            "model_parameters": {"onnx_model": str(model_path), **(mp or {})},
            "calibration_parameters": {
                "calibration_type": "minmax",
                "input_parametres": [{**entry, "data_list_path": str(lst)}],
                **(cp or {}),
            },
            "quantization_parameters": {"analysis_enable": False, "finetune_level": 0, **(qp or {})},
        }
        cfg_path = tmp / "cfg.json"
        cfg_path.write_text(json.dumps(cfg, ensure_ascii=False, indent=2), encoding="utf-8")
        out = tmp / "out.onnx"
        return Setup(["quantize", str(cfg_path), "-o", str(out)], cfg_path, model_path, out)

    return build


def save_external(model: onnx.ModelProto, path: Path) -> None:
    onnx.save(model, str(path), save_as_external_data=True, location="model.weights", size_threshold=0)


def save_bytes(blob: bytes) -> Callable[[onnx.ModelProto, Path], None]:
    """Write ``blob`` as the model file instead of the model (corrupt and empty model files)."""
    return lambda _model, path: path.write_bytes(blob)


def config_bytes(transform: Callable[[bytes], bytes]) -> Callable[[Path], Setup]:
    """A working project whose config file is then rewritten by ``transform``."""
    base = project(good_npy(), NPY_ENTRY)

    def build(tmp: Path) -> Setup:
        setup = base(tmp)
        setup.config.write_bytes(transform(setup.config.read_bytes()))
        return setup

    return build


def _random_bytes(n: int, seed: int = 7) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _nonfinite(value: float) -> np.ndarray:
    arr = sample(1)
    arr[1, 5, 7] = value
    return arr


def _raw_files() -> list[tuple[str, bytes]]:
    return [(f"r{i}.bin", sample(i).tobytes()) for i in range(SAMPLES)]


def _npz() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, x=sample(1))
    return buf.getvalue()


def _comment(cfg: bytes) -> bytes:
    return b"// calibration config\n" + cfg


def _trailing_comma(cfg: bytes) -> bytes:
    return cfg[: cfg.rindex(b"}")].rstrip() + b",\n}\n"


def _latin1(cfg: bytes) -> bytes:
    return '{"comment": "café",'.encode("latin-1") + cfg[1:]  # é is byte 16


def _utf16(cfg: bytes) -> bytes:
    return cfg.decode("utf-8").encode("utf-16")


def _preprocess(body: str) -> tuple[tuple[str, str], ...]:
    """A user preprocess module ``pre.py`` beside the config, defining ``load`` with ``body``."""
    return (("pre.py", f"import numpy as np\n\n\ndef load(paths, entry):\n{body}\n"),)


STACK = "    return np.stack([np.load(p) for p in paths])"
USER = {**NPY_ENTRY, "preprocess_file": "pre.py:load"}
DATA = "{tmp}/data"

CASES: list[Case] = [
    # ---- images
    Case("img_png_and_jpeg", project(good_images(2) + good_images(2, "jpg"), IMG_ENTRY), Works(2, 3)),
    Case(
        "img_corrupt",
        project(with_bad(good_images(), ("bad.jpg", _random_bytes(600))), IMG_ENTRY),
        Refused(f"error: {DATA}/list.txt:2: cannot decode image {DATA}/bad.jpg"),
    ),
    Case(
        "img_truncated_png",
        project(with_bad(good_images(), ("cut.png", png(picture(9))[:200])), IMG_ENTRY),
        Refused(f"error: {DATA}/list.txt:2: cannot decode image {DATA}/cut.png"),
    ),
    Case(
        "img_truncated_jpeg",
        project(with_bad(good_images(), ("cut.jpg", jpeg(picture(9, 64, 64))[:-200])), IMG_ENTRY),
        Refused(f"error: {DATA}/list.txt:2: cannot decode image {DATA}/cut.jpg"),
    ),
    Case(
        "img_zero_bytes",
        project(with_bad(good_images(), ("empty.png", b"")), IMG_ENTRY),
        Refused(f"error: {DATA}/list.txt:2: cannot decode image {DATA}/empty.png"),
    ),
    Case(
        "img_grayscale_png_for_color_model",
        project([(f"g{i}.png", png(picture(i, channels=1))) for i in range(SAMPLES)], IMG_ENTRY),
        Works(2, 3),
    ),
    Case(
        "img_16bit_png",
        project([(f"d{i}.png", png(picture(i, dtype=np.uint16))) for i in range(SAMPLES)], IMG_ENTRY),
        Works(2, 3),
    ),
    Case(
        "img_16bit_grayscale_png",
        project([(f"d{i}.png", png(picture(i, channels=1, dtype=np.uint16))) for i in range(SAMPLES)], IMG_ENTRY),
        Works(2, 3),
    ),
    Case(
        "img_rgba_png",
        project([(f"a{i}.png", png(picture(i, channels=4))) for i in range(SAMPLES)], IMG_ENTRY),
        Works(2, 3),
    ),
    Case("img_cmyk_jpeg", project(with_bad(good_images(), ("cmyk.jpg", CMYK_JPEG)), IMG_ENTRY), Works(2, 3)),
    Case(
        "img_one_pixel",
        project([(f"p{i}.png", png(picture(i, 1, 1))) for i in range(SAMPLES)], IMG_ENTRY),
        Works(2, 3),
    ),
    Case(
        "img_color_for_grayscale_model",
        project(good_images(), IMG_ENTRY, model=lambda: conv_model(channels=1)),
        Works(2, 3),
    ),
    Case("img_nhwc_model", project(good_images(), IMG_ENTRY, model=lambda: conv_model(nhwc=True)), Works(2, 3)),
    Case(
        "img_four_channel_model",
        project(good_images(), IMG_ENTRY, model=lambda: conv_model(channels=4)),
        Refused(
            "error: calibration_parameters.input_parametres[0] (input 'input'): images give 1 or 3 channels, "
            "the input has 4 (shape [1, 4, 16, 16], NCHW)"
        ),
    ),
    # ---- npy
    Case(
        "npy_float64",
        project([(f"s{i}.npy", npy(sample(i).astype(np.float64))) for i in range(SAMPLES)], NPY_ENTRY),
        Works(2, 3),
    ),
    Case("npy_with_batch_axis", project(good_npy(shape=(1, 3, 16, 16)), NPY_ENTRY), Works(2, 3)),
    Case(
        "npy_complex",
        project(with_bad(good_npy(), ("c.npy", npy(sample(1).astype(np.complex64)))), NPY_ENTRY),
        Refused(f"error: {DATA}/list.txt:2: {DATA}/c.npy holds complex64 data but input 'input' takes float32"),
    ),
    Case(
        "npy_strings",
        project(with_bad(good_npy(), ("t.npy", npy(np.full((3, 16, 16), "x")))), NPY_ENTRY),
        Refused(f"error: {DATA}/list.txt:2: {DATA}/t.npy holds <U1 data but input 'input' takes float32"),
    ),
    Case(
        "npy_pickled_objects",
        project(with_bad(good_npy(), ("o.npy", npy(np.array([{"a": 1}], dtype=object)))), NPY_ENTRY),
        Refused(
            f"error: {DATA}/list.txt:2: cannot read .npy file {DATA}/o.npy: "
            "Object arrays cannot be loaded when allow_pickle=False"
        ),
    ),
    Case(
        "npy_wrong_shape",
        project(with_bad(good_npy(), ("hwc.npy", npy(sample(1, (16, 16, 3))))), NPY_ENTRY),
        Refused(
            f"error: {DATA}/list.txt:2: {DATA}/hwc.npy has shape [16, 16, 3]; input 'input' needs "
            "[3, 16, 16] per sample (or [1, 3, 16, 16])"
        ),
    ),
    Case(
        "npy_npz_archive",
        project(with_bad(good_npy(), ("z.npy", _npz())), NPY_ENTRY),
        Refused(f"error: {DATA}/list.txt:2: {DATA}/z.npy is an .npz archive, not an .npy array"),
    ),
    Case(
        "npy_truncated",
        project(with_bad(good_npy(), ("cut.npy", npy(sample(1))[:400])), NPY_ENTRY),
        Refused(
            f"error: {DATA}/list.txt:2: cannot read .npy file {DATA}/cut.npy: Failed to read all data for array. "
            "Expected (3, 16, 16) = 768 elements, could only read 68 elements. (file seems not fully written?)"
        ),
    ),
    Case(
        "npy_zero_bytes",
        project(with_bad(good_npy(), ("empty.npy", b"")), NPY_ENTRY),
        Refused(f"error: {DATA}/list.txt:2: {DATA}/empty.npy is not an .npy file (it is empty)"),
    ),
    Case(
        "npy_text_file",
        project(with_bad(good_npy(), ("text.npy", b"1 2 3\n")), NPY_ENTRY),
        Refused(
            f"error: {DATA}/list.txt:2: {DATA}/text.npy is not an .npy file (it does not start with the NumPy header)"
        ),
    ),
    Case(
        "npy_nan",
        project(with_bad(good_npy(), ("nan.npy", npy(_nonfinite(np.nan)))), NPY_ENTRY),
        Refused(f"error: {DATA}/list.txt:2: NaN or Inf in {DATA}/nan.npy"),
    ),
    Case(
        "npy_inf",
        project(with_bad(good_npy(), ("inf.npy", npy(_nonfinite(-np.inf)))), NPY_ENTRY),
        Refused(f"error: {DATA}/list.txt:2: NaN or Inf in {DATA}/inf.npy"),
    ),
    # ---- raw
    Case("raw_float32", project(_raw_files(), {"file_type": "raw"}), Works(2, 3)),
    Case(
        "raw_uint8_for_float_model",
        project(
            [(f"r{i}.bin", picture(i, 16, 16).transpose(2, 0, 1).tobytes()) for i in range(SAMPLES)],
            {"file_type": "raw", "dtype": "uint8"},
        ),
        Works(2, 3),
    ),
    Case(
        "raw_wrong_size",
        project(with_bad(_raw_files(), ("short.bin", sample(1).tobytes()[:-4])), {"file_type": "raw"}),
        Refused(f"error: {DATA}/list.txt:2: {DATA}/short.bin has 3068 bytes; expected 3072 (float32 [3, 16, 16])"),
    ),
    Case(
        "raw_nan",
        project(with_bad(_raw_files(), ("nan.bin", _nonfinite(np.inf).tobytes())), {"file_type": "raw"}),
        Refused(f"error: {DATA}/list.txt:2: NaN or Inf in {DATA}/nan.bin"),
    ),
    # ---- list files
    Case("list_crlf", project(good_npy(), NPY_ENTRY, list_bytes=lambda n: listing(n, "\r\n")), Works(2, 3)),
    Case("list_bom", project(good_npy(), NPY_ENTRY, list_bytes=lambda n: listing(n, bom=True)), Works(2, 3)),
    Case(
        "list_trailing_spaces",
        project(good_npy(), NPY_ENTRY, list_bytes=lambda n: listing(n, trailing=" \t ")),
        Works(2, 3),
    ),
    Case(
        "list_crlf_bom_blank_lines",
        project(good_npy(), NPY_ENTRY, list_bytes=lambda n: listing(["", *n, "  "], "\r\n", bom=True, trailing=" ")),
        Works(2, 3),
    ),
    Case(
        "list_empty",
        project(good_npy(), NPY_ENTRY, list_bytes=lambda n: b""),
        Refused(f"error: {DATA}/list.txt: no samples (the list file is empty or has only blank lines)"),
    ),
    Case(
        "list_only_blank_lines",
        project(good_npy(), NPY_ENTRY, list_bytes=lambda n: b"\xef\xbb\xbf\r\n  \r\n\t\r\n"),
        Refused(f"error: {DATA}/list.txt: no samples (the list file is empty or has only blank lines)"),
    ),
    Case(
        "list_latin1",
        project(good_npy(), NPY_ENTRY, list_bytes=lambda n: "s0.npy\ncafé.npy\n".encode("latin-1")),
        Refused(f"error: {DATA}/list.txt: the list file is not UTF-8 text (byte 10)"),
    ),
    Case(
        "list_utf16",
        project(good_npy(), NPY_ENTRY, list_bytes=lambda n: "\n".join(n).encode("utf-16")),
        Refused(f"error: {DATA}/list.txt: the list file is not UTF-8 text (byte 0)"),
    ),
    # ---- paths
    Case(
        "path_spaces",
        project([(f"sample {i}.npy", npy(sample(i))) for i in range(SAMPLES)], NPY_ENTRY, data_dir="my data"),
        Works(2, 3),
    ),
    Case(
        "path_non_ascii_npy",
        project([(f"échantillon_{i}.npy", npy(sample(i))) for i in range(SAMPLES)], NPY_ENTRY, data_dir="données"),
        Works(2, 3),
    ),
    Case(
        "path_non_ascii_images",
        project([(f"画像 {i}.png", png(picture(i))) for i in range(SAMPLES)], IMG_ENTRY, data_dir="校准 数据"),
        Works(2, 3),
    ),
    # ---- user preprocess code
    Case("user_preprocess", project(good_npy(), USER, extra=_preprocess(STACK)), Works(2, 3)),
    Case(
        "user_preprocess_raises_multiline",
        project(good_npy(), USER, extra=_preprocess('    raise ValueError("unreadable sample\\nsee the log")')),
        Refused(f"error: {DATA}/list.txt:1-1: pre.py:load failed: ValueError: unreadable sample / see the log"),
    ),
    Case(
        "user_preprocess_wrong_shape",
        project(good_npy(), USER, extra=_preprocess("    return np.zeros((len(paths), 16, 16, 3), np.float32)")),
        Refused("error: pre.py:load returned shape [1, 16, 16, 3] for input 'input'; expected [1, 3, 16, 16]"),
    ),
    Case(
        "user_preprocess_returns_list",
        project(good_npy(), USER, extra=_preprocess("    return [np.load(p) for p in paths]")),
        Refused("error: pre.py:load returned list; expected a NumPy array or a torch tensor"),
    ),
    Case(
        "user_preprocess_nan",
        project(good_npy(), USER, extra=_preprocess("    return np.full((len(paths), 3, 16, 16), np.nan, np.float32)")),
        Refused(f"error: {DATA}/list.txt:1: NaN or Inf in what pre.py:load returned for {DATA}/s0.npy"),
    ),
    Case(
        "user_preprocess_syntax_error",
        project(good_npy(), USER, extra=(("pre.py", "def load(paths, entry)\n    return paths\n"),)),
        Refused("error: pre.py:load: importing {tmp}/pre.py failed: SyntaxError: expected ':' (pre.py, line 1)"),
    ),
    Case(
        "user_preprocess_missing_function",
        project(good_npy(), {**USER, "preprocess_file": "pre.py:prepare"}, extra=_preprocess(STACK)),
        Refused("error: pre.py:prepare: {tmp}/pre.py has no function 'prepare'"),
    ),
    # ---- models
    Case("model_opset9", project(good_npy(), NPY_ENTRY, model=opset9_model), Works(2, 6)),
    Case("model_opset11", project(good_npy(), NPY_ENTRY, model=lambda: conv_model(opset=11)), Works(2, 3)),
    Case(
        "model_opset_beyond_onnx",
        project(good_npy(), NPY_ENTRY, mp={"opset": 99}),
        Refused(
            f"error: cannot upgrade the model to opset 99: onnx {onnx.__version__} knows opsets up to "
            f"{onnx.defs.onnx_opset_version()}"
        ),
    ),
    Case(
        "model_nhwc_npy",
        project(good_npy(shape=(16, 16, 3)), NPY_ENTRY, model=lambda: conv_model(nhwc=True)),
        Works(2, 3),
    ),
    Case(
        "model_dynamic_dims_without_input_shape",
        project(good_npy(), NPY_ENTRY, model=lambda: conv_model(["N", "C", "H", "W"])),
        Refused(
            "error: calibration_parameters.input_parametres[0] (input 'input'): dimension 1 ('C') of shape "
            "['N', 'C', 'H', 'W'] is symbolic; set input_shape in this entry"
        ),
    ),
    Case(
        "model_dynamic_dims",
        project(
            good_npy(), {**NPY_ENTRY, "input_shape": [1, 3, 16, 16]}, model=lambda: conv_model(["N", "C", "H", "W"])
        ),
        Works(2, 3),
    ),
    Case(
        "model_dynamic_batch_of_two",
        project(good_npy(), NPY_ENTRY, model=lambda: conv_model(["N", 3, 16, 16]), cp={"calibration_batch_size": 2}),
        Works(2, 3),
    ),
    Case(
        "model_custom_op_with_kernel",
        project(good_npy(), NPY_ENTRY, model=lambda: custom_op_model("com.microsoft", "Gelu")),
        Works(2, 3, kept=("custom",)),
    ),
    Case(
        "model_custom_op_without_kernel",
        project(good_npy(), NPY_ENTRY, model=lambda: custom_op_model("com.example", "Frobnicate")),
        Refused(
            "error: {tmp}/model.onnx: node 'custom' is a com.example.Frobnicate op, which ONNX Runtime has no kernel "
            "for; static quantization has to run the model to calibrate it (--dynq and --fp16 do not)"
        ),
    ),
    Case("model_if_subgraphs", project(good_npy(), NPY_ENTRY, model=if_model), Works(1, 2, kept=("branch",))),
    Case("model_loop_subgraph", project(good_npy(), NPY_ENTRY, model=loop_model), Works(1, 2, kept=("loop",))),
    Case(
        "model_zero_size_tensor",
        project(good_npy(), NPY_ENTRY, model=zero_size_model),
        Works(2, 5, kept=("nothing", "join")),
    ),
    Case("model_constant_node_weights", project(good_npy(), NPY_ENTRY, model=constant_node_model), Works(2, 3)),
    Case(
        "model_constant_node_weights_without_onnxsim",
        project(good_npy(), NPY_ENTRY, model=constant_node_model, mp={"skip_onnxsim": True}),
        Works(2, 3),
    ),
    Case(
        "model_nan_weight",
        project(good_npy(), NPY_ENTRY, model=lambda: bad_weight_model(np.nan)),
        Refused(
            "error: {tmp}/model.onnx: weight 'w1' of Conv 'conv1' holds NaN or Inf; int8 cannot represent it, "
            "fix the float model"
        ),
    ),
    Case(
        "model_inf_weight",
        project(good_npy(), NPY_ENTRY, model=lambda: bad_weight_model(-np.inf)),
        Refused(
            "error: {tmp}/model.onnx: weight 'w1' of Conv 'conv1' holds NaN or Inf; int8 cannot represent it, "
            "fix the float model"
        ),
    ),
    Case("model_external_data", project(good_npy(), NPY_ENTRY, save=save_external), Works(2, 3)),
    Case(
        "model_already_quantized",
        project(good_npy(), NPY_ENTRY, model=qdq_model),
        Refused(
            "error: {tmp}/model.onnx: the model is already quantized (it has a QuantizeLinear node "
            "'input_QuantizeLinear'); give the float model"
        ),
    ),
    Case(
        "model_no_quantizable_op",
        project(good_npy(), NPY_ENTRY, model=float_only_model),
        Works(
            0,
            0,
            warning="the model has no op the 'spacemit' target quantizes; it is written unquantized",
            kept=("exp", "softmax"),
        ),
    ),
    Case(
        "model_corrupt_file",
        project(good_npy(), NPY_ENTRY, save=save_bytes(_random_bytes(300))),
        Refused(
            "error: {tmp}/model.onnx: not a readable ONNX model (DecodeError: Error parsing message with type "
            "'onnx.ModelProto': Wire format was corrupt)"
        ),
    ),
    Case(
        "model_empty_file",
        project(good_npy(), NPY_ENTRY, save=save_bytes(b"")),
        Refused("error: {tmp}/model.onnx: not an ONNX model (the file is empty)"),
    ),
    # ---- config files
    Case("config_bom", config_bytes(lambda b: b"\xef\xbb\xbf" + b), Works(2, 3)),
    Case("config_crlf", config_bytes(lambda b: b.replace(b"\n", b"\r\n")), Works(2, 3)),
    Case("config_comment", config_bytes(_comment), Refused("error: {tmp}/cfg.json:1:1: invalid JSON: Expecting value")),
    Case(
        "config_trailing_comma",
        config_bytes(_trailing_comma),
        Refused("error: {tmp}/cfg.json:18:1: invalid JSON: Expecting property name enclosed in double quotes"),
    ),
    Case("config_latin1", config_bytes(_latin1), Refused("error: {tmp}/cfg.json: not UTF-8 text (byte 16)")),
    Case("config_utf16", config_bytes(_utf16), Refused("error: {tmp}/cfg.json: not UTF-8 text (byte 0)")),
]


def write_big_model(path: Path, inputs: int = 16384, hidden: int = 16384, outputs: int = 16400) -> None:
    """input[1, inputs] -> MatMul -> Relu -> MatMul -> output, its float weights (just over protobuf's
    2 GB limit) in ``<path>.data``, written one at a time so that memory never holds more than one."""
    data = path.with_name(path.name + ".data")
    inits = []
    offset = 0
    for seed, (name, shape) in enumerate((("w1", (inputs, hidden)), ("w2", (hidden, outputs)))):
        bound = np.float32(np.sqrt(3.0 / shape[0]))  # keeps activations near unit variance
        w = np.random.default_rng(seed).random(shape, dtype=np.float32)
        w *= 2 * bound
        w -= bound
        with open(data, "ab") as fh:
            w.tofile(fh)
        tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=shape, data_location=TensorProto.EXTERNAL)
        for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(w.nbytes))):
            tensor.external_data.add(key=key, value=value)
        inits.append(tensor)
        offset += w.nbytes
    nodes = [
        helper.make_node("MatMul", ["input", "w1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["output"], name="fc2"),
    ]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, inputs])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, outputs])],
        inits,
    )
    onnx.save(model, str(path))


HOSTILE_NAMES = {  # tensor and node names an attacker (or an odd exporter) might choose
    "input": "../../input",
    "c1": "../c1",
    "r1": "<script>alert(1)</script>",
    "output": '"><img src=x onerror=alert(2)>',
    "conv1": "/../conv1\\..\\x",
    "relu1": "<b>relu</b>",
}


def hostile_model() -> onnx.ModelProto:
    """The conv model with tensor and node names made of path and HTML syntax."""
    m = conv_model()
    for node in m.graph.node:
        node.name = HOSTILE_NAMES.get(node.name, node.name)
        node.input[:] = [HOSTILE_NAMES.get(i, i) for i in node.input]
        node.output[:] = [HOSTILE_NAMES.get(o, o) for o in node.output]
    for value in (*m.graph.input, *m.graph.output):
        value.name = HOSTILE_NAMES[value.name]
    return m
