"""The command line as a user runs it: a real process, real stdin/stdout, real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fulmine import LLM, SamplingParams

FULMINE = [sys.executable, "-m", "fulmine"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def run(*args: str, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FULMINE, *args], input=stdin, capture_output=True, text=True, timeout=timeout, env=ENV)


@pytest.fixture(scope="module")
def embedded() -> LLM:
    return LLM(progress=False)


@pytest.mark.slow
def test_generate_streams_the_same_answer_as_the_api(embedded: LLM) -> None:
    question = "What is the capital of France?"
    result = run("generate", question, "--temperature", "0", "--max-tokens", "24", "--stats")
    assert result.returncode == 0, result.stderr
    expected = embedded.chat([{"role": "user", "content": question}], SamplingParams(temperature=0, max_tokens=24))
    assert result.stdout == expected.text + "\n"
    assert "TTFT" in result.stderr and "tok/s" in result.stderr


@pytest.mark.slow
def test_chat_keeps_the_conversation(embedded: LLM) -> None:
    result = run("chat", "--temperature", "0", "--max-tokens", "16", stdin="Hi, I am Ada.\nWhat did I say?\n")
    assert result.returncode == 0, result.stderr
    params = SamplingParams(temperature=0, max_tokens=16)
    first = embedded.chat([{"role": "user", "content": "Hi, I am Ada."}], params).text
    second = embedded.chat(
        [
            {"role": "user", "content": "Hi, I am Ada."},
            {"role": "assistant", "content": first},
            {"role": "user", "content": "What did I say?"},
        ],
        params,
    ).text
    assert result.stdout == f"> {first}\n> {second}\n> "
    assert result.stderr.count("TTFT") == 2


@pytest.mark.slow
def test_ctrl_c_stops_the_answer_not_the_program() -> None:
    proc = subprocess.Popen(
        [*FULMINE, "chat", "--ignore-eos", "--max-tokens", "4000"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("Tell me a very long story.\n")
    proc.stdin.flush()
    assert proc.stdout.read(8)  # the prompt and the first streamed characters
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    proc.stdin.write("/exit\n")
    proc.stdin.flush()
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "interrupted" in stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "/no/such/model"], "does not exist"),
        (["--temperature", "-1"], "temperature must be in [0, 100]"),
        (["--top-p", "0"], "top_p must be in (0, 1]"),
        (["--max-tokens", "0"], "max_tokens must be >= 1"),
        (["--max-num-seqs", "0"], "max_num_seqs must be >= 1"),
    ],
)
def test_bad_input_is_a_clear_error_not_a_traceback(args: list[str], message: str) -> None:
    result = run("generate", "hi", *args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_unknown_architecture_names_the_supported_ones(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "vocab_size": 10}))
    result = run("generate", "hi", "--model", str(tmp_path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "GPT2LMHeadModel" in result.stderr and "LlamaForCausalLM" in result.stderr


def test_prompt_longer_than_the_context_window(tiny_llama: Path) -> None:
    result = run("generate", "word " * 200, "--raw", "--model", str(tiny_llama), "--max-model-len", "64")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "context window is 64" in result.stderr


def test_python_api_errors(tiny_llama: Path) -> None:
    from fulmine import ConfigError

    llm = LLM(str(tiny_llama), progress=False, max_model_len=32)
    with pytest.raises(ConfigError, match="context window"):
        llm.generate("word " * 100)
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        llm.generate([[10**9]])
    with pytest.raises(ConfigError, match="temperature"):
        SamplingParams(temperature=-0.5)
    with pytest.raises(TypeError, match="unknown engine arguments"):
        LLM(str(tiny_llama), no_such_flag=1)
    out = llm.generate("word", SamplingParams(max_tokens=2))[0]  # still works
    assert out.usage["completion_tokens"] == 2 and out.usage["total_tokens"] == len(out.prompt_token_ids) + 2


def _wait_healthy(proc: subprocess.Popen[str], base: str) -> None:
    """Until the `fulmine serve` process answers /health with 200."""
    import httpx

    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
        time.sleep(0.1)


def test_serve_command_end_to_end(tiny_llama: Path) -> None:
    """`fulmine serve` as the README runs it: flags, FULMINE_API_KEY, /health, a request, Ctrl-C."""
    import httpx

    from fulmine.benchmark.servers import free_port

    port = free_port()
    env = {**ENV, "FULMINE_API_KEY": "from-env"}
    proc = subprocess.Popen(
        [
            *FULMINE,
            "serve",
            "--model",
            str(tiny_llama),
            "--port",
            str(port),
            "--served-model-name",
            "tiny",
            "--api-key",
            "from-flag",
            "--max-model-len",
            "128",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(proc, base)
        body = {"model": "tiny", "messages": [{"role": "user", "content": "zebra-secret"}], "max_tokens": 3}
        url = f"{base}/v1/chat/completions"
        assert httpx.post(url, json=body, timeout=30).status_code == 401
        for key in ("from-flag", "from-env"):
            response = httpx.post(url, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)
            assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 3
        assert httpx.get(f"{base}/").status_code == 200  # the chat page needs no key
    finally:
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert "serving the OpenAI API" in stderr and "Traceback" not in stderr
    assert "zebra-secret" not in stderr  # prompts are not logged by default


def test_serve_drains_on_sigterm(tiny_llama: Path) -> None:
    """A real SIGTERM to `fulmine serve` with a stream in flight: the stream ends whole, the process exits 0."""
    import httpx

    from fulmine.benchmark.servers import free_port

    port = free_port()
    command = [*FULMINE, "serve", "--model", str(tiny_llama), "--port", str(port), "--served-model-name", "tiny"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(proc, base)
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "count"}],
            "max_tokens": 200,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            next(line for line in lines if '"content"' in line)  # streaming has begun
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        _, stderr = proc.communicate(timeout=60)  # it exits by itself once the stream is done
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rest[-1] == "data: [DONE]"
    usage = json.loads(next(line for line in reversed(rest) if '"usage": {' in line)[6:])["usage"]
    assert usage["completion_tokens"] == 200, rest[-6:]
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
