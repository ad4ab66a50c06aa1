"""The test servers' start-up: a start that hangs says where it stood before it is stopped."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from sglang_kvalloc_harness.serving import LocalServer

HANGS_IN_A_CHILD = """
import multiprocessing as mp, time

def wait_for_ever():
    time.sleep(3600)

if __name__ == "__main__":
    child = mp.get_context("spawn").Process(target=wait_for_ever)
    child.start()
    child.join()
"""


class HangingServer(LocalServer):
    """A "server" that never answers /health: a process whose spawned child sleeps, as an
    upstream launcher waits on a scheduler child."""

    def command(self) -> list[str]:
        return [sys.executable, str(self.model_path)]


def test_a_start_that_hangs_reports_every_process_stack(tmp_path: Path) -> None:
    script = tmp_path / "hangs.py"
    script.write_text(HANGS_IN_A_CHILD)
    server = HangingServer(script, log_path=tmp_path / "server.log")
    with pytest.raises(TimeoutError) as caught:
        server.start(timeout=4)
    message = str(caught.value)
    assert "Fatal Python error: Aborted" in message
    # The parent's stack (waiting on its child) and the child's (asleep), both in the log.
    assert "in join" in message, message
    assert "in wait_for_ever" in message, message
    assert server.proc is not None and server.proc.poll() is not None
