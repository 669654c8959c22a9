"""A griffe extension that reads adam_jax's reStructuredText markup as Markdown.

The docstrings use Google-style sections with reST inline markup (``code``,
:math:`x`, :func:`name`, ``.. math::`` blocks). mkdocstrings renders Markdown, so
before a docstring is parsed this rewrites the markup: math becomes arithmatex's
``$...$``/``$$...$$``, double backquotes become single ones, and roles naming a
public object become cross-references to its API entry.
"""

from __future__ import annotations

import re
import textwrap

import griffe

import adam_jax

_PUBLIC = set(adam_jax.__all__)
_ROLE = re.compile(r":(?:func|class|data|attr|meth|mod|obj):`~?([\w.]+)`")
_INLINE_MATH = re.compile(r":math:`([^`]+)`")
_LITERAL = re.compile(r"``(.+?)``")


def _math_blocks(text: str) -> str:
    """``.. math::`` and its indented body, one ``$$`` block per paragraph."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip() != ".. math::":
            out.append(line)
            i += 1
            continue
        indent = line[: len(line) - len(line.lstrip())]
        body: list[str] = []
        i += 1
        while i < len(lines) and (not lines[i].strip() or lines[i].startswith(indent + " ")):
            body.append(lines[i])
            i += 1
        paragraphs = textwrap.dedent("\n".join(body)).strip().split("\n\n")
        for paragraph in paragraphs:
            out += [indent + "$$", *(indent + row for row in paragraph.split("\n")), indent + "$$"]
            out.append("")
    return "\n".join(out)


def _role(match: re.Match[str]) -> str:
    name = match.group(1).rsplit(".", 1)[-1]
    if name in _PUBLIC:
        return f"[`{name}`][adam_jax.{name}]"
    return f"`{match.group(1)}`"


def rst_to_markdown(text: str) -> str:
    text = _math_blocks(text)
    text = _INLINE_MATH.sub(lambda m: f"${m.group(1)}$", text)
    text = _ROLE.sub(_role, text)
    return _LITERAL.sub(lambda m: f"`{m.group(1)}`", text)


class RstToMarkdown(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: object) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value)
