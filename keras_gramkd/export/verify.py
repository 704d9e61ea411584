"""Verification: an exported file, run in its runtime, against the Keras model.

A float32 file must match to max|diff| <= 1e-4, a float16 file to 1e-2; a
dynamic or int8 file needs top-1 agreement (sign agreement for a one-unit
output) >= 98% and an RMS diff <= 0.1 of the Keras output's std.
"""

import math
import time
from pathlib import Path

import keras
import numpy as np

from keras_gramkd.export.convert import IN_PROCESS
from keras_gramkd.export.errors import ExportError
from keras_gramkd.export.formats import format_for_file, get_format
from keras_gramkd.export.inputs import (
    as_input_dict,
    float32_model,
    keras_inputs,
    load_student,
)
from keras_gramkd.export.report import ExportRow

# Tolerances checked against the Keras model on `sample_data`.
FLOAT32_ATOL = 1e-4
FLOAT16_ATOL = 1e-2
MIN_TOP1_AGREEMENT = 0.98
# Quantised files: RMS |diff| at most this share of the Keras output's std.
MAX_RMS_RATIO = 0.1


def _median_seconds(fn, runs):
    fn()  # Warm up (compilation, allocation).
    times = []
    for _ in range(max(1, runs)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _one_unit(ref):
    return ref.ndim < 2 or ref.shape[-1] == 1


def agreement(got, ref):
    """(share of samples that agree, number of those that agree only by a tie).

    Multi-unit outputs agree when the Keras argmax is among the file's largest
    values: a quantised output has a resolution (one int8 step), and classes
    closer than that come out exactly tied, so the file cannot order them. Such
    ties are counted and reported, since `argmax` on device picks the first.
    An argmax over one unit always agrees, so a one-unit output is compared by
    the side of the threshold: 0.5 if every Keras value is in [0, 1]
    (a probability), else 0 (a logit or a regression value).
    """
    if not _one_unit(ref):
        keras_class = np.argmax(ref, -1)[:, None]
        at_keras_class = np.take_along_axis(got, keras_class, -1)[:, 0]
        agree = at_keras_class == np.max(got, -1)
        tied = agree & (np.argmax(got, -1) != keras_class[:, 0])
        return float(np.mean(agree)), int(np.sum(tied))
    threshold = 0.5 if ref.min() >= 0.0 and ref.max() <= 1.0 else 0.0
    return float(np.mean((got > threshold) == (ref > threshold))), 0


def _rms_ratio(got, ref):
    """RMS |got - ref| over the std of ref (floored at 1e-6)."""
    rms = float(np.sqrt(np.mean(np.square(got.astype(np.float64) - ref))))
    return rms / max(float(np.std(ref)), 1e-6)


def _criterion(quantize, expected):
    if quantize is None:
        return f"max|diff| <= {FLOAT32_ATOL:.0e}"
    if quantize == "float16":
        return f"max|diff| <= {FLOAT16_ATOL:.0e}"
    agree = "sign" if any(_one_unit(e) for e in expected) else "top-1"
    return f"{agree} >= {MIN_TOP1_AGREEMENT:.0%}, rms/std <= {MAX_RMS_RATIO:g}"


def _passed(quantize, diff, top1, rms_ratio):
    if quantize is None:
        passed = diff <= FLOAT32_ATOL
    elif quantize == "float16":
        passed = diff <= FLOAT16_ATOL
    else:
        passed = top1 >= MIN_TOP1_AGREEMENT and rms_ratio <= MAX_RMS_RATIO
    return passed and math.isfinite(diff) and math.isfinite(rms_ratio)


def _run_file(runner, data, n):
    """(outputs on all samples, a function that reruns them, batch sizes)."""
    if runner.dynamic_batch:
        return runner(data), lambda: runner(data), "1, dynamic"

    def rows():
        return [runner({k: v[i : i + 1] for k, v in data.items()}) for i in range(n)]

    got = [np.concatenate(parts) for parts in zip(*rows(), strict=True)]
    return got, rows, "1"


def _differences(artifact, first, got, expected):
    """(max |diff|, rms ratio, agreement, ties) over all outputs."""
    if len(got) != len(expected):
        raise ExportError(
            f"{artifact} has {len(got)} outputs, the Keras model {len(expected)}."
        )
    pairs = list(zip(got, expected, strict=True))
    diff = max(float(np.max(np.abs(g.reshape(e.shape) - e))) for g, e in pairs)
    diff_first = max(
        float(np.max(np.abs(f.reshape(e[:1].shape) - e[:1])))
        for f, e in zip(first, expected, strict=True)
    )
    pairs = [(g.reshape(e.shape), e) for g, e in pairs]
    rms_ratio = max(_rms_ratio(g, e) for g, e in pairs)
    agreements = [agreement(g, e) for g, e in pairs]
    top1 = min(a for a, _ in agreements)
    ties = sum(t for _, t in agreements)
    return max(diff, diff_first), rms_ratio, top1, ties


def verify_artifact(
    artifact,
    model,
    sample_data,
    quantize=None,
    latency_runs=20,
    path=IN_PROCESS,
    *,
    export_format=None,
):
    """Runs an exported file in its runtime and compares it with the Keras model.

    The file runs in its format's runner (`ExportFormat.runner`): `.tflite`
    files in `ai_edge_litert.interpreter.Interpreter`, `.onnx` files in
    `onnxruntime.InferenceSession`; inputs are fed by name. The file is run on
    one sample (batch 1) and, if its batch dimension is dynamic, on all samples at
    once; otherwise sample by sample.

    Args:
        artifact: Path to a `.tflite` or `.onnx` file.
        model: The source `keras.Model` (or a path to its `.keras` file).
        sample_data: Inputs: a dict of arrays keyed by input name.
        quantize: How the file was quantised (`None`, `"float16"`, `"dynamic"`,
            `"int8"`); picks the tolerance: float32 max|diff| <= 1e-4, float16
            <= 1e-2; dynamic and int8 need both top-1 agreement (sign
            agreement for one-unit outputs) >= 98% and RMS diff <= 0.1 of the
            Keras output's std.
        latency_runs: Timed runs; the median is reported.
        path: Text for the report's "path" column.
        export_format: The format's name (or `ExportFormat`); by default the
            registered format whose suffix ends the file name.

    Returns:
        An `ExportRow`.

    Raises:
        FlexOpsError: If a `.tflite` file needs Flex ops.

    Example:

    ```python
    row = verify_artifact("export/student_int8.tflite", student, x_test, "int8")
    assert row.passed
    ```
    """
    model = float32_model(load_student(model))
    artifact = Path(artifact)
    if export_format is None:
        fmt = format_for_file(artifact)
    elif isinstance(export_format, str):
        fmt = get_format(export_format)
    else:
        fmt = export_format
    data = as_input_dict(model, sample_data, "sample_data")
    n = len(next(iter(data.values())))
    runner = fmt.runner(artifact)

    keras_x = keras_inputs(model, data)
    outputs = keras.tree.flatten(model.predict_on_batch(keras_x))
    expected = [np.asarray(y, np.float32) for y in outputs]
    keras_seconds = _median_seconds(
        lambda: model.predict_on_batch(keras_x), latency_runs
    )
    first = runner({k: v[:1] for k, v in data.items()})
    got, run_all, batch_sizes = _run_file(runner, data, n)
    diff, rms_ratio, top1, ties = _differences(artifact, first, got, expected)
    seconds = _median_seconds(run_all, latency_runs)
    return ExportRow(
        format=fmt.name,
        quantize=quantize,
        file=str(artifact),
        bytes=artifact.stat().st_size,
        path=path,
        max_abs_diff=diff,
        rms_ratio=rms_ratio,
        top1_agreement=top1,
        latency_ms=1e3 * seconds / n,
        keras_latency_ms=1e3 * keras_seconds / n,
        batch_sizes=batch_sizes,
        inputs=runner.input_dtypes(),
        criterion=_criterion(quantize, expected),
        passed=_passed(quantize, diff, top1, rms_ratio),
        note=f"{fmt.runtime}, {n} samples"
        + (f", {ties} agree by a tie at the file's resolution" if ties else ""),
    )
