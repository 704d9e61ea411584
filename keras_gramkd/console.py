"""Output of the `gramkd` commands: rich on a terminal, plain text when piped.

Piped to a file, rich would wrap every table at 80 columns and cut cells
(`label…`); here a piped console is wide, colourless, and its tables are
Markdown, so `gramkd demo > log.md` reads as it prints.

`make_console` and `new_table` import rich when called (the ``cli`` extra);
`markdown_table` is plain Python, used by the library's `StudyResult` as well.

>>> import io
>>> console = make_console(file=io.StringIO())
>>> table = new_table(console)
>>> table.add_column("model"); table.add_row("labels+KD+Gram (a long name)")
>>> console.print(table)
>>> print(console.file.getvalue().strip())
| model                        |
|------------------------------|
| labels+KD+Gram (a long name) |
"""

# Wide enough that no table of ours wraps; piped text has no screen to fit.
PIPED_WIDTH = 1000


def make_console(quiet=False, file=None):
    """A `rich.console.Console`: as rich makes it on a terminal, else plain."""
    from rich.console import Console

    console = Console(quiet=quiet, file=file)
    if console.is_terminal:
        return console
    return Console(
        quiet=quiet, file=file, width=PIPED_WIDTH, color_system=None, highlight=False
    )


def new_table(console, **kwargs):
    """A `rich.table.Table`, drawn in Markdown when `console` is not a terminal."""
    from rich import box
    from rich.table import Table

    if not console.is_terminal:
        kwargs.setdefault("box", box.MARKDOWN)
    return Table(**kwargs)


def markdown_table(headers, rows):
    """A Markdown table of string cells (``|`` escaped).

    >>> print(markdown_table(["a", "b"], [["1", "x|y"]]))
    | a | b |
    |---|---|
    | 1 | x\\|y |
    """

    def line(cells):
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(headers), "|" + "---|" * len(headers), *map(line, rows)])
