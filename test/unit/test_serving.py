"""The test servers' start-up: a start that hangs says where it stood before it is stopped."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from sglang_kvalloc_harness.serving import LocalServer, free_port

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


SERVES_UNLESS_ITS_PORT_IS_TAKEN = """
import http.server, sys, time
port = int(sys.argv[1])
taken = [int(p) for p in sys.argv[2].split(",")]
if port in taken:  # what upstream's launcher does when uvicorn cannot bind: log, then hang
    print(f"ERROR:    [Errno 98] error while attempting to bind on address "
          f"('127.0.0.1', {port}): address already in use", flush=True)
    time.sleep(3600)

class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()

http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
"""


class PortTakenServer(LocalServer):
    """A "server" that answers /health, except on the ports listed as taken."""

    taken: tuple[int, ...] = ()

    def command(self) -> list[str]:
        taken = ",".join(str(p) for p in self.taken)
        return [sys.executable, str(self.model_path), str(self.port), taken]


def test_a_port_taken_before_the_server_binds_it_is_a_restart_on_another(
    tmp_path: Path,
) -> None:
    """`free_port` hands out a port another process can take before the server binds it;
    upstream's server then logs the bind error and hangs. The start moves to another port at
    once instead of waiting out its timeout (the e2e lane once lost 600 s to it)."""
    script = tmp_path / "serves.py"
    script.write_text(SERVES_UNLESS_ITS_PORT_IS_TAKEN)
    first = 49_311
    server = PortTakenServer(script, port=first)
    server.taken = (first,)
    try:
        server.start(timeout=60)
        assert server.port != first and server.proc is not None and server.proc.poll() is None
    finally:
        server.stop()


class ExitsAtOnce(LocalServer):
    """A "server" that fails its start-up with a line on stderr, as a refused flag does."""

    def command(self) -> list[str]:
        return [sys.executable, "-c", "import sys; sys.exit('refused at start')"]


def test_a_start_up_failure_leaves_a_serving_servers_log_alone() -> None:
    """Servers launched side by side once shared a port number (`free_port` forgot what it had
    handed out), and the one that failed at start wrote its output over the serving one's log,
    named after the port (CI, 2026-12-07: the clamp warning was gone from the log it read)."""
    ports = {free_port() for _ in range(200)}
    assert len(ports) == 200
    port = free_port()
    serving_log = Path(f"/tmp/sglang-kvalloc-server-{port}.log")
    serving_log.write_text("the serving server's warning\n")
    failing = ExitsAtOnce("unused", port=port)
    try:
        assert failing.wait_exit(60) == 1
        assert serving_log.read_text() == "the serving server's warning\n"
        assert failing.log_path != serving_log and "refused at start" in failing.log()
    finally:
        serving_log.unlink()
        if failing.log_path is not None:
            failing.log_path.unlink(missing_ok=True)
