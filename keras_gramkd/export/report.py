"""The export report: one row per exported file, as text, Markdown or JSON."""

import dataclasses
import os


@dataclasses.dataclass
class ExportRow:
    """One exported file and what verifying it in its runtime found.

    Attributes:
        format: The format's name: `"tflite"`, `"onnx"` or another registered
            one (`keras_gramkd.export.formats`).
        quantize: `None` (float32), `"float16"`, `"dynamic"` or `"int8"`.
        file: Path of the exported file.
        bytes: Size of the file.
        path: How it was produced: in-process or in a TensorFlow child process.
        max_abs_diff: Max |runtime - Keras| over all outputs of `sample_data`.
        rms_ratio: RMS |runtime - Keras| over the std of the Keras output (the
            largest over outputs).
        top1_agreement: Share of samples whose argmax matches Keras (a tie at
            the file's resolution that includes the Keras class counts, and
            `note` says how many); for a one-unit output, whose sign does (side
            of 0.5 if the Keras output lies in [0, 1]). The smallest over
            outputs.
        latency_ms: Median runtime latency per sample, in milliseconds.
        keras_latency_ms: Median Keras `predict_on_batch` latency per sample.
        batch_sizes: `"1, dynamic"` or `"1"`: what the file accepts.
        inputs: `{name: dtype}` of the file's inputs, in the file's order.
        criterion: The tolerance checked, e.g. `"max|diff| <= 1e-04"`.
        passed: Whether the criterion held.
        note: Extra information (runtime, number of samples, ...).
    """

    format: str
    quantize: str | None
    file: str
    bytes: int
    path: str
    max_abs_diff: float
    rms_ratio: float
    top1_agreement: float
    latency_ms: float
    keras_latency_ms: float
    batch_sizes: str
    inputs: dict
    criterion: str
    passed: bool
    note: str = ""

    def cells(self):
        """Returns the row as strings, in `ExportReport.COLUMNS` order."""
        return [
            self.format,
            self.quantize or "float32",
            os.path.basename(self.file),
            f"{self.bytes:,}",
            f"{self.max_abs_diff:.2e}",
            f"{self.rms_ratio:.2e}",
            f"{100 * self.top1_agreement:.2f}%",
            f"{self.latency_ms:.4f}",
            f"{self.keras_latency_ms:.4f}",
            self.batch_sizes,
            self.path,
            ("ok" if self.passed else "FAIL") + f" ({self.criterion})",
        ]


@dataclasses.dataclass
class ExportReport:
    """The result of `export_student`: one `ExportRow` per exported file.

    `str(report)` is a plain-text table; `to_markdown()` the same as Markdown;
    `to_dict()` a JSON-ready dict.

    Attributes:
        rows: The `ExportRow`s.
        backend: The Keras backend the export ran under.
        num_samples: Number of `sample_data` rows used for verification.
        export_dir: Directory holding the files.
    """

    rows: list
    backend: str
    num_samples: int
    export_dir: str

    COLUMNS = (
        "format",
        "quantize",
        "file",
        "bytes",
        "max|diff|",
        "rms/std",
        "top-1 agree",
        "ms/sample",
        "keras ms/sample",
        "batch",
        "path",
        "check",
    )

    @property
    def ok(self):
        """True when every file passed its tolerance."""
        return all(row.passed for row in self.rows)

    def to_dict(self):
        """Returns the report as a JSON-serialisable dict."""
        return {
            "backend": self.backend,
            "num_samples": self.num_samples,
            "export_dir": self.export_dir,
            "ok": self.ok,
            "rows": [dataclasses.asdict(row) for row in self.rows],
        }

    def to_markdown(self):
        """Returns the report as a Markdown table."""
        lines = [
            "| " + " | ".join(self.COLUMNS) + " |",
            "|" + "|".join("---" for _ in self.COLUMNS) + "|",
        ]
        lines += ["| " + " | ".join(row.cells()) + " |" for row in self.rows]
        return "\n".join(lines)

    def __str__(self):
        table = [list(self.COLUMNS)] + [row.cells() for row in self.rows]
        widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [
            f"Export report (backend: {self.backend}, {self.num_samples} samples, "
            f"dir: {self.export_dir})",
            fmt.format(*table[0]),
            fmt.format(*("-" * w for w in widths)),
        ]
        lines += [fmt.format(*line) for line in table[1:]]
        return "\n".join(lines)
