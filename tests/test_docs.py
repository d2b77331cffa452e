"""The documentation site covers the public API, is built by CI, and shows what it says.

The site itself is built by `mkdocs build --strict` (README "Documentation", `.ci/run`'s docs
step, `tox -e docs`), in an environment of its own. These tests run in the test environment and
check what the build relies on: that the reference generator (`docs/_reference.py`) covers
every public module and reads the same `__all__` Python does, that every page is in the
navigation, that the figures the pages show are the ones `docs/make_figures.py` makes (and the
claims the guides make about them hold), and that the package ships `py.typed`. The slow
screenshot test renders the built site in headless Chromium when both are present.
"""

from __future__ import annotations

import configparser
import importlib
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
sys.path.insert(0, str(DOCS))

import _docstrings  # noqa: E402  (docs/ is not a package)
import _reference  # noqa: E402

MODULES = [m for m, _ in _reference.PUBLIC_MODULES]


def _runtime_all(module: str) -> list:
    return list(importlib.import_module(module).__all__)


def test_reference_covers_every_public_module():
    import tfp_seg

    named = {f"tfp_seg.{n}" for n in tfp_seg.__all__ if n != "__version__"}
    missing = (set(_reference.public_packages()) | named) - set(MODULES)
    assert not missing, f"public modules without a reference page: {sorted(missing)}"


@pytest.mark.parametrize("module", MODULES)
def test_reference_reads_the_runtime_all(module):
    assert _reference.exports(module) == _runtime_all(module)


@pytest.mark.parametrize("module", MODULES)
def test_every_public_name_has_a_reference_entry(module):
    page = _reference.page_markdown(module, "summary")
    moved = _reference.moved_names(module)
    for name in _runtime_all(module):
        target = f"{module}.{name}"
        if target in MODULES:
            assert f"]({target}.md)" in page, f"{target}: no link to its page"
        elif name in moved:
            assert f"[{moved[name]}.{name}]" in page, f"{target}: no alias entry"
        else:
            assert f"\n::: {target}\n" in page, f"{target}: no `:::` entry"
        # the generated entry resolves to a real object
        assert hasattr(importlib.import_module(module), name), target


def test_navigation_lists_every_page():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())

    def pages(nav):
        for item in nav:
            value = item if isinstance(item, str) else next(iter(item.values()))
            if isinstance(value, list):
                yield from pages(value)
            else:
                yield value

    listed = set(pages(config["nav"]))
    written = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    generated = set(_reference.all_pages())
    assert written | generated == listed, (written | generated) ^ listed
    assert config["strict"] is True  # warnings fail the build


def test_ci_builds_the_readme_docs_command():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Documentation") :]
    command = re.search(r"```bash\n(.*?)\n```", section, re.S).group(1).strip()
    assert "mkdocs build --strict" in command and "constraints-docs.txt" in command
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert any(line.strip().startswith(command) for line in ci), command
    assert 'step "docs' in "\n".join(ci)


def test_docs_pins_cover_the_docs_extra():
    pins = {
        line.split("==")[0].lower()
        for line in (ROOT / "constraints-docs.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    extra = cfg["options.extras_require"]["docs"].split()
    names = {re.split(r"[\[<>=]", req)[0].lower() for req in extra}
    assert names <= pins | {"ruff"}, names - pins  # ruff: pinned in constraints.txt too


def test_py_typed_is_shipped():
    assert (ROOT / "tfp_seg" / "py.typed").is_file()
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert "py.typed" in cfg["options.package_data"]["tfp_seg"].split()


def test_grouped_parameters_are_split_one_entry_per_name():
    doc = (
        "Summary.\n\nArgs:\n  num_classes: C.\n  title, path, dpi: As in `plot`,\n"
        "    continued.\n  seed: a seed.\n\nReturns:\n  a, b: not a parameter section.\n"
    )
    out = _docstrings.split_grouped_parameters(doc)
    assert "  title: As in `plot`,\n    continued.\n  path: As in `plot`," in out
    assert "  dpi: As in `plot`,\n    continued.\n  seed: a seed." in out
    assert "  a, b: not a parameter section." in out  # only parameter sections are split
    assert out.count("num_classes") == 1


def _referenced_figures() -> set:
    found = set()
    for page in DOCS.rglob("*.md"):
        found |= set(re.findall(r"figures/([\w.-]+\.png)", page.read_text()))
    return found


def test_every_figure_of_the_pages_is_made_by_the_script():
    script = (DOCS / "make_figures.py").read_text()
    for name in _referenced_figures():
        stem = name.removesuffix(".png")
        made = f'"{name}"' in script or (
            stem.endswith("_samples") and 'f"{name}_samples.png"' in script
        )
        assert made, f"docs show figures/{name}, which docs/make_figures.py does not write"


@pytest.mark.slow
def test_the_figure_script_makes_every_figure_and_the_guides_claims_hold(tmp_path):
    # ~1 minute on 2 cores: the figures of the guides, made as the docs build makes them.
    out = tmp_path / "figures"
    subprocess.run(
        [sys.executable, str(DOCS / "make_figures.py"), "--out", str(out)],
        check=True,
        env={**os.environ, "MPLBACKEND": "Agg", "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert (out / ".complete").exists()
    for name in _referenced_figures():
        assert (out / name).stat().st_size > 10_000, name
    record = json.loads((out / "figures.json").read_text())
    ged, err = record["ged"], record["marginal_error"]
    # The guides say: fitted to the exact distribution, the SSN and mixture samples come close
    # to it (D2_GED over 32 samples, whose V-statistic bias alone is E[d(S,S')]/32 <= 0.03),
    # the heteroscedastic samples do not, although its mean probabilities match the exact
    # marginals more closely than its label samples' frequencies do.
    assert ged["ssn"] < 0.05 and ged["mixture"] < 0.05, ged
    assert ged["heteroscedastic"] > 3 * max(ged["ssn"], ged["mixture"]), ged
    assert err["heteroscedastic"]["mean_probabilities"] < 0.05, err
    assert (
        err["heteroscedastic"]["label_samples"] > 3 * err["heteroscedastic"]["mean_probabilities"]
    )
    assert err["ssn"]["label_samples"] < 0.05, err


@pytest.mark.slow
def test_screenshots_of_the_built_site(tmp_path):
    # Needs a built site (`mkdocs build`, in the docs env) and a Chromium (Debian's
    # chromium-headless-shell); CI's docs step runs the same script after building.
    sys.path.insert(0, str(ROOT / "scripts"))
    import screenshot_docs

    site = ROOT / "site"
    if not (site / "index.html").exists():
        pytest.skip("no built site: run the README's docs command first")
    if screenshot_docs.find_chromium() is None:
        pytest.skip("no Chromium: apt-get install chromium-headless-shell")
    status = screenshot_docs.main(["--site", str(site), "--out", str(tmp_path)])
    assert status == 0
    assert {p.name for p in tmp_path.glob("*.png")} == {"index.png", "guides_ssn.png"}
