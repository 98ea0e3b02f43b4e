"""`leadscore worker` as a real process, stopped while it is still starting: a deploy or a
scale-down can stop a worker seconds after it was started, while Python still imports the CLI.
It must end with exit status 0 (it claimed nothing, so there is nothing to finish), not die from the
signal's default action."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.e2e.support import BIN, wait_until

pytestmark = pytest.mark.e2e


def handles(pid: int, sig: signal.Signals) -> bool:
    """Whether process `pid` has a handler for `sig`: the SigCgt mask of /proc/PID/status (Linux).
    Before its first handler no process can do anything about a signal; from then it is its own."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    raise AssertionError(f"no SigCgt in /proc/{pid}/status")


def test_a_worker_stopped_while_starting_exits_cleanly(db_url: str, tmp_path: Path) -> None:
    log_path = tmp_path / "worker.log"
    env = os.environ | {
        "LEADSCORE_DATABASE_URL": db_url,
        "LEADSCORE_VAR_DIR": str(tmp_path / "var"),
        "LEADSCORE_LOG_LEVEL": "INFO",  # for "delivery worker started", had it started
    }
    with log_path.open("w") as log:
        proc = subprocess.Popen([BIN / "leadscore", "worker"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        # SIGTERM as soon as the process can take note of it: still importing, seconds from a loop.
        wait_until(
            "a SIGTERM handler",
            lambda: proc.poll() is not None or handles(proc.pid, signal.SIGTERM),
            timeout=60,
            logs=[log_path],
        )
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = log_path.read_text()
    assert code == 0, output
    # The stop came while it was starting, as meant (not once its loop was up, which a worker without
    # a handler before its loop would show by starting).
    assert "delivery worker started" not in output, output
