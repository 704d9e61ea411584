"""Writing the files: Keras' `model.export` in this process, ONNX quantisation.

TensorFlow, tf2onnx and onnxruntime are imported inside the functions that use
them.
"""

import importlib.util
import logging
from pathlib import Path

import keras

from keras_gramkd.export.errors import require
from keras_gramkd.export.inputs import input_signature

IN_PROCESS = "in-process"
"""The report's "path" for a file written in this process."""
CHILD = "child process (tensorflow)"
"""The report's "path" for a file written in a TensorFlow child process."""


def in_process_supported(fmt):
    """Whether Keras can write `fmt` ("tflite", "onnx") in this process's backend."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return True
    if fmt == "onnx" and backend == "torch":
        return True
    if fmt == "onnx" and backend == "jax":
        return importlib.util.find_spec("jax2onnx") is not None
    # TFLite quantisation (float16 / dynamic / int8) uses the TensorFlow
    # converter; Keras' torch route (litert-torch) does not offer it.
    return False


def _tflite_converter_kwargs(quantize, calibration, int8_io):
    import tensorflow as tf

    if quantize is None:
        return {}
    kwargs = {"optimizations": [tf.lite.Optimize.DEFAULT]}
    if quantize == "float16":
        kwargs["target_spec"] = {"supported_types": [tf.float16]}
    elif quantize == "int8":
        rows = len(next(iter(calibration.values())))

        def representative_dataset():
            for i in range(rows):
                yield {k: v[i : i + 1] for k, v in calibration.items()}

        kwargs["representative_dataset"] = representative_dataset
        kwargs["target_spec"] = {"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]}
        if int8_io:
            kwargs["inference_input_type"] = tf.int8
            kwargs["inference_output_type"] = tf.int8
    return kwargs


def convert(model, fmt, quantize, out, calibration=None, int8_io=False):
    """Writes one file with Keras' `model.export` (current backend)."""
    signature = input_signature(model)
    if fmt == "tflite":
        require("tensorflow", "TFLite export")
        kwargs = _tflite_converter_kwargs(quantize, calibration, int8_io)
        model.export(
            str(out),
            format="litert",
            input_signature=signature,
            verbose=False,
            **kwargs,
        )
    else:
        if keras.backend.backend() == "tensorflow":
            require("tf2onnx", "ONNX export under TensorFlow")
        model.export(str(out), format="onnx", input_signature=signature, verbose=False)


def quantize_onnx(src, dst, quantize, calibration):
    """Quantises a float32 ONNX file with onnxruntime's tools."""
    require("onnx", "ONNX quantisation")
    # onnxruntime's quantizer logs a "consider pre-processing" hint on the root
    # logger for every call; it is advice, not a problem with the file.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        if quantize == "float16":
            _onnx_float16(src, dst)
        elif quantize == "dynamic":
            from onnxruntime import quantization as q

            q.quantize_dynamic(str(src), str(dst), weight_type=q.QuantType.QInt8)
        else:
            _onnx_int8(src, dst, calibration)
    finally:
        root.setLevel(level)


def _onnx_float16(src, dst):
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst))


def _onnx_int8(src, dst, calibration):
    from onnxruntime import quantization as q

    rows = len(next(iter(calibration.values())))

    class Reader(q.CalibrationDataReader):
        def __init__(self):
            self._rows = iter(range(rows))

        def get_next(self):
            i = next(self._rows, None)
            if i is None:
                return None
            return {k: v[i : i + 1] for k, v in calibration.items()}

    # onnxruntime's own pre-processing (shape inference, MatMul + Add fused
    # into Gemm, so biases quantise to int32 as in TFLite): on the demo's
    # student it cut rms/std from 0.027 to 0.024 and the file by 13 %.
    pre = Path(dst).with_suffix(".pre.onnx")
    try:
        q.quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        q.quantize_static(
            str(pre),
            str(dst),
            Reader(),
            quant_format=q.QuantFormat.QDQ,
            activation_type=q.QuantType.QInt8,
            weight_type=q.QuantType.QInt8,
            per_channel=True,
        )
    finally:
        pre.unlink(missing_ok=True)
