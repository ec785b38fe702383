"""Tensor parallel across two hosts: two network namespaces joined by a veth pair (the test makes and
removes them; nothing leaves this machine), the head node in one generating, a headless worker node
in the other (`fulmine serve --node-rank 1`), one rank each; the text equals one process's."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ADDRESSES = ("10.77.0.1", "10.77.0.2")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def two_hosts() -> Iterator[tuple[tuple[str, str], tuple[str, str]]]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 (network namespaces)")
    tag = os.getpid() % 100000
    names, links = (f"fulmine-a-{tag}", f"fulmine-b-{tag}"), (f"fva{tag}", f"fvb{tag}")
    try:
        for name in names:
            _ip("netns", "add", name)
        _ip("link", "add", links[0], "type", "veth", "peer", "name", links[1])
        for name, link, address in zip(names, links, ADDRESSES):
            _ip("link", "set", link, "netns", name)
            _ip("-n", name, "addr", "add", f"{address}/24", "dev", link)
            _ip("-n", name, "link", "set", link, "up")
            _ip("-n", name, "link", "set", "lo", "up")
        yield names, links
    except subprocess.CalledProcessError as error:
        pytest.skip(f"network namespaces cannot be made here: {error.stderr.strip()}")
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _fulmine(namespace: str, link: str, *args: str) -> list[str]:
    env = ["env", f"GLOO_SOCKET_IFNAME={link}"]
    return ["ip", "netns", "exec", namespace, *env, sys.executable, "-m", "fulmine", *args]


def test_two_hosts_generate_what_one_process_does(two_hosts, tiny_llama: Path) -> None:
    (head_ns, worker_ns), (head_link, worker_link) = two_hosts
    dense = ["--model", str(tiny_llama), "--dtype", "float32", "--weight-dtype", "float32", "--speculative", "off"]
    group = ["--tensor-parallel-size", "2", "--nnodes", "2", "--master-addr", ADDRESSES[0], "--master-port", "29517"]
    ask = ["--temperature", "0", "--max-tokens", "12", "--raw", "The quick brown fox"]
    worker = subprocess.Popen(
        _fulmine(worker_ns, worker_link, "serve", *dense, *group, "--node-rank", "1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        head = subprocess.run(
            _fulmine(head_ns, head_link, "generate", *dense, *group, "--node-rank", "0", *ask),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert head.returncode == 0, head.stderr[-2000:]
        assert worker.wait(timeout=60) == 0, worker.communicate()[1][-2000:]  # the head's exit stops it
    finally:
        if worker.poll() is None:
            worker.kill()
    alone = subprocess.run(
        [sys.executable, "-m", "fulmine", "generate", *dense, "--executor", "torch", *ask],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert alone.returncode == 0, alone.stderr[-2000:]
    assert head.stdout == alone.stdout and head.stdout.strip()
