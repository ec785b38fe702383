"""Start the servers that side-by-side mode compares, on free loopback ports, and stop them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    base_url: str  # .../v1

    def peak_rss_mb(self) -> float | None:
        """The server process's peak resident memory so far (Linux), else None."""
        try:
            with open(f"/proc/{self.process.pid}/status") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
        except (OSError, ValueError, IndexError):
            pass
        return None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()


def _wait_ready(server: Server, timeout: float) -> Server:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise SystemExit(f"fulmine bench: {server.name} server exited with code {server.process.returncode}")
        try:
            if httpx.get(f"{server.base_url}/models", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    server.stop()
    raise SystemExit(f"fulmine bench: {server.name} server not ready after {timeout:.0f} s")


def start_fulmine(model: str | None, threads: int, engine_args: list[str]) -> Server:
    port = free_port()
    command = [sys.executable, "-m", "fulmine", "serve", "--port", str(port), "--num-threads", str(threads)]
    command += (["--model", model] if model else []) + engine_args
    log_path = os.environ.get("FULMINE_BENCH_SERVER_LOG")  # the server's log, when debugging a benchmark
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 (the child holds it)
    process = subprocess.Popen(command, stdout=log, stderr=log)
    return _wait_ready(Server("fulmine", process, f"http://127.0.0.1:{port}/v1"), 300)


def start_llama_cpp(model: str, threads: int) -> Server:
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError as error:
        raise SystemExit(
            "fulmine bench: --side-by-side needs llama.cpp's server: pip install 'llama-cpp-python[server]'"
        ) from error
    port = free_port()
    command = [
        sys.executable, "-m", "llama_cpp.server", "--model", model, "--port", str(port),
        "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", "4096",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return _wait_ready(Server("llama.cpp", process, f"http://127.0.0.1:{port}/v1"), 300)
