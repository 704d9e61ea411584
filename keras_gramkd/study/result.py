"""`StudyResult`: a study's numbers per method and seed, its tables and plot."""

import copy
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


def _append_scores(scores, report, gram_gap):
    """Appends one run's accuracy, dropped accuracies and |ΔG| to `scores`
    (a dict with the keys `accuracy`, `dropped` and `gram_gap`)."""
    scores["accuracy"].append(float(report.accuracy))
    for modality, accuracy in report.dropped.items():
        scores["dropped"].setdefault(modality, []).append(float(accuracy))
    if gram_gap is not None:
        scores["gram_gap"].append(float(gram_gap))


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
        tests: with named test sets, test set name -> dict of its
            `accuracy`, `dropped` and `gram_gap` per seed (`accuracy`,
            `dropped` and `gram_gap` above are the first set's); empty for a
            single test set. `on(name)` views one set.
    """

    def __init__(self, name):
        self.name = name
        self.seeds, self.accuracy, self.gram_gap, self.train_time_s = [], [], [], []
        self.dropped, self.histories = {}, []
        self.params = None
        self.tests = {}

    def add(self, seed, report, gram_gap, seconds, params, history=None, tests=None):
        """Records one run (`report` is a `RobustnessReport` of its student);
        `tests`: test set name -> (report, gram_gap) with named test sets."""
        self.seeds.append(int(seed))
        _append_scores(vars(self), report, gram_gap)
        for name, (test_report, test_gap) in (tests or {}).items():
            scores = {"accuracy": [], "dropped": {}, "gram_gap": []}
            _append_scores(self.tests.setdefault(name, scores), test_report, test_gap)
        self.train_time_s.append(float(seconds))
        self.params = int(params)
        self.histories.append(
            {k: [float(v) for v in values] for k, values in (history or {}).items()}
        )

    @property
    def accuracy_mean_sd(self):
        """(mean, sd over seeds) of the test accuracy."""
        return mean_sd(self.accuracy)

    def on(self, test):
        """This method's result with the scores of the named test set `test`."""
        view = copy.copy(self)
        view.accuracy, view.dropped, view.gram_gap = (
            self.tests[test][key] for key in ("accuracy", "dropped", "gram_gap")
        )
        view.tests = {}
        return view

    def to_dict(self):
        tests = {"tests": self.tests} if self.tests else {}
        return {
            "seeds": self.seeds,
            "accuracy": self.accuracy,
            "dropped": self.dropped,
            "gram_gap": self.gram_gap,
            "train_time_s": self.train_time_s,
            "params": self.params,
            "histories": self.histories,
            **tests,
        }

    @classmethod
    def from_dict(cls, name, data):
        result = cls(name)
        for key in ("seeds", "accuracy", "dropped", "gram_gap", "train_time_s"):
            setattr(result, key, data[key])
        result.params = data["params"]
        result.histories = data.get("histories", [])
        result.tests = data.get("tests", {})
        return result


class StudyResult:
    """What `compare_methods` measured, with its paired statistics.

    Attributes:
        methods: dict name -> `MethodResult`, in the order they were given.
        reference: the method the others are paired against.
        teacher_accuracy, teacher_dropped, teacher_params: the teacher's.
        config: seeds, batch seeds, epochs, batch size, data sizes, backend.
        students: dict (method, seed) -> trained student, when
            `compare_methods` ran with `keep_students=True` (not in the JSON).
        teacher_tests: with named test sets, test set name -> the teacher's
            `{"accuracy", "dropped"}` on it (the attributes above are the
            first set's); empty for a single test set.
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
        teacher_tests=None,
    ):
        self.methods = methods
        self.reference = reference
        self.teacher_accuracy = teacher_accuracy
        self.teacher_dropped = teacher_dropped
        self.teacher_params = teacher_params
        self.config = config
        self.students = students or {}
        self.teacher_tests = teacher_tests or {}

    def on(self, test):
        """The result scored on the named test set `test` (its accuracies,
        |ΔG| and paired differences; the same runs)."""
        if test not in self.teacher_tests:
            raise ValueError(
                f"No test set {test!r}; the study was scored on "
                f"{list(self.teacher_tests) or 'one unnamed test set'}."
            )
        teacher = self.teacher_tests[test]
        return StudyResult(
            {name: r.on(test) for name, r in self.methods.items()},
            self.reference,
            teacher["accuracy"],
            teacher["dropped"],
            self.teacher_params,
            self.config,
            self.students,
        )

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

    def _paired_dict(self):
        """Each method's `paired` difference, NaN standard errors as None."""
        paired = {}
        for name in self.methods:
            if name != self.reference:
                p = self.paired(name)
                paired[name] = {**p, "se": _finite_or_none(p["se"])}
        return paired

    def _test_summary(self):
        """Per test set: the teacher's accuracy, each method's accuracy mean
        and standard error over seeds, and the paired differences."""
        summary = {}
        for test, teacher in self.teacher_tests.items():
            result, methods = self.on(test), {}
            for name, r in result.methods.items():
                mean, sd = r.accuracy_mean_sd
                se = _finite_or_none(sd / math.sqrt(len(r.accuracy)))
                methods[name] = {"accuracy_mean": mean, "accuracy_se": se}
            summary[test] = {
                "teacher_accuracy": teacher["accuracy"],
                "methods": methods,
                "paired_vs_reference": result._paired_dict(),
            }
        return summary

    def to_dict(self):
        """A JSON-able dict (NaN standard errors become None); with named
        test sets, `"tests"` holds each set's summary (`_test_summary`)."""
        teacher = {
            "accuracy": self.teacher_accuracy,
            "dropped": self.teacher_dropped,
            "params": self.teacher_params,
        }
        data = {
            "reference": self.reference,
            "config": self.config,
            "teacher": teacher,
            "methods": {name: r.to_dict() for name, r in self.methods.items()},
            "paired_vs_reference": self._paired_dict(),
        }
        if self.teacher_tests:
            teacher["tests"] = self.teacher_tests
            data["tests"] = self._test_summary()
        return data

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
            teacher_tests=data["teacher"].get("tests"),
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
        """The `table` as Markdown; with named test sets, one table per set,
        each under its name in bold."""
        if not self.teacher_tests:
            return markdown_table(*self.table())
        return "\n\n".join(
            f"**{test}**\n\n" + markdown_table(*self.on(test).table())
            for test in self.teacher_tests
        )

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
