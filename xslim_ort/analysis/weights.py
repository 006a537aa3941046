"""Big initializers held once in memory and handed to every ONNX Runtime session.

The analysis builds one model per layer (and per fix). Copying and serializing the weights
each time cost a second per layer on a 90 MB transformer, ten times the inference itself.
Instead the models carry *placeholders*: initializers with their name, type and shape and
``data_location = EXTERNAL``, whose data ORT receives through
``SessionOptions.add_external_initializers``. A placeholder keeps its key when a derived
model renames it, so any model built from the detached ones can be attached.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

MIN_BYTES = 1 << 12  # smaller initializers (scales, zero points, shapes) stay in the model
_KEY = "xslim_analysis_key"
_LOCATION = "xslim-analysis-memory"  # never read: ORT takes the data from the session options


class WeightStore:
    """The arrays behind the placeholders of detached models."""

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}
        self._values: dict[str, ort.OrtValue] = {}

    def detach(self, model: onnx.ModelProto, tag: str) -> onnx.ModelProto:
        """A copy of ``model`` whose big initializers are placeholders into this store."""
        out = onnx.ModelProto()
        out.CopyFrom(model)
        for init in out.graph.initializer:
            if _is_placeholder(init) or init.data_type == onnx.TensorProto.STRING:
                continue
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
            if int(np.prod(init.dims, dtype=np.int64)) * itemsize < MIN_BYTES:
                continue
            key = f"{tag}/{init.name}"
            array = numpy_helper.to_array(init)
            try:
                self._values[key] = ort.OrtValue.ortvalue_from_numpy(array)
            except (RuntimeError, TypeError):  # a type NumPy cannot hand over (bfloat16...): keep it inline
                continue
            self._arrays[key] = array
            placeholder = onnx.TensorProto(name=init.name, data_type=init.data_type, dims=init.dims)
            placeholder.data_location = onnx.TensorProto.EXTERNAL
            placeholder.external_data.add(key="location", value=_LOCATION)
            placeholder.external_data.add(key=_KEY, value=key)
            init.CopyFrom(placeholder)
        return out

    def value(self, tensor: onnx.TensorProto) -> np.ndarray:
        """The data of an initializer, placeholder or not."""
        key = _placeholder_key(tensor)
        return numpy_helper.to_array(tensor) if key is None else self._arrays[key]

    def attach(self, model: onnx.ModelProto, options: ort.SessionOptions) -> None:
        """Give ``options`` the data of every placeholder in ``model``."""
        names, values = [], []
        for init in model.graph.initializer:
            key = _placeholder_key(init)
            if key is not None:
                names.append(init.name)
                values.append(self._values[key])
        if names:
            options.add_external_initializers(names, values)


def _placeholder_key(tensor: onnx.TensorProto) -> str | None:
    return next((e.value for e in tensor.external_data if e.key == _KEY), None)


def _is_placeholder(tensor: onnx.TensorProto) -> bool:
    return _placeholder_key(tensor) is not None
