"""A Griffe extension for the API reference: doctest examples become code blocks.

The docstrings hold doctest examples (`>>>` lines and their output) at the left
margin. Markdown would read `>>>` as nested quotes and `x[0][1]` as a link, so
this extension wraps each run of doctest lines (up to the next blank line) in a
``pycon`` fence before mkdocstrings renders the docstring. The docstrings in the
code are left as they are; `pytest --doctest-modules` runs them.
"""

import griffe


def fence_doctests(text):
    """Wraps each left-margin run of `>>>` lines and their output in a fence.

    >>> fence_doctests("Text.\\n\\n>>> 1 + 1\\n2\\n\\nMore.").splitlines()
    ['Text.', '', '```pycon', '>>> 1 + 1', '2', '```', '', 'More.']
    """
    out, in_fence, in_doctest = [], False, False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        elif not in_fence and not in_doctest and line.startswith(">>>"):
            out.append("```pycon")
            in_doctest = True
        elif in_doctest and not line.strip():
            out.append("```")
            in_doctest = False
        out.append(line)
    if in_doctest:
        out.append("```")
    return "\n".join(out)


class DoctestFences(griffe.Extension):
    """Fences the doctest examples of every docstring of a loaded package."""

    def on_package(self, *, pkg, **kwargs):
        seen = set()
        stack = [pkg]
        while stack:
            obj = stack.pop()
            if obj.is_alias or id(obj) in seen:
                continue
            seen.add(id(obj))
            if obj.docstring is not None:
                obj.docstring.value = fence_doctests(obj.docstring.value)
            stack.extend(obj.members.values())
