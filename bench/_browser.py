"""Headless Chromium for checking report pages: find it, screenshot a page, dump its DOM.

Debian's ``chromium`` package (``/usr/bin/chromium``) is preferred; Playwright's downloaded
Chromium is used where that is what the machine has. Every browser runs in its own process
group with a throw-away profile and is killed, group and all, when it overruns its timeout.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from contextlib import suppress
from pathlib import Path

INSTALL_HINT = "install Debian's chromium: apt-get install chromium"
_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


class BrowserError(RuntimeError):
    """The browser failed, or ran past its timeout (and was killed)."""


def find_browser(home: Path | None = None) -> Path | None:
    """A Chromium executable on PATH, else Playwright's under ``home``; None if neither.

    ``home`` defaults to the user's home from the password database, not ``$HOME`` (which
    tests point at a scratch folder).
    """
    for name in _NAMES:
        found = shutil.which(name)
        if found:
            return Path(found)
    roots = [Path(p) for p in (os.environ.get("PLAYWRIGHT_BROWSERS_PATH"),) if p]
    roots.append((home or Path(pwd.getpwuid(os.getuid()).pw_dir)) / ".cache" / "ms-playwright")
    for root in roots:
        for candidate in sorted(root.glob("chromium-*/chrome-linux*/chrome"), reverse=True):
            if os.access(candidate, os.X_OK):
                return candidate
    return None


def _run(browser: Path, args: list[str], *, timeout: float) -> str:
    """Run the browser headless; its stdout. Killed (whole group) past ``timeout`` seconds."""
    with tempfile.TemporaryDirectory(prefix="fedrad-browser-") as profile:
        command = [
            str(browser),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            *args,
        ]
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise BrowserError(f"{browser} ran past {timeout} s and was killed") from None
        finally:
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # renderer and GPU helpers left behind
    if process.returncode != 0:
        raise BrowserError(f"{browser} exited {process.returncode}: {err[-2000:]}")
    return out


def screenshot(
    browser: Path,
    page: Path,
    png: Path,
    *,
    width: int = 1280,
    height: int = 4000,
    timeout: float = 60.0,
) -> Path:
    """Render ``page`` at ``width`` x ``height`` CSS pixels into ``png``."""
    png.parent.mkdir(parents=True, exist_ok=True)
    _run(
        browser,
        [
            f"--screenshot={png.resolve()}",
            f"--window-size={width},{height}",
            page.resolve().as_uri(),
        ],
        timeout=timeout,
    )
    if not png.is_file():
        raise BrowserError(f"{browser} wrote no screenshot to {png}")
    return png


def dump_dom(browser: Path, page: Path, *, timeout: float = 60.0) -> str:
    """The DOM of ``page`` after the browser parsed and laid it out, serialised."""
    return _run(browser, ["--dump-dom", page.resolve().as_uri()], timeout=timeout)
