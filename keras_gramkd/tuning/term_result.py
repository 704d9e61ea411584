"""`TermSearchResult`: what a term search found, and what its confirmation says.

One row per family: its tuned settings, the search's best validation score, and
the confirmation on fresh paired seeds — the mean difference in test accuracy
against tuned KD alone, its standard error, the seeds it won, and the 95 % t
interval. The recommendation names the families whose interval lies above 0,
best first, or says that no term beats KD.
"""

import json
import math

from keras_gramkd.study.result import StudyResult
from keras_gramkd.study.stats import t_interval
from keras_gramkd.tuning.families import describe_settings

LEVEL = 0.95


def _points(value, signed=True):
    return f"{100 * value:+.2f}" if signed else f"{100 * value:.2f}"


def _none_if_nan(value):
    return None if value is None or not math.isfinite(value) else value


class TermSearchResult:
    """The result of `search_terms`.

    Attributes:
        rows: list of dicts, one per family (``"kd"`` first): ``family``,
            ``settings`` (the best trial's hyperparameters), ``trials`` (trials
            completed), ``val`` (the best trial's score), ``search_seconds``;
            every family but ``"kd"`` also has ``delta``, ``se``, ``won``,
            ``seeds``, ``low``, ``high`` and ``excludes_zero`` (on the first
            test set; accuracies as fractions).
        confirmation: the confirmation's `StudyResult`.
        config: the budget and the run: trials per family, epochs, seeds,
            objective, wall times.
    """

    def __init__(self, rows, confirmation, config):
        self.rows, self.confirmation, self.config = rows, confirmation, config

    @classmethod
    def from_search(cls, searched, confirmation, config):
        """Joins the search (family -> row) and the confirmation's paired seeds."""
        rows = []
        for family, row in searched.items():
            row = dict(row, family=family)
            if family != confirmation.reference:
                paired = confirmation.paired(family)
                low, high = t_interval(paired, LEVEL)
                row.update(
                    delta=paired["mean"],
                    se=paired["se"],
                    won=paired["better"],
                    seeds=len(paired["diffs"]),
                    low=low,
                    high=high,
                    excludes_zero=bool(low > 0 or high < 0),
                )
            rows.append(row)
        return cls(rows, confirmation, config)

    @property
    def recommended(self):
        """The families whose interval lies above 0, largest gain first."""
        winners = [r for r in self.rows if "low" in r and r["low"] > 0]
        return [r["family"] for r in sorted(winners, key=lambda r: -r["delta"])]

    @property
    def recommendation(self):
        """One sentence: the recommended terms, or that no term beats KD."""
        seeds = len(self.confirmation.config["seeds"])
        if not self.recommended:
            return (
                f"No term beats KD on this model: no family's {LEVEL:.0%} t "
                f"interval over {seeds} fresh paired seeds lies above 0."
            )
        rows = {r["family"]: r for r in self.rows}
        parts = [
            f"{f} ({_points(rows[f]['delta'])} ± {_points(rows[f]['se'], False)} "
            f"points, {rows[f]['won']}/{rows[f]['seeds']} seeds)"
            for f in self.recommended
        ]
        return (
            f"Recommended on top of KD: {', '.join(parts)}; the {LEVEL:.0%} t "
            f"interval over {seeds} fresh paired seeds lies above 0."
        )

    def to_markdown(self):
        """The table, the recommendation and the budget, as Markdown."""
        lines = [
            "| family | tuned settings | trials | best val | Δ vs KD (points) "
            "| seeds won | 95% interval | excludes 0 |",
            "|---|---|---:|---:|---:|---:|---|---|",
        ]
        for r in self.rows:
            cells = [
                r["family"],
                describe_settings(r["settings"]),
                str(r["trials"]),
                f"{r['val']:.4f}",
            ]
            if "delta" in r:
                se = "n/a" if not math.isfinite(r["se"]) else _points(r["se"], False)
                interval = (
                    "n/a"
                    if not math.isfinite(r["low"])
                    else f"[{_points(r['low'])}, {_points(r['high'])}]"
                )
                cells += [
                    f"{_points(r['delta'])} ± {se}",
                    f"{r['won']}/{r['seeds']}",
                    interval,
                    "yes" if r["excludes_zero"] else "no",
                ]
            else:
                cells += ["reference", "", "", ""]
            lines.append("| " + " | ".join(cells) + " |")
        c = self.config
        lines += [
            "",
            self.recommendation,
            "",
            f"Budget: {c['trials']} trials per family, {c['epochs']} epochs each "
            f"({c['tuner']} search, objective {c['objective']}); search "
            f"{c['search_seconds']:.0f} s, confirmation {c['confirm_seconds']:.0f} s "
            f"on {len(self.confirmation.config['seeds'])} fresh seeds "
            f"({c['backend']}).",
        ]
        return "\n".join(lines) + "\n"

    def to_dict(self):
        """A JSON-ready dict: rows, recommendation, config, confirmation."""
        rows = [
            {k: _none_if_nan(v) if isinstance(v, float) else v for k, v in r.items()}
            for r in self.rows
        ]
        return {
            "rows": rows,
            "recommended": self.recommended,
            "recommendation": self.recommendation,
            "config": self.config,
            "confirmation": self.confirmation.to_dict(),
        }

    def to_json(self, path=None):
        """The result as JSON text; also written to `path` if given."""
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            with open(path, "w") as f:
                f.write(text + "\n")
        return text

    @classmethod
    def from_json(cls, text):
        """A result from `to_json`'s text (the confirmation without students)."""
        data = json.loads(text)
        rows = [
            {
                k: math.nan if v is None and k in ("se", "low", "high") else v
                for k, v in r.items()
            }
            for r in data["rows"]
        ]
        confirmation = StudyResult.from_json(json.dumps(data["confirmation"]))
        return cls(rows, confirmation, data["config"])
