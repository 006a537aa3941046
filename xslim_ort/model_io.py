"""Loading, preparing and saving models.

Preparation makes every later stage simpler: shapes pinned to the calibration shapes,
opset high enough for per-channel Q/DQ, onnxsim's folding, and inferred value types (ORT's
quantizer needs them to tell float tensors from the rest). Saving is atomic: a reader of
the output path sees the old file or the complete new one, never half of one.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import onnx
from google.protobuf.message import EncodeError
from onnx import shape_inference, version_converter

from .errors import ModelError, QuantizationError

log = logging.getLogger("xslim_ort")

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul")
_PROTOBUF_LIMIT = 2**31 - 1


def load_model(model: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """Load a model from a path (external data included) or copy a ModelProto."""
    if isinstance(model, onnx.ModelProto):
        out = onnx.ModelProto()
        out.CopyFrom(model)
        return out
    path = Path(model)
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=True)
    except Exception as exc:  # onnx raises DecodeError, OSError, ValidationError...
        raise ModelError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    if not proto.HasField("graph"):  # protobuf reads an empty file (and some others) as an empty message
        what = "the file is empty" if path.stat().st_size == 0 else "it holds no graph"
        raise ModelError(f"{path}: not an ONNX model ({what})")
    return proto


def main_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 0


def refuse_quantized(model: onnx.ModelProto, where: str) -> None:
    """A model that already holds Q/DQ nodes would be quantized twice."""
    for node in _all_nodes(model.graph):
        if node.op_type in QDQ_OPS:
            raise ModelError(
                f"{where}: the model is already quantized (it has a {node.op_type} node '{node.name}'); "
                "give the float model"
            )


def refuse_unrunnable(model: onnx.ModelProto, where: str) -> None:
    """Calibration runs the model in ONNX Runtime: a custom-domain op it has no kernel for stops it."""
    from onnxruntime.capi.onnxruntime_pybind11_state import get_all_opkernel_def

    known = {(k.domain, k.op_name) for k in get_all_opkernel_def()}
    known |= {(f.domain, f.name) for f in model.functions}
    for node in _all_nodes(model.graph):
        if node.domain not in ("", "ai.onnx") and (node.domain, node.op_type) not in known:
            raise ModelError(
                f"{where}: node '{node.name}' is a {node.domain}.{node.op_type} op, which ONNX Runtime has no "
                "kernel for; static quantization has to run the model to calibrate it (--dynq and --fp16 do not)"
            )


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_nodes(g)


def has_quantizable_graph(model: onnx.ModelProto) -> bool:
    return len(model.graph.node) > 0


def constants_to_initializers(model: onnx.ModelProto) -> None:
    """Move the main graph's tensor Constant nodes into initializers, in place.

    Quantizers look for weights among the initializers; exporters that keep weights in
    Constant nodes would otherwise leave them float (or make ORT's quantizer fail).
    """
    outputs = {o.name for o in model.graph.output}
    kept = []
    for node in model.graph.node:
        attrs = list(node.attribute)
        if (
            node.op_type == "Constant"
            and node.domain in ("", "ai.onnx")
            and len(attrs) == 1
            and attrs[0].name == "value"
            and node.output[0] not in outputs
        ):
            tensor = model.graph.initializer.add()
            tensor.CopyFrom(attrs[0].t)
            tensor.name = node.output[0]
        else:
            kept.append(node)
    if len(kept) < len(model.graph.node):
        del model.graph.node[:]
        model.graph.node.extend(kept)


def pin_input_shapes(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]) -> None:
    """Replace the (possibly symbolic) input dims by the calibration shapes, in place."""
    for inp in model.graph.input:
        if inp.name not in shapes:
            continue
        dims = inp.type.tensor_type.shape.dim
        want = list(shapes[inp.name])
        if len(dims) != len(want):
            raise ModelError(f"input '{inp.name}': the model has rank {len(dims)} but the config gives shape {want}")
        for dim, value in zip(dims, want, strict=True):
            if dim.HasField("dim_value") and dim.dim_value != value:
                raise ModelError(
                    f"input '{inp.name}': the model's shape is {[d.dim_value or d.dim_param for d in dims]} "
                    f"but the config gives {want}"
                )
            dim.Clear()
            dim.dim_value = int(value)
    # Pinned inputs make old value_info stale.
    del model.graph.value_info[:]


def upgrade_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """Convert the default-domain opset up to ``opset`` (never down)."""
    current = main_opset(model)
    if current >= opset:
        return model
    newest = onnx.defs.onnx_opset_version()
    if opset > newest:
        raise ModelError(
            f"cannot upgrade the model to opset {opset}: onnx {onnx.__version__} knows opsets up to {newest}"
        )
    try:
        converted = version_converter.convert_version(model, opset)
    except Exception as exc:
        raise ModelError(f"cannot upgrade the model from opset {current} to {opset}: {exc}") from None
    log.info("upgraded opset %d -> %d", current, opset)
    return converted


def simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxsim's constant folding and cleanup; on failure the model is kept as it was."""
    if needs_external_data(model):
        log.warning("model is over 2 GB: onnxsim skipped")
        return model
    import onnxsim

    try:
        simplified, ok = onnxsim.simplify(model, check_n=0)
    except Exception as exc:  # onnxsim raises plain RuntimeErrors for graphs it cannot handle
        log.warning("onnxsim could not simplify the model (%s); continuing without it", str(exc).splitlines()[0])
        return model
    if not ok:
        log.warning("onnxsim's check failed; continuing with the unsimplified model")
        return model
    return simplified


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX shape inference (through a file for models over 2 GB)."""
    if not needs_external_data(model):
        try:
            return shape_inference.infer_shapes(model)
        except Exception as exc:
            log.warning("shape inference failed (%s); types of some tensors stay unknown", exc)
            return model
    with tempfile.TemporaryDirectory(prefix="xslim_ort_") as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        onnx.save(model, str(src), save_as_external_data=True, location="in.onnx.data")
        shape_inference.infer_shapes_path(str(src), str(dst))
        return onnx.load(str(dst), load_external_data=True)


def name_nodes(model: onnx.ModelProto) -> None:
    """Give unnamed nodes unique names: exclusions, regions and reports all work by node name."""
    taken = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if node.name:
            continue
        name = f"{node.op_type}_{i}"
        while name in taken:
            name += "_"
        node.name = name
        taken.add(name)


def needs_external_data(model: onnx.ModelProto, limit: int = _PROTOBUF_LIMIT) -> bool:
    """Over protobuf's 2 GB limit, or ``limit`` (protobuf's upb backend refuses even to measure past 2 GB)."""
    try:
        return model.ByteSize() > limit
    except EncodeError:
        return True


def sort_nodes(graph: onnx.GraphProto) -> None:
    """Order the nodes topologically, in place, keeping the given order wherever it already works.

    ONNX requires it (onnx.checker and other tools refuse unsorted graphs; ORT sorts for itself),
    and ORT's quantizer appends its Q/DQ nodes at the end. A subgraph's references to outer
    tensors count as inputs of the node that holds it.
    """
    nodes = list(graph.node)
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    users: list[list[int]] = [[] for _ in nodes]
    waiting = [0] * len(nodes)
    for i, node in enumerate(nodes):
        for p in {producer[name] for name in _referenced(node) if name in producer} - {i}:
            users[p].append(i)
            waiting[i] += 1
    if all(p < i for p, us in enumerate(users) for i in us):
        return
    ready = [i for i, n in enumerate(waiting) if n == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(nodes[i])
        for u in users[i]:
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, u)
    if len(order) == len(nodes):  # a cycle is not ours to repair: leave such a graph as it is
        del graph.node[:]
        graph.node.extend(order)


def _referenced(node: onnx.NodeProto) -> Iterator[str]:
    """The tensor names a node reads, its subgraphs' included."""
    yield from node.input
    for attr in node.attribute:
        for g in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
            for inner in g.node:
                yield from _referenced(inner)


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Sort ``model``'s nodes (in place) and write it to ``path`` atomically; models over 2 GB get
    ``<name>.data`` beside them."""
    sort_nodes(model.graph)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_umask())
    data_tmp: Path | None = None
    try:
        if needs_external_data(model):
            data_name = path.name + ".data"
            data_tmp = path.parent / f".{data_name}.{tmp.name[-12:]}.tmp"
            out = onnx.ModelProto()
            out.CopyFrom(model)
            onnx.save(
                out,
                str(tmp),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_tmp.name,
                size_threshold=1024,
            )
            _relocate_external_data(tmp, data_name)
            os.replace(data_tmp, path.parent / data_name)
            data_tmp = None
        else:
            with open(tmp, "wb") as fh:
                fh.write(model.SerializeToString(deterministic=True))
        os.replace(tmp, path)
    except OSError as exc:
        raise QuantizationError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        for leftover in (tmp, data_tmp):
            if leftover is not None:
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _relocate_external_data(model_file: Path, data_name: str) -> None:
    """Point every external tensor of a saved model at its final data file name."""
    m = onnx.load(str(model_file), load_external_data=False)
    for tensor in m.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = data_name
    with open(model_file, "wb") as fh:
        fh.write(m.SerializeToString(deterministic=True))
