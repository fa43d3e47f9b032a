"""report.html opened in headless Chromium: the plots and tables render, a screenshot is made.

Skips where no browser exists (install Debian's ``chromium``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest
from report_helpers import write_run

from server.report import write_report

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from _browser import INSTALL_HINT, BrowserError, dump_dom, find_browser, screenshot  # noqa: E402
from report_screenshot import main as screenshot_main  # noqa: E402
from report_screenshot import rendered_counts  # noqa: E402

BROWSER = find_browser()
pytestmark = pytest.mark.timeout(150)
needs_browser = pytest.mark.skipif(
    BROWSER is None, reason=f"no headless browser found: {INSTALL_HINT}"
)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = write_run(tmp_path_factory.mktemp("browser") / "run", dp="sample")
    files = write_report(run)
    return files.html


@needs_browser
def test_the_browser_renders_every_plot_and_table(report):
    # Execute
    dom = dump_dom(BROWSER, report, timeout=60)

    # Assert: the parsed DOM holds the 10 plots and the tables with their rows
    counts = rendered_counts(dom)
    assert counts["svg"] == 10 and counts["img"] == 0
    assert counts["table"] == 7 and counts["tr"] >= 30
    assert counts == rendered_counts(report.read_text())  # nothing the browser dropped
    assert counts["section"] == 9
    assert "Left out and why" in dom and "sex=F" in dom


@needs_browser
def test_the_screenshot_shows_a_page(report, tmp_path):
    # Execute
    png = screenshot(BROWSER, report, tmp_path / "report.png", height=3000, timeout=60)

    # Assert: a real image of the page's size, neither blank nor one colour
    import matplotlib.image

    assert png.stat().st_size > 50_000
    pixels = matplotlib.image.imread(png)
    assert pixels.shape[:2] == (3000, 1280)
    rgb = pixels[..., :3].reshape(-1, 3)
    assert float(rgb.std(axis=0).max()) > 0.05
    assert len(np.unique((rgb[::97] * 255).astype(int), axis=0)) > 20  # text, lines, colours


@needs_browser
def test_the_bench_script_writes_a_reduced_png(report, tmp_path, capsys):
    # Execute
    code = screenshot_main(
        [
            str(report.parent),
            "--out",
            str(tmp_path / "shot.png"),
            "--height",
            "2000",
            "--colours",
            "128",
            "--timeout",
            "60",
        ]
    )

    # Assert
    text = capsys.readouterr().out
    assert code == 0
    assert (tmp_path / "shot.png").stat().st_size > 20_000
    assert "svg" in text and "png bytes" in text and "wrote" in text


@pytest.mark.timeout(30)
def test_a_browser_that_hangs_is_killed_with_its_children(tmp_path):
    # Prepare: a "browser" that starts a child and never finishes
    fake = tmp_path / "chromium"
    pid_file = tmp_path / "child.pid"
    fake.write_text(f"#!/bin/sh\nsleep 300 &\necho $! > {pid_file}\nwait\n")
    fake.chmod(0o755)
    page = tmp_path / "page.html"
    page.write_text("<p>x</p>")

    # Execute
    started = time.monotonic()
    with pytest.raises(BrowserError, match="ran past 1.0 s and was killed"):
        screenshot(fake, page, tmp_path / "shot.png", timeout=1.0)

    # Assert: it returned at the timeout, and the browser's child is gone too
    assert time.monotonic() - started < 10
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    """Running, not merely a zombie waiting for a parent that does not reap (containers)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"
