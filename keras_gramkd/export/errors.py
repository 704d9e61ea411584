"""The export errors, and the import of an optional dependency that names its extra."""

import importlib

EXTRA = 'pip install "keras-gramkd[export]"'


class ExportError(RuntimeError):
    """An export or a verification step failed."""


class FlexOpsError(ExportError):
    """A `.tflite` file needs TensorFlow Select (Flex) ops that LiteRT lacks."""

    def __init__(self, path, ops):
        self.path = str(path)
        self.ops = tuple(ops)
        super().__init__(
            f"{self.path} needs TensorFlow Select (Flex) ops that the standalone "
            f"LiteRT runtime cannot run: {', '.join(self.ops)}. Replace the op(s) "
            f"in the student with TFLite builtins (the op name after 'Flex' is the "
            "TensorFlow op), or link the 'tensorflow-lite-select-tf-ops' runtime on "
            "the device."
        )


class ExportVerificationError(ExportError):
    """An exported file is outside its tolerance; `.report` holds the table."""

    def __init__(self, report):
        self.report = report
        bad = [r for r in report.rows if not r.passed]
        lines = [
            f"{r.file}: {r.criterion} failed (max|diff| {r.max_abs_diff:.3g}, "
            f"rms/std {r.rms_ratio:.3g}, agreement {100 * r.top1_agreement:.2f}%; "
            f"{r.note}). Check that the file was exported from this model."
            for r in bad
        ]
        super().__init__(
            "Exported files failed verification:\n  "
            + "\n  ".join(lines)
            + f"\n\n{report}"
        )


def require(module, what):
    """Imports an optional dependency or fails naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"{what} needs the optional dependency '{module}', which is not "
            f"installed. Install the export extra: {EXTRA}"
        ) from error
