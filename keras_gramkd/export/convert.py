"""The built-in converters: Keras' `model.export` and ONNX quantisation.

`keras_gramkd.export.formats` names them in the formats' records. TensorFlow,
tf2onnx and onnxruntime are imported inside the functions that use them.
"""

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
    """Whether Keras can write `fmt` ("tflite", "onnx") in this process's backend.

    The backends are the format's `ExportFormat.in_process`: TFLite only under
    TensorFlow (its quantisation uses the TensorFlow converter, which Keras'
    torch route, litert-torch, does not offer), ONNX under TensorFlow, torch
    (Keras 3.15 and later: `formats.torch_onnx_takes_dicts`),
    and JAX with jax2onnx installed.
    """
    from keras_gramkd.export.formats import get_format

    return get_format(fmt).converts_in_process()


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


def convert_tflite(model, out, quantize=None, calibration=None, int8_io=False):
    """Writes a `.tflite` file with `model.export(format="litert")`, quantised."""
    require("tensorflow", "TFLite export")
    kwargs = _tflite_converter_kwargs(quantize, calibration, int8_io)
    model.export(
        str(out),
        format="litert",
        input_signature=input_signature(model),
        verbose=False,
        **kwargs,
    )


def convert_onnx(model, out, quantize=None, calibration=None, int8_io=False):
    """Writes a float32 `.onnx` file with `model.export(format="onnx")`.

    ONNX is quantised afterwards, on this file, by `quantize_onnx`.
    """
    if keras.backend.backend() == "tensorflow":
        require("tf2onnx", "ONNX export under TensorFlow")
    model.export(
        str(out), format="onnx", input_signature=input_signature(model), verbose=False
    )


def convert(model, fmt, quantize, out, calibration=None, int8_io=False):
    """Writes one file of the format `fmt` (a name) in this process."""
    from keras_gramkd.export.formats import get_format

    get_format(fmt).convert(model, out, quantize, calibration, int8_io)


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
            # 7-bit weights: x86 CPUs without VNNI (AVX2, AVX-512) saturate
            # int8 x int8 products, as onnxruntime's quantisation guide says
            # for per-channel weights. On the README's student on such a CPU
            # it cut rms/std from 0.117 to 0.017.
            reduce_range=True,
        )
    finally:
        pre.unlink(missing_ok=True)
