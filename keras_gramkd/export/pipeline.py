"""`export_student`: plan the files, convert each where it can be, verify them all."""

import tempfile
from pathlib import Path

import keras
import numpy as np

from keras_gramkd.export.child import child_objects, run_child
from keras_gramkd.export.convert import CHILD, IN_PROCESS
from keras_gramkd.export.errors import ExportVerificationError, require
from keras_gramkd.export.formats import QUANTIZATIONS, format_names, get_format
from keras_gramkd.export.inputs import (
    as_input_dict,
    float32_model,
    input_specs,
    load_student,
)
from keras_gramkd.export.report import ExportReport
from keras_gramkd.export.verify import verify_artifact

FORMATS = format_names()
"""The built-in formats' names; `formats.format_names()` lists all registered."""


def _normalise_options(formats, quantize):
    """(formats, quantisations): `ExportFormat`s and names, duplicates dropped."""
    if isinstance(formats, str):
        formats = (formats,)
    out_formats = []
    for fmt in formats:
        record = get_format(fmt)
        if record not in out_formats:
            out_formats.append(record)
    if quantize is None or isinstance(quantize, str):
        quantize = (quantize,)
    quants = []
    for q in quantize:
        q = None if q in (None, "none", "float32") else q
        if q not in QUANTIZATIONS:
            raise ValueError(
                f"Unknown quantize={q!r}; choose from None, 'float16', 'dynamic', "
                "'int8'."
            )
        if q not in quants:
            quants.append(q)
    for fmt in out_formats:
        refused = [q for q in quants if q not in fmt.quantizations]
        if refused:
            raise ValueError(
                f"The {fmt.name!r} format cannot be quantised as {refused}; it "
                f"allows {list(fmt.quantizations)}."
            )
    return out_formats, quants


def _check_options(model, fmts, quants, representative_data):
    """Fails before any conversion: bad names, int8 without data, no runtime."""
    for fmt in fmts:
        if fmt.check_model is not None:
            fmt.check_model(model)
    if "int8" in quants and representative_data is None:
        raise ValueError(
            "quantize='int8' needs representative_data: a few hundred real input "
            "rows (dict keyed by input name) to calibrate the int8 ranges."
        )
    for fmt in fmts:
        for module, what in fmt.requires:
            require(module, what)


def _sample_inputs(model, sample_data, calibration):
    """The verification inputs: `sample_data`, the calibration data, or random."""
    if sample_data is not None:
        return as_input_dict(model, sample_data, "sample_data")
    if calibration is not None:
        return calibration
    specs = input_specs(model)
    dynamic = {k: s for k, (s, _) in specs.items() if None in s}
    if dynamic:
        raise ValueError(
            f"Input(s) {dynamic} have a dynamic dimension (None), so no "
            "random sample data can be made to verify the files. Pass "
            "sample_data: real inputs, a dict of arrays keyed by input name."
        )
    rng = np.random.default_rng(0)
    return {
        k: rng.standard_normal((64, *shape)).astype("float32")
        for k, (shape, _) in specs.items()
    }


def _file(export_dir, stem, fmt, quantize):
    return export_dir / f"{stem}_{quantize or 'float32'}{fmt.suffix}"


def _plan(fmts, quants, export_dir, stem):
    """(files to verify as (fmt, quantize, file, path), in-process jobs, child jobs).

    A format with a `quantize_file` (ONNX: onnxruntime's tools) is quantised
    after conversion, on its float32 file, so only that file is a conversion
    job; the others are quantised by their converter.
    """
    plan, in_process, child_jobs = [], [], []
    for fmt in fmts:
        here = fmt.converts_in_process()
        path = IN_PROCESS if here else CHILD
        for q in fmt.conversion_quantizations(quants):
            job = {
                "fmt": fmt.name,
                "quantize": q,
                "out": str(_file(export_dir, stem, fmt, q)),
            }
            (in_process if here else child_jobs).append(job)
        plan += [(fmt, q, _file(export_dir, stem, fmt, q), path) for q in quants]
    return plan, in_process, child_jobs


def _write_files(model, fmts, quants, export_dir, stem, calibration, int8_io):
    """Writes every file; returns the plan of the files to verify."""
    plan, in_process, child_jobs = _plan(fmts, quants, export_dir, stem)
    objects = child_objects(model, child_jobs) if child_jobs else None
    for job in in_process:
        get_format(job["fmt"]).convert(
            model, job["out"], job["quantize"], calibration, int8_io
        )
    if child_jobs:
        with tempfile.TemporaryDirectory() as workdir:
            run_child(model, child_jobs, calibration, int8_io, workdir, objects)
    for fmt, q, out, _ in plan:
        if fmt.quantize_file is not None and q is not None:
            fmt.quantize_file(_file(export_dir, stem, fmt, None), out, q, calibration)
    if None not in quants:
        for fmt in fmts:
            if fmt.quantize_file is not None:
                float_file = _file(export_dir, stem, fmt, None)
                float_file.unlink()
                plan = [p for p in plan if p[2] != float_file]
    return plan


def _verify_files(plan, model, samples, latency_runs, export_dir):
    """Runs every planned file in its runtime; returns the `ExportReport`."""
    rows = [
        verify_artifact(
            out,
            model,
            samples,
            q,
            latency_runs=latency_runs,
            path=path,
            export_format=fmt,
        )
        for fmt, q, out, path in plan
    ]
    return ExportReport(
        rows=rows,
        backend=keras.backend.backend(),
        num_samples=len(next(iter(samples.values()))),
        export_dir=str(export_dir),
    )


def export_student(
    student,
    export_dir,
    formats=("tflite", "onnx"),
    quantize=None,
    representative_data=None,
    sample_data=None,
    *,
    int8_io=False,
    num_calibration_samples=200,
    latency_runs=20,
    check=True,
    name=None,
):
    """Exports a student to TFLite and/or ONNX and verifies every file.

    Uses Keras' `model.export` in this process where the backend supports the
    format; otherwise saves the student and converts it in a child process with
    `KERAS_BACKEND=tensorflow`. Each file is then run in `ai_edge_litert` or
    `onnxruntime` on `sample_data` and compared with the Keras model. Each
    format is an `ExportFormat` record (`keras_gramkd.export.formats`), and a
    registered format is written and verified the same way.
    Mixed-precision students are exported (and compared) as float32.

    Quantisation: `"float16"` stores float16 weights; `"dynamic"` int8 weights
    with float activations; `"int8"` full-integer (TFLite: only int8 builtin ops;
    ONNX: static QDQ), calibrated on `representative_data`.

    Args:
        student: A `keras.Model` or a path to a `.keras` file.
        export_dir: Directory for the files (created if needed). Files are named
            `{name}_{float32|float16|dynamic|int8}.{tflite|onnx}`.
        formats: `"tflite"` (alias `"litert"`) and/or `"onnx"`, or any format
            added with `register_format`.
        quantize: `None`, `"float16"`, `"dynamic"`, `"int8"`, or a list of these
            to export several variants in one call.
        representative_data: Calibration inputs (dict of arrays keyed by input
            name, `(x, y)`, or an iterable of batches). Required for `"int8"`.
        sample_data: Inputs to verify the files on (same forms). Defaults to
            `representative_data`, then to 64 random standard-normal rows.
        int8_io: With `"int8"`, make the TFLite file's inputs and outputs int8
            (quantise with the input's scale and zero point). ONNX keeps float IO.
        num_calibration_samples: Rows of `representative_data` used.
        latency_runs: Timed runs per file; the median is reported.
        check: Raise `ExportVerificationError` if a file misses its tolerance
            (float32: max|diff| <= 1e-4; float16: <= 1e-2; dynamic and int8:
            top-1 agreement, or sign agreement for a one-unit output, >= 98%
            and RMS diff <= 0.1 of the Keras output's std).
        name: File name stem; defaults to the model's name.

    Returns:
        An `ExportReport`; `print(report)` shows the table.

    Raises:
        ValueError: Unknown format or quantisation (or one the format does not
            allow), `"int8"` without representative data, or a `student` path
            that is not a Keras model.
        ImportError: A runtime or converter is missing (names the extra).
        FlexOpsError: A `.tflite` file needs TensorFlow Select (Flex) ops.
        ExportVerificationError: A file missed its tolerance (with `check=True`).

    Example:

    ```python
    report = export_student(student, "export/", quantize=[None, "int8"],
                            representative_data=x_train, sample_data=x_test)
    print(report)
    ```
    """
    fmts, quants = _normalise_options(formats, quantize)
    model = float32_model(load_student(student))
    _check_options(model, fmts, quants, representative_data)
    calibration = None
    if representative_data is not None:
        calibration = as_input_dict(
            model, representative_data, "representative_data", num_calibration_samples
        )
    samples = _sample_inputs(model, sample_data, calibration)
    export_dir = Path(export_dir)
    export_dir.mkdir(parents=True, exist_ok=True)
    stem = name or model.name or "student"
    plan = _write_files(model, fmts, quants, export_dir, stem, calibration, int8_io)
    report = _verify_files(plan, model, samples, latency_runs, export_dir)
    if check and not report.ok:
        raise ExportVerificationError(report)
    return report
