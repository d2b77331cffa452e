"""Docstring rewrites for the docs build (standard library only, so the tests can import it).

`split_grouped_parameters` is what `docs/griffe_extensions.py:GroupedParameters` applies to
every docstring before griffe parses it.
"""

from __future__ import annotations

import re
from typing import List

# `Args:` / `Arguments:` / `Parameters:` headers, and an entry `name1, name2: text`.
_SECTION = re.compile(r"^(\s*)(Args|Arguments|Parameters|Keyword Args|Other Parameters):\s*$")
_GROUPED = re.compile(r"^(\s+)([A-Za-z_*]\w*(?:\s*,\s*[A-Za-z_*]\w*)+)\s*:(.*)$")


def split_grouped_parameters(text: str) -> str:
    """`a, b: text` entries of the parameter sections of `text`, one entry per name."""
    lines = text.splitlines()
    out: List[str] = []
    i = 0
    section_indent = None
    while i < len(lines):
        line = lines[i]
        header = _SECTION.match(line)
        if header:
            section_indent = len(header.group(1))
            out.append(line)
            i += 1
            continue
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if section_indent is not None and stripped and indent <= section_indent:
            section_indent = None  # the section ended
        grouped = _GROUPED.match(line) if section_indent is not None else None
        if grouped is None:
            out.append(line)
            i += 1
            continue
        item_indent = len(grouped.group(1))
        block = [grouped.group(3)]
        i += 1
        while i < len(lines) and (
            not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > item_indent
        ):
            block.append(lines[i])
            i += 1
        while block and not block[-1].strip():
            block.pop()
        for name in (n.strip() for n in grouped.group(2).split(",")):
            out.append(f"{grouped.group(1)}{name}:{block[0]}")
            out.extend(block[1:])
    return "\n".join(out)
