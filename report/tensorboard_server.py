"""A real TensorBoard server over a logdir on a free loopback port, and its HTTP API read as JSON."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

HOST = "127.0.0.1"
START_TIMEOUT_S = 60.0  # TensorBoard imports its plugins (profile, PyTorch profiler) before it listens
# The line TensorBoard prints once it listens, with the port the system chose for --port 0.
_LISTENING = re.compile(rf"TensorBoard \S+ at http://{re.escape(HOST)}:(\d+)/")


class TensorBoardError(RuntimeError):
    """TensorBoard did not start, or did not answer as expected; the message says what and where its log is."""


@contextlib.contextmanager
def serve(logdir: str | os.PathLike, reload_interval_s: int = 1) -> Iterator[str]:
    """Run `tensorboard --logdir logdir` on HOST at a port the system picks, yielding its base URL
    ('http://127.0.0.1:PORT') once it answers; stopped (and its children with it) on leaving the block.

    Raises TensorBoardError, with the end of its log, when it exits or does not listen within START_TIMEOUT_S.
    """
    with tempfile.TemporaryDirectory(prefix="tensorboard-") as folder:
        log_path = Path(folder) / "tensorboard.log"
        with open(log_path, "wb") as log:
            # Its log goes to a file, never a pipe: the profile plugin's converters log a line per request, and a
            # full pipe would stall the server.
            process = subprocess.Popen(
                [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", HOST, "--port", "0",
                 "--reload_interval", str(reload_interval_s)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            url = _wait_listening(process, log_path)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                # Its own session: whatever it started and left (the data server, the PyTorch profiler's loaders).
                os.killpg(process.pid, signal.SIGKILL)


def _wait_listening(process: subprocess.Popen, log_path: Path) -> str:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        match = _LISTENING.search(log_path.read_text(errors="replace"))
        if match:
            url = f"http://{HOST}:{match.group(1)}"
            try:
                get_json(url, "/data/plugins_listing")
                return url
            except (urllib.error.URLError, OSError):
                pass
        if process.poll() is not None:
            break
        time.sleep(0.2)
    tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
    raise TensorBoardError(f"TensorBoard did not start within {START_TIMEOUT_S:.0f} s (exit status "
                           f"{process.poll()}): {' | '.join(tail)}")


def get_json(url: str, path: str, body: dict[str, Any] | None = None, timeout_s: float = 30.0) -> Any:
    """The JSON TensorBoard answers at `path` (a GET, or a POST of `body` as the HParams plugin's routes take)."""
    request = urllib.request.Request(url + path, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"} if body is not None else {})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        data = response.read()
        if response.headers.get("Content-Encoding") == "gzip":
            data = gzip.decompress(data)
    return json.loads(data)


def wait_for(url: str, path: str, ready: Any, timeout_s: float = 30.0, body: dict[str, Any] | None = None) -> Any:
    """Poll `path` until `ready(answer)` is true (TensorBoard loads a logdir in the background) and return the
    answer; raises TensorBoardError with the last answer after `timeout_s`."""
    deadline, answer = time.monotonic() + timeout_s, None
    while True:
        try:
            answer = get_json(url, path, body)
            if ready(answer):
                return answer
        except urllib.error.HTTPError as error:  # a plugin answers 404 or 500 for a run it has not loaded yet
            answer = f"HTTP {error.code}"
        if time.monotonic() > deadline:
            raise TensorBoardError(f"{url}{path}: not ready after {timeout_s:.0f} s (last answer: {str(answer)[:300]})")
        time.sleep(0.5)
