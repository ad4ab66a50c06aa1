"""Start and stop a local SGLang server on the CPU engine; read its memory. Used by the demo,
the tests and the benchmarks, so all three measure servers the same way."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CPU_ENV = {"SGLANG_USE_CPU_ENGINE": "1"}
# Every server process writes its threads' Python stacks to its log on SIGABRT (faulthandler),
# so a start that hangs says where before it is stopped (``dump_stacks``).
STACKS_ON_ABORT_ENV = {"PYTHONFAULTHANDLER": "1"}


# What uvicorn logs when the port is in use; the server process then hangs in shutdown.
PORT_TAKEN = "error while attempting to bind on address"
PORT_RETRIES = 2


class PortTakenError(RuntimeError):
    """The server's HTTP port was taken between `free_port` and the server's bind."""


# Ports `free_port` has handed out in this process: each once, so servers started side by side
# never share a port, nor the log named after it.
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port free now that this process has not handed out before."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def dump_stacks(pid: int, gap_s: float = 0.5) -> None:
    """Under ``STACKS_ON_ABORT_ENV``, have ``pid`` and its descendants write where every thread
    stands to their stderr (the server's log), one process at a time: all are paused first, so
    none reacts to another's death (upstream's children die with their parent), then each gets
    SIGABRT and runs, children first."""
    import psutil

    try:
        leader = psutil.Process(pid)
        processes = [*reversed(leader.children(recursive=True)), leader]
    except psutil.NoSuchProcess:
        return
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signal.SIGSTOP)
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signal.SIGABRT)  # pending until it runs again
            process.send_signal(signal.SIGCONT)
            time.sleep(gap_s)


def http_json(url: str, payload: dict[str, Any] | None = None, timeout: float = 300) -> Any:
    """GET (payload None) or POST JSON; returns the decoded body. Raises HTTPError on 4xx/5xx."""
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        body = resp.read()
    return json.loads(body) if body else None


def fake_prefill_request(prompt: list[int], room: int, new_tokens: int) -> dict[str, Any]:
    """A greedy request as the router hands it to a PD decode server whose prefill upstream's
    fake transfer backend stands in for (`bootstrap_host` 2.2.2.2, as upstream's own warm-up
    sends; no prefill peer: upstream synthesises the first token)."""
    return {
        "input_ids": prompt,
        "sampling_params": {"max_new_tokens": new_tokens, "temperature": 0, "ignore_eos": True},
        "bootstrap_host": "2.2.2.2",
        "bootstrap_port": 8998,
        "bootstrap_room": room,
    }


def http_text(url: str, timeout: float = 60) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read().decode()


@dataclass
class LocalServer:
    """`python -m sglang.launch_server` on 127.0.0.1 in its own process group."""

    model_path: str | Path
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    log_path: Path | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "sglang.launch_server",
            "--model-path",
            str(self.model_path),
            "--device",
            "cpu",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *self.args,
        ]

    def start(self, timeout: float = 300) -> LocalServer:
        """Launch and wait until /health answers; raises with the log tail if it dies. A port
        `free_port` chose and another process took before the server bound it (its HTTP
        server then fails, and upstream's process does not exit) is a restart on another."""
        for _ in range(PORT_RETRIES):
            try:
                return self._start_once(timeout)
            except PortTakenError:
                self.stop()
                auto_log = self.log_path == Path(f"/tmp/sglang-kvalloc-server-{self.port}.log")
                self.port = 0
                self.log_path = None if auto_log else self.log_path
        return self._start_once(timeout)

    def _start_once(self, timeout: float) -> LocalServer:
        self.port = self.port or free_port()
        env = {**os.environ, **CPU_ENV, **STACKS_ON_ABORT_ENV, **self.env}
        if self.log_path is None:
            self.log_path = Path(f"/tmp/sglang-kvalloc-server-{self.port}.log")
        log = open(self.log_path, "wb")  # noqa: SIM115 - owned by the child for its lifetime
        self.proc = subprocess.Popen(
            self.command(),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.proc.returncode} during start-up:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if PORT_TAKEN in self._log_end():
                raise PortTakenError(f"port {self.port} was taken before the server bound it")
            time.sleep(0.25)
        dump_stacks(self.proc.pid)
        self.stop()
        raise TimeoutError(
            f"server not healthy after {timeout}s; its log's end, stacks included:\n"
            + self.log_tail(150)
        )

    def wait_exit(self, timeout: float = 300) -> int:
        """For servers expected to fail at start-up: wait for the exit code."""
        self.port = self.port or free_port()
        env = {**os.environ, **CPU_ENV, **self.env}
        result = subprocess.run(
            self.command(), env=env, capture_output=True, timeout=timeout, start_new_session=True
        )
        # Never the port's log: a server that never bound its port does not own that name, and
        # a serving server started beside it may be writing there.
        fd, name = tempfile.mkstemp(prefix=f"sglang-kvalloc-exit-{self.port}-", suffix=".log")
        with os.fdopen(fd, "wb") as log:
            log.write(result.stdout + result.stderr)
        self.log_path = Path(name)
        return result.returncode

    def log(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def _log_end(self, nbytes: int = 8192) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as log:
            log.seek(max(0, self.log_path.stat().st_size - nbytes))
            return log.read().decode(errors="replace")

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-n:])

    def pids(self) -> list[int]:
        """The server's process and all its descendants."""
        import psutil

        if self.proc is None or self.proc.poll() is not None:
            return []
        root = psutil.Process(self.proc.pid)
        return [root.pid] + [p.pid for p in root.children(recursive=True)]

    def rss_bytes(self) -> int:
        """Resident memory summed over the server's processes."""
        import psutil

        total = 0
        for pid in self.pids():
            try:
                total += psutil.Process(pid).memory_info().rss
            except psutil.NoSuchProcess:
                continue
        return total

    def server_info(self) -> dict[str, Any]:
        return http_json(self.url + "/server_info")

    def generate(self, payload: dict[str, Any], timeout: float = 600) -> Any:
        return http_json(self.url + "/generate", payload, timeout=timeout)

    def pause(self) -> None:
        """SIGSTOP the process group: an idle CPU-engine scheduler busy-polls, so a benchmark
        pauses the server it is not measuring (on two cores it would steal one)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    @contextmanager
    def awake(self) -> Iterator[LocalServer]:
        """Running for the requests inside, paused again afterwards."""
        self.resume()
        try:
            yield self
        finally:
            self.pause()

    def stop(self) -> None:
        """Kill the whole process group (scheduler and detokenizer included) by pid, with
        SIGKILL at once: upstream's SIGTERM path polls for it every 5 s before it drains and
        then SIGKILLs the children itself, and a local server has nothing to drain."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=20)

    def __enter__(self) -> LocalServer:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def generate_concurrently(
    server: LocalServer, payloads: list[dict[str, Any]], timeout: float = 900
) -> tuple[list[Any], list[BaseException]]:
    """Every payload posted to `/generate` at once, each from its own thread, so the server
    batches them together: the responses in payload order (None where one failed) and the
    errors, for the caller to assert on."""
    results: list[Any] = [None] * len(payloads)
    errors: list[BaseException] = []

    def post(index: int) -> None:
        try:
            results[index] = server.generate(payloads[index], timeout=timeout)
        except BaseException as exc:  # handed to the caller
            errors.append(exc)

    if payloads:
        with ThreadPoolExecutor(len(payloads)) as pool:
            list(pool.map(post, range(len(payloads))))
    return results, errors


@contextmanager
def side_by_side(servers: Iterable[LocalServer], timeout: float = 600) -> Iterator[None]:
    """Start servers concurrently, pause them all (wake one with `LocalServer.awake`), stop
    them all at the end. A launch is mostly one process at a time importing upstream, so two
    launches side by side fill two cores where one leaves one idle."""
    servers = list(servers)
    try:
        with ThreadPoolExecutor(len(servers)) as pool:
            for future in [pool.submit(s.start, timeout) for s in servers]:
                future.result()
        for server in servers:
            server.pause()
        yield
    finally:
        for server in servers:
            server.stop()
