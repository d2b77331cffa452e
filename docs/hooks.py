"""MkDocs hooks of the tfp_seg site (mkdocs.yml `hooks:`): figures, reference pages, checks.

- `on_pre_build` runs `docs/make_figures.py` (with the interpreter running MkDocs, which has
  tfp_seg installed), so the figures of the guides are made by the library at every build; a
  build reuses them only while they are newer than the script and every tfp_seg source file.
- `on_files` adds the API reference pages, generated from each public module's `__all__`
  (`docs/_reference.py`), and fails the build (a warning under `--strict`) for a public name
  without a docstring: every name of every `__all__`, and the public methods and properties
  that the exported classes define, other than Keras' own hooks (`call`, `build`,
  `get_config`, ...), which Keras documents.
- `on_page_markdown` replaces `<!-- tfp-seg-help COMMAND -->` with the `--help` text of that
  command, taken from `tfp_seg.cli.build_parser()`, so the CLI page cannot drift from the CLI.
"""

from __future__ import annotations

import io
import logging
import os
import pathlib
import re
import subprocess
import sys
from contextlib import redirect_stdout

import griffe
from mkdocs.structure.files import File

from tfp_seg import cli

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _reference  # noqa: E402  (docs/ is not a package)

log = logging.getLogger("mkdocs.hooks.tfp_seg")

DOCS = pathlib.Path(__file__).resolve().parent
FIGURES = DOCS / "figures"
FIGURE_SCRIPT = DOCS / "make_figures.py"

# The griffe extensions of mkdocs.yml (the check reads the docstrings as the pages render them).
EXTENSIONS = ("GroupedParameters", "InheritedDocstrings")

# Methods Keras calls and documents (overrides of the Layer / Model / Loss / Metric / Callback
# interface); an override need not repeat the interface's docstring.
KERAS_HOOKS = frozenset(
    {
        "build",
        "call",
        "compute_output_shape",
        "compute_output_spec",
        "get_config",
        "from_config",
        "get_build_config",
        "build_from_config",
        "compile_from_config",
        "get_compile_config",
        "train_step",
        "test_step",
        "predict_step",
        "compute_loss",
        "compute_metrics",
        "metrics",
        "update_state",
        "result",
        "reset_state",
        "on_train_begin",
        "on_train_end",
        "on_epoch_begin",
        "on_epoch_end",
        "on_train_batch_begin",
        "on_train_batch_end",
    }
)


# ------------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------------


def _figures_stale() -> bool:
    stamp = FIGURES / ".complete"
    if not stamp.exists():
        return True
    made = stamp.stat().st_mtime
    sources = [FIGURE_SCRIPT, *_reference.PACKAGE.rglob("*.py")]
    return any(p.stat().st_mtime > made for p in sources)


def on_pre_build(config, **kwargs) -> None:
    if os.environ.get("TFP_SEG_DOCS_SKIP_FIGURES") == "1" and (FIGURES / ".complete").exists():
        return
    if not _figures_stale():
        log.info("figures are up to date (%s)", FIGURES)
        return
    log.info("making the figures: %s %s", sys.executable, FIGURE_SCRIPT)
    env = dict(os.environ, MPLBACKEND="Agg", TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run(
        [sys.executable, str(FIGURE_SCRIPT), "--out", str(FIGURES)], env=env, check=False
    )
    if done.returncode != 0:
        log.error("docs/make_figures.py failed with exit status %d", done.returncode)
        raise SystemExit(done.returncode)


# ------------------------------------------------------------------------------------------------
# Reference pages and the docstring check
# ------------------------------------------------------------------------------------------------


def undocumented_names() -> list:
    """Dotted paths of the public names (and their classes' own members) with no docstring."""
    extensions = griffe.load_extensions(
        *(f"{DOCS / 'griffe_extensions.py'}:{name}" for name in EXTENSIONS)
    )
    package = griffe.load(
        "tfp_seg",
        search_paths=[str(_reference.ROOT)],
        extensions=extensions,
        docstring_parser="google",
        resolve_aliases=True,
        resolve_external=False,
    )
    modules = {m for m, _ in _reference.PUBLIC_MODULES}
    missing = []
    for module, _ in _reference.PUBLIC_MODULES:
        mod = package if module == "tfp_seg" else package[module[len("tfp_seg.") :]]
        if not mod.docstring:
            missing.append(module)
        moved = _reference.moved_names(module)  # documented where they live now
        for name in _reference.exports(module):
            if f"{module}.{name}" in modules or name in moved:
                continue
            obj = mod[name]
            target = obj.final_target if obj.is_alias else obj
            if not target.docstring:
                missing.append(f"{module}.{name}")
            if target.is_class:
                missing += [
                    f"{module}.{name}.{member_name}"
                    for member_name, member in target.members.items()
                    if _needs_docstring(member_name, member)
                ]
    return sorted(set(missing))


def _needs_docstring(name: str, member) -> bool:
    if name.startswith("_") or name in KERAS_HOOKS or member.is_alias:
        return False
    if not (member.is_function or member.is_attribute and "property" in member.labels):
        return False
    return not member.docstring


def on_files(files, config, **kwargs):
    for path, markdown in _reference.all_pages().items():
        files.append(File.generated(config, path, content=markdown))
    for name in undocumented_names():
        log.warning("public name without a docstring: %s", name)
    return files


# ------------------------------------------------------------------------------------------------
# The CLI's help texts
# ------------------------------------------------------------------------------------------------

_HELP = re.compile(r"<!-- tfp-seg-help ?([a-z_]*) -->")


def _help_text(command: str) -> str:
    parser = cli.build_parser()
    argv = [command, "--help"] if command else ["--help"]
    out = io.StringIO()
    with redirect_stdout(out):
        try:
            parser.parse_args(argv)
        except SystemExit:
            pass
    text = out.getvalue().rstrip()
    if not text:
        log.warning("`tfp-seg %s --help` printed nothing: is %r a command?", command, command)
    return text


def on_page_markdown(markdown, page, config, files, **kwargs):
    if "<!-- tfp-seg-help" not in markdown:
        return markdown
    os.environ["COLUMNS"] = "80"  # argparse wraps to the terminal width: the page column
    return _HELP.sub(lambda m: "```text\n" + _help_text(m.group(1)) + "\n```", markdown)
