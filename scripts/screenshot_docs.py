"""Screenshots of the built documentation site in headless Chromium, with checks that it rendered.

Serves the built site (`mkdocs build` writes `site/`) on 127.0.0.1 and, for the getting-started
page and the SSN guide, has Chromium render it twice: `--dump-dom` (the DOM after the theme's
scripts ran) and `--screenshot` (a PNG). A page passes when its DOM has the theme's header and
navigation, its title, and its figures, every figure is served (HTTP 200, a PNG), and the
screenshot is a picture rather than a blank or error page (many colours, not one flat tone).

Chromium comes from Debian's `chromium-headless-shell` (or `chromium`) package; no browser is
downloaded. Set `CHROMIUM=/path/to/binary` to use another one.

Run: `python scripts/screenshot_docs.py --site site --out build/docs-screenshots`
(exit status 0 when every page passed, 1 when one failed, the PNGs written either way; 2 without
a built site or a Chromium, or 0 for the latter with `--skip-without-browser`).
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import urllib.parse
import urllib.request
from typing import List, Optional

# (page path in the site, its title, file names of the figures it must show)
PAGES = (
    ("index.html", "Getting started", ("data_annotations.png", "data_modes.png")),
    (
        "guides/ssn.html",
        "Stochastic Segmentation Networks",
        ("ssn_samples.png", "ssn_uncertainty.png"),
    ),
)
BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")
# The flags this machine needs: no sandbox as root, and no background network traffic.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def find_chromium() -> Optional[str]:
    """The Chromium binary: `$CHROMIUM`, else the first of `BROWSERS` on the PATH."""
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    return next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)


def serve(site: pathlib.Path):
    """A static file server of `site` on 127.0.0.1 (a free port) in a daemon thread."""
    handler = functools.partial(QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        pass


def chromium(binary: str, url: str, *args: str, timeout: float = 60.0) -> str:
    """Run headless Chromium on `url` with `args`; its stdout."""
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(
            [binary, *FLAGS, f"--user-data-dir={profile}", *args, url],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    if done.returncode != 0:
        raise RuntimeError(f"{binary} exited with {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout


def picture_problems(png: pathlib.Path) -> List[str]:
    """Why `png` is not a rendered page (empty list: it is one)."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("RGB"))
    problems = []
    if pixels.shape[0] < 600 or pixels.shape[1] < 800:
        problems.append(f"screenshot is only {pixels.shape[1]}x{pixels.shape[0]} px")
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    if colours < 200:
        problems.append(f"screenshot has {colours} colours: a blank or error page")
    if pixels.std() < 10:
        problems.append(f"screenshot is almost flat (std {pixels.std():.1f})")
    return problems


def check_page(
    binary: str, base: str, page: str, title: str, figures, out: pathlib.Path
) -> List[str]:
    """Render one page; return its problems (empty: it passed). Writes `<out>/<name>.png`."""
    url = base + page
    dom = chromium(binary, url, "--virtual-time-budget=5000", "--dump-dom")
    problems = []
    for what, pattern in (
        ("the theme's header", r'class="md-header'),
        ("the navigation", r'class="md-nav'),
        (f"the title {title!r}", re.escape(title)),
    ):
        if not re.search(pattern, dom):
            problems.append(f"{url}: the rendered page has no {what}")
    for figure in figures:
        src = re.search(rf'<img[^>]+src="([^"]*{re.escape(figure)})"', dom)
        if src is None:
            problems.append(f"{url}: no <img> of {figure}")
            continue
        with urllib.request.urlopen(urllib.parse.urljoin(url, src.group(1))) as response:
            head = response.read(8)
            if response.status != 200 or head != b"\x89PNG\r\n\x1a\n":
                problems.append(f"{url}: {figure} is not served as a PNG")
    name = page.removesuffix(".html").replace("/", "_") + ".png"
    png = out / name
    chromium(
        binary,
        url,
        "--virtual-time-budget=5000",
        "--window-size=1280,2200",
        f"--screenshot={png}",
    )
    if not png.exists():
        return problems + [f"{url}: Chromium wrote no screenshot"]
    return problems + [f"{url}: {p}" for p in picture_problems(png)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--site", default="site", help="the built site (mkdocs build)")
    parser.add_argument("--out", default="build/docs-screenshots", help="folder for the PNGs")
    parser.add_argument(
        "--skip-without-browser",
        action="store_true",
        help="exit 0, saying so, when no Chromium is installed (default: exit 2)",
    )
    args = parser.parse_args(argv)
    site, out = pathlib.Path(args.site), pathlib.Path(args.out)
    if not (site / "index.html").exists():
        print(f"no built site at {site}/index.html: run `mkdocs build` first", file=sys.stderr)
        return 2
    binary = find_chromium()
    if binary is None:
        print(
            "no Chromium found (apt-get install chromium-headless-shell, or set CHROMIUM)"
            + ("; no screenshots taken" if args.skip_without_browser else ""),
            file=sys.stderr,
        )
        return 0 if args.skip_without_browser else 2
    out.mkdir(parents=True, exist_ok=True)
    server = serve(site)
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        problems = []
        for page, title, figures in PAGES:
            problems += check_page(binary, base, page, title, figures, out)
    finally:
        server.shutdown()
    for problem in problems:
        print(problem, file=sys.stderr)
    print(f"{len(PAGES)} pages rendered by {binary}; screenshots in {out}/")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
