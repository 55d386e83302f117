"""Open a logdir's TensorBoard comparison in headless Chromium and save a screenshot of one dashboard."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from report import tensorboard_server

PROG = "tensorboard_screenshot.py"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
INSTALL_HINT = "install it with `apt-get install -y chromium` (Debian, Ubuntu) or pass --chromium PATH"
# The dashboard names of TensorBoard's URL fragment (#NAME), and what must be served before it is worth a picture.
DASHBOARDS = ("custom_scalars", "hparams", "scalars", "profile", "pytorch_profiler")
# Headless, and nothing the browser would fetch or sync beyond the loopback server (there is no network here).
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars")


class ScreenshotError(RuntimeError):
    """A screenshot that cannot be taken: the message is one line saying what to do."""


def find_chromium(path: str | None = None) -> str:
    """The Chromium executable: `path` when given, else the first of CHROMIUM_NAMES on PATH; raises ScreenshotError
    naming how to install it."""
    if path is not None:
        if shutil.which(path) is None:
            raise ScreenshotError(f"--chromium {path}: no such executable; {INSTALL_HINT}")
        return path
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    raise ScreenshotError(f"Chromium not found ({', '.join(CHROMIUM_NAMES)} on PATH); {INSTALL_HINT}")


def capture(url: str, out: Path, chromium: str, window_size: tuple[int, int], wait_ms: int,
            timeout_s: float = 120.0) -> Path:
    """Save a PNG of the page at `url` as Chromium shows it in a `window_size` (width, height) pixel window after
    `wait_ms` of the page's own (virtual) time; returns `out`. Raises ScreenshotError when Chromium writes no file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        command = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={out.resolve()}",
                   f"--window-size={window_size[0]},{window_size[1]}", f"--virtual-time-budget={wait_ms}", url]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise ScreenshotError(f"{chromium} did not finish within {timeout_s:.0f} s") from None
    if not out.is_file() or out.stat().st_size == 0:
        tail = " | ".join(result.stderr.strip().splitlines()[-3:])
        raise ScreenshotError(f"{chromium} wrote no screenshot (exit status {result.returncode}): {tail}")
    return out


def screenshot(logdir: Path, out: Path, dashboard: str, chromium: str, window_size: tuple[int, int],
               wait_ms: int) -> Path:
    """Serve `logdir` with TensorBoard, wait until it has loaded the runs (and, for custom_scalars, the layout), and
    capture `dashboard`; raises ScreenshotError and tensorboard_server.TensorBoardError."""
    with tensorboard_server.serve(logdir) as url:
        tensorboard_server.wait_for(url, "/data/runs", bool)
        if dashboard == "custom_scalars":
            tensorboard_server.wait_for(url, "/data/plugin/custom_scalars/layout",
                                        lambda layout: layout.get("category"))
        return capture(f"{url}/#{dashboard}", out, chromium, window_size, wait_ms)


def _window_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTH,HEIGHT in pixels, got {text!r}") from None
    if width < 100 or height < 100:
        raise argparse.ArgumentTypeError(f"expected at least 100,100 pixels, got {text!r}")
    return width, height


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     epilog="e.g.  python scripts/tensorboard_screenshot.py --logdir runs "
                                            "--out docs/tensorboard.png")
    parser.add_argument("--logdir", type=Path, default=Path("runs"), help="the runs folder to serve (default runs)")
    parser.add_argument("--out", type=Path, default=Path("tensorboard.png"),
                        help="PNG to write (default tensorboard.png)")
    parser.add_argument("--dashboard", choices=DASHBOARDS, default="custom_scalars",
                        help="the TensorBoard dashboard to capture (default custom_scalars: both stacks overlaid)")
    parser.add_argument("--window-size", type=_window_size, default=(1600, 1000), metavar="WIDTH,HEIGHT",
                        help="browser window in pixels (default 1600,1000)")
    parser.add_argument("--wait-ms", type=int, default=20000,
                        help="page time Chromium lets TensorBoard draw before the picture (default 20000)")
    parser.add_argument("--chromium", default=None,
                        help=f"the browser (default: {' or '.join(CHROMIUM_NAMES)} on PATH)")
    args = parser.parse_args(argv)
    if not args.logdir.is_dir():
        parser.error(f"--logdir {args.logdir}: no such folder; give the runs folder the training scripts wrote")
    if args.wait_ms < 0:
        parser.error("--wait-ms must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    """Take the screenshot and print its path; exit 2 (one line) when Chromium is missing, 1 when it fails."""
    args = parse_args(argv)
    try:
        chromium = find_chromium(args.chromium)
    except ScreenshotError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    try:
        out = screenshot(args.logdir, args.out, args.dashboard, chromium, args.window_size, args.wait_ms)
    except (ScreenshotError, tensorboard_server.TensorBoardError) as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 1
    print(f"screenshot of TensorBoard's {args.dashboard} dashboard over {args.logdir}: {out}")
    return 0
