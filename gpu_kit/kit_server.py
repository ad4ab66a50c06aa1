"""A ``python -m sglang.launch_server`` of the kit (GPU or CPU engine), and the memory probes:
``/server_info``'s committed bytes, the device's free memory (torch and nvidia-smi, per
process too) or, on the CPU, the server's resident memory. Standard library, plus torch and
psutil where they are asked for (both are on the GPU machine)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import kit_spec

from sglang_kvalloc_harness.serving import (  # the kit installs this package
    STACKS_ON_ABORT_ENV,
    dump_stacks,
    free_port,
    http_json,
)


class KitServer:
    """One server in its own process group, its log in ``log_path``."""

    def __init__(
        self,
        name: str,
        model: Path,
        args: list[str],
        device: str,
        log_path: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name, self.model, self.args, self.device = name, model, args, device
        self.log_path = log_path
        self.env = {**kit_spec.SERVER_ENV, **STACKS_ON_ABORT_ENV, **(env or {})}
        if device == "cpu":
            self.env["SGLANG_USE_CPU_ENGINE"] = "1"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        device = ["--device", "cpu"] if self.device == "cpu" else []
        return [
            sys.executable, "-m", "sglang.launch_server", "--model-path", str(self.model),
            "--host", "127.0.0.1", "--port", str(self.port), *device, *self.args,
        ]  # fmt: skip

    def start(self, timeout: float) -> float:
        """Launch; wait for /health. Returns the seconds it took; raises with the log tail."""
        started = time.monotonic()
        with open(self.log_path, "ab") as log:
            log.write(f"$ {' '.join(self.command())}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
                start_new_session=True,
            )
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} server exited with {self.proc.returncode} at start:\n"
                    + self.log_tail()
                )
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as resp:
                    if resp.status == 200:
                        return time.monotonic() - started
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)
        dump_stacks(self.proc.pid)
        self.stop()
        raise TimeoutError(
            f"{self.name} server not healthy after {timeout:.0f} s; its log's end, stacks "
            "included:\n" + self.log_tail(150)
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-n:])

    def server_info(self) -> dict[str, Any]:
        return http_json(self.url + "/server_info", timeout=60)

    def kv(self) -> dict[str, Any]:
        """``internal_states[0].kv_alloc``: the mode, the reason, the segments."""
        return (self.server_info().get("internal_states") or [{}])[0].get("kv_alloc", {})

    def generate(self, payload: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
        return http_json(self.url + "/generate", payload, timeout=timeout)

    def abort(self, rid: str) -> None:
        http_json(self.url + "/abort_request", {"rid": rid}, timeout=30)

    def pids(self) -> list[int]:
        """The server's process and its descendants (scheduler, detokenizer)."""
        import psutil

        if not self.alive():
            return []
        assert self.proc is not None
        root = psutil.Process(self.proc.pid)
        return [root.pid] + [p.pid for p in root.children(recursive=True)]

    def pause(self) -> None:
        """SIGSTOP: an idle CPU-engine scheduler busy-polls; on 2 cores it would steal one."""
        if self.alive() and not self.paused:
            assert self.proc is not None
            os.killpg(self.proc.pid, signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        if self.alive() and self.paused:
            assert self.proc is not None
            os.killpg(self.proc.pid, signal.SIGCONT)
        self.paused = False

    def stop(self) -> None:
        """SIGTERM the process group, then SIGKILL what is left; by process group id only. On
        the CPU straight to SIGKILL (upstream's SIGTERM path polls for it every 5 s, and the
        CPU run reads no device memory after the stop)."""
        if self.proc is None:
            return
        self.resume()
        signals = ((signal.SIGTERM, 20), (signal.SIGKILL, 20))
        for sig, wait in signals[1:] if self.device == "cpu" else signals:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
        # Children can outlive the leader for a moment; SIGKILL the group once more.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Memory:
    """Memory readings of the device (GPU) or of the servers (CPU)."""

    def __init__(self, device: str) -> None:
        self.device = device

    def reading(self, servers: list[KitServer] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"t": round(time.time(), 2)}
        if self.device == "cuda":
            import torch

            free, total = torch.cuda.mem_get_info()
            out["torch_free_bytes"], out["torch_total_bytes"] = free, total
            out.update(self.nvidia_smi())
        for server in servers or []:
            out[f"{server.name}_process_bytes"] = self.server_bytes(server)
        return out

    def server_bytes(self, server: KitServer) -> int | None:
        """Device memory of the server's processes (nvidia-smi), or their resident memory."""
        pids = set(server.pids())
        if not pids:
            return None
        if self.device == "cuda":
            apps = self.nvidia_smi_apps()
            if apps is None:
                return None
            return sum(used for pid, used in apps if pid in pids)
        import psutil

        total = 0
        for pid in pids:
            try:
                total += psutil.Process(pid).memory_info().rss
            except psutil.NoSuchProcess:
                continue
        return total

    @staticmethod
    def nvidia_smi() -> dict[str, Any]:
        query = "memory.used,memory.free,memory.total"
        try:
            line = subprocess.run(
                ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=20,
                check=True,
            ).stdout.splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError) as exc:
            return {"nvidia_smi_error": str(exc)}
        used, free, total = (int(x.strip()) * (1 << 20) for x in line.split(","))
        return {"smi_used_bytes": used, "smi_free_bytes": free, "smi_total_bytes": total}

    @staticmethod
    def nvidia_smi_apps() -> list[tuple[int, int]] | None:
        try:
            lines = subprocess.run(
                [
                    "nvidia-smi",
                    "--query-compute-apps=pid,used_memory",
                    "--format=csv,noheader,nounits",
                ],
                capture_output=True,
                text=True,
                timeout=20,
                check=True,
            ).stdout.splitlines()
        except (OSError, subprocess.SubprocessError):
            return None
        apps = []
        for line in lines:
            parts = [p.strip() for p in line.split(",")]
            if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
                apps.append((int(parts[0]), int(parts[1]) * (1 << 20)))
        return apps

    def free_bytes(self, reading: dict[str, Any]) -> int | None:
        """The device's free memory in a reading (torch's figure), None on the CPU."""
        return reading.get("torch_free_bytes")
