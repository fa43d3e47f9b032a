"""Render a run's fairness report (RUN_DIR/report.html) to a PNG in headless Chromium.

    python bench/report_screenshot.py RUN_DIR [--out report.png] [--height 4000] [--colours 256]

``--regenerate`` writes the report again from what the run stored first (as ``fedrad report``
does). ``--colours N`` reduces the PNG to an N-colour palette (smaller files for docs). Prints
a table of what rendered: plots, tables and rows in the browser's DOM, and the image's size.
"""

from __future__ import annotations

import argparse
import sys
from html.parser import HTMLParser
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _browser import INSTALL_HINT, dump_dom, find_browser, screenshot  # noqa: E402


class _Counts(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: dict[str, int] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] = self.tags.get(tag, 0) + 1


def rendered_counts(dom: str) -> dict[str, int]:
    """How many plots, tables, rows and sections a dumped DOM holds."""
    counts = _Counts()
    counts.feed(dom)
    return {name: counts.tags.get(name, 0) for name in ("svg", "img", "table", "tr", "section")}


def _reduce(png: Path, colours: int) -> None:
    from PIL import Image

    with Image.open(png) as image:
        reduced = image.convert("RGB").quantize(colors=colours, method=Image.Quantize.MEDIANCUT)
    reduced.save(png, optimize=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    parser.add_argument("--out", type=Path, default=None, help="PNG (default RUN_DIR/report.png)")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=4000)
    parser.add_argument("--colours", type=int, default=0, help="palette size; 0 keeps RGB")
    parser.add_argument("--regenerate", action="store_true", help="rewrite the report first")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per browser run")
    args = parser.parse_args(argv)

    page = args.run_dir / "report.html"
    if args.regenerate:
        from server.report import write_report

        if write_report(args.run_dir) is None:
            print(f"{args.run_dir} holds no fairness counts", file=sys.stderr)
            return 2
    if not page.is_file():
        print(f"{page} is missing: run `fedrad report {args.run_dir}` first", file=sys.stderr)
        return 2
    browser = find_browser()
    if browser is None:
        print(f"no headless browser found: {INSTALL_HINT}", file=sys.stderr)
        return 2
    png = args.out or args.run_dir / "report.png"
    screenshot(browser, page, png, width=args.width, height=args.height, timeout=args.timeout)
    if args.colours:
        _reduce(png, args.colours)
    counts = rendered_counts(dump_dom(browser, page, timeout=args.timeout))
    rows = [*counts.items(), ("png bytes", png.stat().st_size)]
    print(f"{'rendered':<12} {'count':>10}")
    for name, value in rows:
        print(f"{name:<12} {value:>10}")
    print(f"wrote {png} ({args.width} x {args.height}) with {browser}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
