"""Run a command while sampling its processes (memory) from a thread: shared by the benchmarks."""

from __future__ import annotations

import importlib
import subprocess
import threading
import time
from collections.abc import Callable

try:
    import psutil
except ImportError:  # the GPU machine: Ray ships psutil in ray/thirdparty_files, on sys.path once ray is imported
    importlib.import_module("ray")
    import psutil


def run_while_sampling(
    cmd: list[str], sample: Callable[[psutil.Process], None], every: float = 0.5
) -> subprocess.CompletedProcess:
    """Run ``cmd`` (text output captured) and call ``sample`` with its process every ``every`` seconds until
    it exits (or ``sample`` raises ``psutil.NoSuchProcess``). Returns the completed process; never raises
    for a failed command (check ``returncode``)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            try:
                sample(ps)
            except psutil.NoSuchProcess:
                break
            time.sleep(every)

    th = threading.Thread(target=loop, daemon=True)
    th.start()
    stdout, stderr = proc.communicate()
    stop.set()
    th.join()
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
