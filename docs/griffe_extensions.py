"""Griffe extensions for tfp_seg's docstrings (loaded by mkdocstrings, see mkdocs.yml).

`GroupedParameters`: the docstrings document parameters that share a meaning on one line,
`kernel_size, kernel_initializer, validate_args: see DistributionHead.` Griffe's Google-style
parser reads that as one parameter named "kernel_size, kernel_initializer, validate_args" and
warns that it is not in the signature. This extension rewrites such a line, before parsing, into
one entry per name with the shared description, so every name is checked against the signature
(an unknown one still fails the build) and rendered in the parameter table.

`InheritedDocstrings`: a method that overrides a documented method of a tfp_seg base class
(`DistributionHead.distribution`, `Head.sample_logits`, ...) without a docstring of its own
shows the base's docstring, as `help()` does (`inspect.getdoc` follows the MRO).
"""

from __future__ import annotations

import pathlib
import sys
from typing import Any

import griffe

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _docstrings import split_grouped_parameters  # noqa: E402  (docs/ is not a package)


class GroupedParameters(griffe.Extension):
    """One docstring entry per name for `a, b: text` parameter entries (see the module)."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and "," in obj.docstring.value:
            obj.docstring.value = split_grouped_parameters(obj.docstring.value)


class InheritedDocstrings(griffe.Extension):
    """Undocumented overrides show the docstring of the tfp_seg base they override."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        for cls in _classes(pkg):
            try:
                mro = cls.mro()
            except ValueError:  # a base outside the loaded packages
                continue
            for name, member in cls.members.items():
                if member.is_alias or member.docstring is not None:
                    continue
                for base in mro:
                    inherited = base.members.get(name)
                    if inherited is not None and not inherited.is_alias and inherited.docstring:
                        member.docstring = griffe.Docstring(
                            inherited.docstring.value,
                            parent=member,
                            parser=inherited.docstring.parser,
                            parser_options=inherited.docstring.parser_options,
                        )
                        break


def _classes(module: griffe.Module):
    for member in module.members.values():
        if member.is_alias:
            continue
        if member.is_module:
            yield from _classes(member)
        elif member.is_class:
            yield member
