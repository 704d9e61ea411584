"""The documentation runs, and speaks of the product.

Every ```python block of README.md and docs/**/*.md runs. The blocks of one page
run in order in one fresh interpreter (so a later block may use the names of an
earlier one), in a temporary directory, under the current KERAS_BACKEND: one test
per page. Markers, as HTML comments (invisible on GitHub and in the docs site):

- `<!-- not run: REASON -->` on the line before a block: the block is skipped;
  the reason must be given, and the number of such blocks is capped below.
- `<!-- backends: tensorflow, jax -->` before a block: it runs on those backends
  only.
- `<!-- slow -->` on a page's first line: the page's test is marked `slow`
  (pages that take more than about 10 s).

A traceback names the page and the line of the Markdown file.

Also here: README.md stays a guide (at most 300 lines), and no text of the
project speaks of how it was made (issue numbers, rounds, stops, the machine's
mood); CHANGELOG.md is where history lives.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import keras
import pytest

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("tensorflow", "jax", "torch")
README_MAX_LINES = 300
# Blocks that cannot run where they stand (a fresh process set up before keras
# is imported, several processes, a device). Raise it only with a reason.
MAX_NOT_RUN = 8

FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[^\n]*$")
MARKER = re.compile(
    r"^\s*<!--\s*(?P<key>not run|backends|slow)\s*:?\s*(?P<value>.*?)\s*-->\s*$"
)


def doc_pages():
    """README.md and every Markdown page under docs/, as paths from the root."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return [p.relative_to(ROOT).as_posix() for p in pages]


def parse_blocks(text):
    """The fenced code blocks of a Markdown text, with their markers.

    Returns dicts with `lang`, `line` (the 1-based line of the block's first code
    line), `code` (dedented by the fence's indent) and `not_run` / `backends`
    (None when no marker precedes the block).

    >>> text = "<!-- not run: needs a GPU -->\\n```python\\nx = 1\\n```\\n"
    >>> [(b["lang"], b["line"], b["code"], b["not_run"]) for b in parse_blocks(text)]
    [('python', 3, 'x = 1\\n', 'needs a GPU')]
    """
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, lang = match["indent"], match["lang"]
        markers, j = {}, i - 1
        while j >= 0 and (not lines[j].strip() or MARKER.match(lines[j])):
            marker = MARKER.match(lines[j])
            if marker:
                markers.setdefault(marker["key"], marker["value"])
            j -= 1
        end = i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        body = [line[len(indent) :] for line in lines[i + 1 : end]]
        backends = markers.get("backends")
        blocks.append(
            {
                "lang": lang,
                "line": i + 2,
                "code": "\n".join(body) + "\n",
                "not_run": markers.get("not run"),
                "backends": (
                    None
                    if backends is None
                    else [b.strip() for b in backends.split(",") if b.strip()]
                ),
            }
        )
        i = end + 1
    return blocks


def python_blocks(page):
    return [b for b in parse_blocks((ROOT / page).read_text()) if b["lang"] == "python"]


def is_slow(page):
    first = (ROOT / page).read_text().lstrip().splitlines()[:1]
    return bool(first) and bool(re.match(r"^<!--\s*slow\s*-->", first[0]))


def runnable_pages():
    params = []
    for page in doc_pages():
        if not any(b["not_run"] is None for b in python_blocks(page)):
            continue
        marks = [pytest.mark.slow] if is_slow(page) else []
        params.append(pytest.param(page, id=page, marks=marks))
    return params


RUNNER = """\
import json, sys
blocks = json.loads(sys.argv[1])
scope = {"__name__": "__main__"}
for page, line, code in blocks:
    # Blank lines in front: a traceback names the page's own line numbers.
    exec(compile("\\n" * (line - 1) + code, page, "exec"), scope)
"""


@pytest.mark.parametrize("page", runnable_pages())
def test_page_runs(page, tmp_path):
    backend = keras.backend.backend()
    blocks = [
        (page, b["line"], b["code"])
        for b in python_blocks(page)
        if b["not_run"] is None and (b["backends"] is None or backend in b["backends"])
    ]
    if not blocks:
        pytest.skip(f"no block of {page} runs on {backend}")
    script = tmp_path / "run_blocks.py"
    script.write_text(RUNNER)
    env = dict(os.environ, KERAS_BACKEND=backend, MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), env.get("PYTHONPATH")) if p
    )
    work = tmp_path / "work"
    work.mkdir()
    result = subprocess.run(
        [sys.executable, str(script), json.dumps(blocks)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, (
        f"{page} failed on {backend} (exit {result.returncode}).\n"
        f"--- stdout (tail) ---\n{result.stdout[-2000:]}\n"
        f"--- stderr (tail) ---\n{result.stderr[-4000:]}"
    )


def test_markers_are_well_formed():
    not_run = []
    for page in doc_pages():
        for block in parse_blocks((ROOT / page).read_text()):
            where = f"{page}:{block['line']}"
            if block["not_run"] is not None:
                assert block["not_run"], f"{where}: `not run` needs a reason"
                not_run.append(where)
            if block["backends"] is not None:
                assert block["backends"], f"{where}: `backends` names none"
                unknown = set(block["backends"]) - set(BACKENDS)
                assert not unknown, f"{where}: unknown backend(s) {sorted(unknown)}"
    assert len(not_run) <= MAX_NOT_RUN, (
        f"{len(not_run)} blocks are not run (at most {MAX_NOT_RUN}): {not_run}"
    )


def test_code_fences_close():
    for page in doc_pages():
        text = (ROOT / page).read_text()
        fences = [line for line in text.splitlines() if FENCE.match(line)]
        assert len(fences) % 2 == 0, f"{page}: a code fence is not closed"


def test_readme_is_a_short_guide():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): "
        "move details to docs/"
    )


# Words of how the project was made, not of what it is. Each pattern is written
# so that it does not match its own source text (\s+, not a space).
PROCESS_WORDS = [
    r"\bissue\s*#?\s*\d+",
    r"\bround\s+(?:one|two|three|four|five|\d+)\b",
    r"\b(?:this|last|previous|next)\s+(?:round|stop)\b",
    r"\bquiet\s+machine\b",
]
PROCESS_FILE_NAMES = [r"round\d"]
SCANNED = ("README.md", "docs", "benchmarks", "export", "examples", "keras_gramkd")
SCANNED_OPTIONAL = ("gramkd",)
TEXT_SUFFIXES = {".md", ".py", ".sh", ".txt", ".yml", ".yaml", ".toml", ".cfg", ""}


def _scanned_files():
    roots = [ROOT / name for name in SCANNED]
    roots += [ROOT / name for name in SCANNED_OPTIONAL if (ROOT / name).exists()]
    roots.append(ROOT / "tests")
    for root in roots:
        paths = [root] if root.is_file() else sorted(root.rglob("*"))
        for path in paths:
            if path.is_file() and "__pycache__" not in path.parts:
                yield path


def test_no_words_of_the_work_process():
    words = re.compile("|".join(PROCESS_WORDS), re.IGNORECASE)
    names = re.compile("|".join(PROCESS_FILE_NAMES), re.IGNORECASE)
    found = []
    for path in _scanned_files():
        rel = path.relative_to(ROOT).as_posix()
        if names.search(path.name):
            found.append(f"{rel}: file name")
        if path.suffix not in TEXT_SUFFIXES or path == Path(__file__).resolve():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            match = words.search(line)
            if match:
                found.append(f"{rel}:{number}: {match.group(0)!r}")
    assert not found, "Words of the work process (history goes to CHANGELOG.md):\n" + (
        "\n".join(found)
    )


@pytest.mark.parametrize(
    "text",
    ["a round trip", "rounding to 3 places", "around 5 s", "round(x, 3)", "issues"],
)
def test_process_words_leave_ordinary_words_alone(text):
    assert not re.search("|".join(PROCESS_WORDS), text, re.IGNORECASE)


@pytest.mark.parametrize(
    "text",
    [
        "Issue 14",
        "issue #15",
        "round two",
        "this round's",
        "last stop",
        "Quiet machine",
    ],
)
def test_process_words_are_found(text):
    assert re.search("|".join(PROCESS_WORDS), text, re.IGNORECASE)
