"""`StudyResult`: a study's numbers per method and seed, its tables and plot."""

import json
import math

import numpy as np

from keras_gramkd.console import markdown_table
from keras_gramkd.study.stats import mean_sd, paired_difference


def _finite_or_none(value):
    return None if value is None or not math.isfinite(value) else value


def _pm(mean, spread, scale=100.0, digits=2):
    """`mean ± spread` in points; the spread is "n/a" where it is undefined."""
    if spread is None or not math.isfinite(spread):
        return f"{scale * mean:.{digits}f} ± n/a"
    return f"{scale * mean:.{digits}f} ± {scale * spread:.{digits}f}"


def _signed(paired):
    """A paired difference as `+0.40 ± 0.30` points."""
    return ("+" if paired["mean"] >= 0 else "") + _pm(paired["mean"], paired["se"])


class MethodResult:
    """One method's runs: a value per seed for each measure.

    Attributes:
        name: the method's name.
        seeds: the seeds, in run order.
        accuracy: test accuracy per seed.
        dropped: modality -> accuracy per seed with that modality dropped.
        gram_gap: mean |G_teacher - G_student| per seed (empty if not measured).
        train_time_s: wall time of `fit` per seed.
        params: the student's parameter count.
        histories: the `fit` history (dict name -> value per epoch) per seed.
    """

    def __init__(self, name):
        self.name = name
        self.seeds, self.accuracy, self.gram_gap, self.train_time_s = [], [], [], []
        self.dropped, self.histories = {}, []
        self.params = None

    def add(self, seed, report, gram_gap, seconds, params, history=None):
        """Records one run (`report` is a `RobustnessReport` of its student)."""
        self.seeds.append(int(seed))
        self.accuracy.append(float(report.accuracy))
        for modality, accuracy in report.dropped.items():
            self.dropped.setdefault(modality, []).append(float(accuracy))
        if gram_gap is not None:
            self.gram_gap.append(float(gram_gap))
        self.train_time_s.append(float(seconds))
        self.params = int(params)
        self.histories.append(
            {k: [float(v) for v in values] for k, values in (history or {}).items()}
        )

    @property
    def accuracy_mean_sd(self):
        """(mean, sd over seeds) of the test accuracy."""
        return mean_sd(self.accuracy)

    def to_dict(self):
        return {
            "seeds": self.seeds,
            "accuracy": self.accuracy,
            "dropped": self.dropped,
            "gram_gap": self.gram_gap,
            "train_time_s": self.train_time_s,
            "params": self.params,
            "histories": self.histories,
        }

    @classmethod
    def from_dict(cls, name, data):
        result = cls(name)
        for key in ("seeds", "accuracy", "dropped", "gram_gap", "train_time_s"):
            setattr(result, key, data[key])
        result.params = data["params"]
        result.histories = data.get("histories", [])
        return result


class StudyResult:
    """What `compare_methods` measured, with its paired statistics.

    Attributes:
        methods: dict name -> `MethodResult`, in the order they were given.
        reference: the method the others are paired against.
        teacher_accuracy, teacher_dropped, teacher_params: the teacher's.
        config: seeds, epochs, batch size, data sizes, backend.
        students: dict (method, seed) -> trained student, when
            `compare_methods` ran with `keep_students=True` (not in the JSON).
    """

    def __init__(
        self,
        methods,
        reference,
        teacher_accuracy,
        teacher_dropped,
        teacher_params,
        config,
        students=None,
    ):
        self.methods = methods
        self.reference = reference
        self.teacher_accuracy = teacher_accuracy
        self.teacher_dropped = teacher_dropped
        self.teacher_params = teacher_params
        self.config = config
        self.students = students or {}

    def paired(self, name, measure="accuracy"):
        """`paired_difference` of method `name` against the reference.

        `measure` is `"accuracy"` or `"dropped"` (the mean accuracy over the
        single dropped modalities).
        """
        values = {m: self.values(m, measure) for m in self.methods}
        return {
            "seeds": self.methods[name].seeds,
            **paired_difference(values[name], values[self.reference]),
        }

    def values(self, name, measure="accuracy"):
        """Method `name`'s per-seed `"accuracy"`, or `"dropped"`: its mean
        accuracy over the single dropped modalities."""
        result = self.methods[name]
        if measure == "accuracy":
            return list(result.accuracy)
        if measure == "dropped":
            return list(np.mean(list(result.dropped.values()), axis=0))
        raise ValueError(f"Unknown measure {measure!r}; use 'accuracy' or 'dropped'.")

    def to_dict(self):
        """A JSON-able dict (NaN standard errors become None)."""
        paired = {}
        for name in self.methods:
            if name != self.reference:
                p = self.paired(name)
                paired[name] = {**p, "se": _finite_or_none(p["se"])}
        return {
            "reference": self.reference,
            "config": self.config,
            "teacher": {
                "accuracy": self.teacher_accuracy,
                "dropped": self.teacher_dropped,
                "params": self.teacher_params,
            },
            "methods": {name: r.to_dict() for name, r in self.methods.items()},
            "paired_vs_reference": paired,
        }

    def to_json(self, path=None):
        """The result as JSON text; also written to `path` if given."""
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    @classmethod
    def from_json(cls, text):
        """The `StudyResult` of `to_json` text.

        >>> r = StudyResult({}, None, 0.9, {}, 10, {"seeds": [0]})
        >>> StudyResult.from_json(r.to_json()).teacher_accuracy
        0.9
        """
        data = json.loads(text)
        return cls(
            methods={
                name: MethodResult.from_dict(name, d)
                for name, d in data["methods"].items()
            },
            reference=data["reference"],
            teacher_accuracy=data["teacher"]["accuracy"],
            teacher_dropped=data["teacher"]["dropped"],
            teacher_params=data["teacher"]["params"],
            config=data["config"],
        )

    def table(self):
        """(headers, rows) of the result table, cells as strings: one row per
        method with accuracy % mean ± sd, Δ vs the reference mean ± se
        (points, and the seeds it won), mean accuracy with one modality
        dropped and its Δ, |ΔG|, parameters and train time."""
        n = len(self.config["seeds"])
        headers = [
            "method",
            f"acc % (mean ± sd, {n} seeds)",
            f"Δ vs {self.reference} (points, mean ± se)",
            "better on",
            "one modality dropped %",
            "Δ dropped (points)",
            "|ΔG|",
            "params",
            "train s",
        ]
        rows = [
            [
                "teacher",
                f"{100 * self.teacher_accuracy:.2f}",
                "",
                "",
                f"{100 * np.mean(list(self.teacher_dropped.values())):.2f}",
                "",
                "0",
                f"{self.teacher_params:,}",
                "",
            ]
        ]
        for name, r in self.methods.items():
            mean, sd = r.accuracy_mean_sd
            dropped = np.mean(list(r.dropped.values()), axis=0)
            if name == self.reference:
                delta = better = d_dropped = "—"
            else:
                p, q = self.paired(name), self.paired(name, "dropped")
                delta = _signed(p)
                better = f"{p['better']} of {len(p['diffs'])}"
                d_dropped = _signed(q)
            gap = f"{np.mean(r.gram_gap):.3f}" if r.gram_gap else "n/a"
            rows.append(
                [
                    name,
                    _pm(mean, sd),
                    delta,
                    better,
                    f"{100 * np.mean(dropped):.2f}",
                    d_dropped,
                    gap,
                    f"{r.params:,}",
                    f"{np.mean(r.train_time_s):.1f}",
                ]
            )
        return headers, rows

    def to_markdown(self):
        """The `table` as Markdown."""
        return markdown_table(*self.table())

    def plot(self, path=None, **kwargs):
        """Paired Δ accuracy vs the reference: mean ± se per method, and each
        seed's difference as a dot (`kwargs`: `plot_paired_differences`'s
        `title`, `setting`). Returns the matplotlib figure."""
        from keras_gramkd.plots import plot_paired_differences

        others = [m for m in self.methods if m != self.reference]
        return plot_paired_differences(
            {m: self.paired(m)["diffs"] for m in others},
            reference=self.reference,
            path=path,
            **kwargs,
        )
