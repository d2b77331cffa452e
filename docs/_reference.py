"""The API reference pages, generated from every public module's `__all__` (standard library only).

One page per public module: its docstring, then one entry per name of its `__all__`, in the
module's own order. The names are read from the source with `ast` (the `__all__` list literal),
so the pages need no import of TensorFlow and follow the code as it changes: a name added to an
`__all__` gets its entry in the next build, with nothing to edit here. mkdocstrings renders each
entry from the docstrings (`::: tfp_seg.layers.LowRankLogits`); `docs/hooks.py` adds these pages
to the site and fails the build on a public name without a docstring.

`tests/test_docs.py` checks, in the test environment, that `PUBLIC_MODULES` covers
`tfp_seg.__all__` and every public package, and that the names read here equal the runtime
`__all__` of each module.
"""

from __future__ import annotations

import ast
import pathlib
from typing import Dict, List, Tuple

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tfp_seg"

# (module, what it holds): the reference's pages, in the order of the navigation. Every
# package of tfp_seg whose path has no private (`_`) part, and every module that
# `tfp_seg.__all__` names, is here (tests/test_docs.py checks it).
PUBLIC_MODULES: Tuple[Tuple[str, str], ...] = (
    ("tfp_seg", "the package: version and subpackages"),
    ("tfp_seg.layers", "distribution heads and the layers they are built from"),
    ("tfp_seg.distributions", "distributions over logits from plain tensors"),
    ("tfp_seg.losses", "negative log-likelihoods of the heads"),
    ("tfp_seg.models", "backbones, segmenters, Probabilistic U-Net, ensembles"),
    ("tfp_seg.models.backbones", "keras-hub / keras-cv backbones"),
    ("tfp_seg.protocols", "the head and sampler contracts"),
    ("tfp_seg.uncertainty", "entropy, mutual information, compatibility aliases"),
    ("tfp_seg.calibration", "temperature, covariance control, conformal calibration"),
    ("tfp_seg.metrics", "set, calibration, segmentation, OOD and selective metrics"),
    ("tfp_seg.evaluation", "exact evaluation against the known label distribution"),
    ("tfp_seg.data", "built-in benchmark, loaders, data sources"),
    ("tfp_seg.plots", "figures of samples, uncertainty and calibration"),
    ("tfp_seg.export", "SavedModel for TF Serving, ONNX"),
    ("tfp_seg.distribute", "strategies, resumption, mixed precision"),
    ("tfp_seg.runs", "the application behind the `tfp-seg` command"),
    ("tfp_seg.reporting", "earlier name of `tfp_seg.runs.report`"),
)


def module_path(module: str) -> pathlib.Path:
    """The source file of `module` (`tfp_seg.x` -> `tfp_seg/x/__init__.py` or `tfp_seg/x.py`)."""
    base = ROOT.joinpath(*module.split("."))
    package = base / "__init__.py"
    return package if package.exists() else base.with_suffix(".py")


def _tree(module: str) -> ast.Module:
    path = module_path(module)
    return ast.parse(path.read_text(), filename=str(path))


def _literals(tree: ast.Module) -> Dict[str, object]:
    """Module-level names bound to a literal (`_MOVED = {...}`, `__all__ = [...]`)."""
    found: Dict[str, object] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        else:
            continue
        if isinstance(target, ast.Name):
            try:
                found[target.id] = _evaluate(value, found)
            except ValueError:
                pass
    return found


def _evaluate(node: ast.expr, names: Dict[str, object]):
    """A literal, `a + b` of lists, or `list(NAME)` / `tuple(NAME)` of an earlier literal."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _evaluate(node.left, names) + _evaluate(node.right, names)
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ("list", "tuple")
        and len(node.args) == 1
        and isinstance(node.args[0], ast.Name)
        and node.args[0].id in names
    ):
        return list(names[node.args[0].id])  # type: ignore[arg-type]
    if isinstance(node, ast.Name) and node.id in names:
        return names[node.id]
    try:
        return ast.literal_eval(node)
    except ValueError as err:
        raise ValueError(f"not a static literal: {ast.dump(node)[:80]}") from err


def exports(module: str) -> List[str]:
    """The names of `module.__all__`, read from its source (lists of strings, concatenated)."""
    names = _literals(_tree(module)).get("__all__")
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ValueError(
            f"{module_path(module)}: a public module must define `__all__` as a literal list "
            "of strings (or a sum of such lists)."
        )
    return list(names)


def moved_names(module: str) -> Dict[str, str]:
    """Compatibility aliases resolved by a module `__getattr__`: `_MOVED = {name: module}`."""
    moved = _literals(_tree(module)).get("_MOVED", {})
    return dict(moved) if isinstance(moved, dict) else {}


def public_packages() -> List[str]:
    """Every package under `tfp_seg/` whose dotted path has no `_`-prefixed part."""
    found = []
    for init in sorted(PACKAGE.rglob("__init__.py")):
        parts = init.parent.relative_to(ROOT).parts
        if not any(p.startswith("_") for p in parts):
            found.append(".".join(parts))
    return found


def page_name(module: str) -> str:
    """The reference page of a module, relative to the docs folder."""
    return f"reference/{module}.md"


def page_markdown(module: str, summary: str) -> str:
    """The Markdown of one reference page: the module's docstring, then each exported name."""
    names = exports(module)
    lines = [
        f"# `{module}`",
        "",
        f"*{summary}.* Every entry below is generated from the docstrings; the names are",
        f"those of `{module}.__all__`, in its order.",
        "",
        f"::: {module}",
        "    options:",
        "      members: false",
        "      show_root_heading: false",
        "      show_root_toc_entry: false",
        "",
    ]
    submodules = {m for m, _ in PUBLIC_MODULES}
    moved = moved_names(module)
    for name in names:
        target = f"{module}.{name}"
        if target in submodules:  # a public subpackage: it has its own page
            lines += [f"## `{name}`", "", f"The subpackage [`{target}`]({target}.md).", ""]
        elif name in moved:  # resolved lazily by the module's `__getattr__`
            lines += [
                f"## `{name}`",
                "",
                f"Compatibility alias of [`{moved[name]}.{name}`][{moved[name]}.{name}]: "
                f"`{target}` resolves to it on first use.",
                "",
            ]
        else:
            lines += [f"::: {target}", ""]
    return "\n".join(lines)


def index_markdown() -> str:
    """The reference's front page: one line per public module, with the number of names."""
    lines = [
        "# API reference",
        "",
        "Generated from the docstrings at every build: one page per public module, one entry",
        "per name of its `__all__`. The conventions of every page are those of the",
        "[getting started](../index.md#conventions) page: channels-last, the sample axis",
        "first.",
        "",
        "| module | holds | public names |",
        "| --- | --- | ---: |",
    ]
    for module, summary in PUBLIC_MODULES:
        lines.append(f"| [`{module}`]({module}.md) | {summary} | {len(exports(module))} |")
    return "\n".join(lines) + "\n"


def all_pages() -> Dict[str, str]:
    """`{page path: markdown}` of the whole reference."""
    pages = {"reference/index.md": index_markdown()}
    for module, summary in PUBLIC_MODULES:
        pages[page_name(module)] = page_markdown(module, summary)
    return pages
