"""The chat page in a real browser: Debian's chromium, headless, driven by Playwright, against a
real server on loopback."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fulmine.engine.outputs import RequestOutput
from tests.e2e.server import RunningServer, engine_loader, serve, wait_for_first_token

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
playwright_api = pytest.importorskip("playwright.sync_api")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (scripts/test.sh installs it)"),
]
MODEL = "SmolLM2-135M-Instruct"
# FULMINE_UPDATE_SCREENSHOT=1 refreshes the README's picture; otherwise it goes to a temp dir
SCREENSHOT = (
    Path(__file__).resolve().parents[2] / "docs" / "chat-page.png"
    if os.environ.get("FULMINE_UPDATE_SCREENSHOT")
    else Path(tempfile.gettempdir()) / "fulmine-chat-page.png"
)


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    with serve(engine_loader(None), served_model_name=(MODEL,)) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with playwright_api.sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        context = p.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            headless=True,
            viewport={"width": 1100, "height": 760},
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--no-first-run",
                "--disable-component-update",
                "--disable-sync",
                "--disable-quic",
            ],
        )
        yield context
        context.close()


@pytest.fixture
def page(browser, server: RunningServer):
    page = browser.new_page()
    page.goto(server.base_url + "/")
    page.evaluate("localStorage.clear()")
    page.reload()
    page.wait_for_function("document.getElementById('model').options.length > 0")
    yield page
    page.close()


def slow_engine(server: RunningServer, seconds: float) -> None:
    """Make every engine step take a while, so an answer is still streaming when the test acts."""
    engine = server.engine
    original = type(engine).step.__get__(engine)
    engine.step = lambda: (time.sleep(seconds), original())[1]  # type: ignore[method-assign]


def restore_engine(server: RunningServer) -> None:
    vars(server.engine).pop("step", None)


def set_setting(page, element_id: str, value: str) -> None:
    if page.locator("#settings").is_hidden():
        page.click("#settings-toggle")
    page.fill(f"#{element_id}", value)
    page.dispatch_event(f"#{element_id}", "change")


def ask(page, text: str) -> None:
    page.fill("#input", text)
    page.keyboard.press("Enter")


def test_answer_streams_with_speed_and_screenshot(page, server: RunningServer) -> None:
    set_setting(page, "temperature", "0")
    set_setting(page, "max-tokens", "200")
    page.click("#settings-toggle")  # closed again, for the screenshot
    ask(page, "Write a long poem about lightning and thunder, with a title in bold.")
    answer = page.locator(".message.assistant .content").last
    page.wait_for_function("document.querySelector('.message.assistant .content').textContent.length > 60")
    partial = answer.text_content() or ""
    assert page.locator("#stop").is_visible()  # still streaming: the text arrives piece by piece
    page.screenshot(path=str(SCREENSHOT))  # mid-answer, real speed, for the README
    page.wait_for_function(
        f"document.querySelector('.message.assistant .content').textContent.length > {len(partial) + 20}"
    )
    page.locator("#send").wait_for(state="visible", timeout=60000)
    stats = page.locator(".message.assistant .numbers").last.text_content() or ""
    assert re.search(r"TTFT \d+ ms", stats) and re.search(r"[\d.]+ tok/s", stats), stats
    assert re.search(r"\d+ tokens", stats) and "cached" in stats


def test_stop_cancels_on_the_server(page, server: RunningServer) -> None:
    set_setting(page, "max-tokens", "2000")
    slow_engine(server, 0.05)
    try:
        ask(page, "Tell me a very long story about a dragon and a knight.")
        page.wait_for_function("document.querySelector('.message.assistant .content').textContent.length > 5")
        assert server.engine.has_unfinished()
        page.click("#stop")
        server.wait_idle(timeout=5)  # aborted in the engine, KV blocks freed
    finally:
        restore_engine(server)
    assert "stopped" in (page.locator(".message.assistant .numbers").last.text_content() or "")
    assert page.locator("#send").is_visible() and page.locator("#input").is_enabled()


def test_second_turn_reuses_the_cache(page, server: RunningServer) -> None:
    set_setting(page, "temperature", "0")
    set_setting(page, "max-tokens", "24")
    for turn, text in enumerate(["Hello! Who are you?", "Tell me one more thing about yourself."]):
        ask(page, text)
        page.wait_for_function(
            f"document.querySelectorAll('.message.assistant .numbers')[{turn}]"
            ".dataset.cached !== undefined && document.querySelectorAll("
            f"'.message.assistant .numbers')[{turn}].dataset.cached !== ''"
        )
        page.locator("#send").wait_for(state="visible")
    cached = page.locator(".message.assistant .numbers").nth(1).get_attribute("data-cached")
    assert cached is not None and int(cached) > 16  # the whole first turn, in whole blocks


def answer_with(page, server: RunningServer, text: str):
    """Ask, and have the answer be exactly `text` (delivered as the first piece, then nothing: the
    tiny random model's own bytes could add a stray backtick or ** and change what is rendered)."""
    async_engine = server.state.engine
    assert async_engine is not None
    original = async_engine._deliver
    injected = {"done": False}

    def inject(items: list[tuple[str, object]]) -> None:
        for _, item in items:
            if isinstance(item, RequestOutput) and item.new_text:
                item.new_text, injected["done"] = ("" if injected["done"] else text), True
        original(items)  # type: ignore[arg-type]

    async_engine._deliver = inject  # type: ignore[method-assign]
    set_setting(page, "max-tokens", "32")  # the default (the context window) can ramble for minutes
    try:
        ask(page, "Say something.")
        page.locator("#send").wait_for(state="visible", timeout=60000)
    finally:
        del async_engine._deliver
    return page.locator(".message.assistant .content").last


def test_model_output_is_never_executed_as_html(page, server: RunningServer) -> None:
    payload = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2"> **bold** `code`'
    content = answer_with(page, server, payload)
    assert "<script>window.__pwned = 1</script>" in (content.text_content() or "")
    assert page.evaluate("window.__pwned") is None
    assert content.locator("script").count() == 0 and content.locator("img").count() == 0
    assert content.locator("strong").count() == 1 and content.locator("code").count() == 1


def test_markdown_lists_tables_and_links(page, server: RunningServer) -> None:
    """A loose ordered list numbers 1, 2 (the hand-written renderer restarted it at each blank line),
    and what a real answer holds renders: a table, a fenced block, a link that opens safely."""
    text = (
        "# Title\n\n1. first\n\n2. second\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n"
        "```python\nprint('<b>')\n```\n\n[docs](https://example.com) [bad](javascript:alert(1))"
    )
    content = answer_with(page, server, text)
    assert content.locator("ol").count() == 1 and content.locator("ol li").count() == 2
    assert content.locator("h3").count() == 1 and content.locator("table td").count() == 2
    assert content.locator("pre code").text_content() == "print('<b>')\n"
    link = content.locator("a[href='https://example.com']")
    assert link.get_attribute("target") == "_blank" and "noopener" in (link.get_attribute("rel") or "")
    assert content.locator("a[href^='javascript']").count() == 0


def test_errors_are_readable_and_the_page_recovers(browser, tiny_llama) -> None:
    with serve(engine_loader(str(tiny_llama)), served_model_name=("tiny",), api_key=("secret",)) as server:
        page = browser.new_page()
        page.goto(server.base_url + "/")  # the page itself needs no key
        error = page.locator("#error")
        error.wait_for(state="visible")
        assert "401" in (error.text_content() or "") and "API key" in (error.text_content() or "")
        set_setting(page, "api-key", "secret")
        page.wait_for_function("document.getElementById('model').options.length > 0")
        assert error.is_hidden()
        set_setting(page, "max-tokens", "100000")  # longer than the context window: a 400
        ask(page, "hello")
        error.wait_for(state="visible")
        assert "(400)" in (error.text_content() or "") and "context length" in (error.text_content() or "")
        set_setting(page, "max-tokens", "8")
        ask(page, "hello again")
        page.wait_for_function(
            "document.querySelectorAll('.message.assistant .numbers')[1]?.textContent.includes('tokens')"
        )
        assert error.is_hidden()
        page.close()


def test_busy_server_is_a_readable_429(browser, tiny_llama) -> None:
    loader = engine_loader(str(tiny_llama), max_num_seqs=1, max_model_len=256)
    with serve(loader, served_model_name=("tiny",), max_queue=0) as server:
        slow_engine(server, 0.05)
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 200,
            "stream": True,
            "logprobs": True,
            "ignore_eos": True,
        }
        page = browser.new_page()
        page.goto(server.base_url + "/")
        page.wait_for_function("document.getElementById('model').options.length > 0")
        with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", json=body, timeout=60) as busy:
            lines = wait_for_first_token(busy)  # noqa: F841 (held open: another user holds the only slot)
            ask(page, "hello")
            error = page.locator("#error")
            error.wait_for(state="visible")
            assert "busy" in (error.text_content() or "") and "(429)" in (error.text_content() or "")
            assert page.locator("#send").is_visible() and page.locator("#input").is_enabled()
        restore_engine(server)
        server.wait_idle(timeout=10)
        ask(page, "hello again")  # the page recovers once the server has room
        page.wait_for_function(
            "document.querySelectorAll('.message.assistant .numbers')[1]?.textContent.includes('tokens')"
        )
        assert page.locator("#error").is_hidden()
        page.close()


def test_json_mode_answers_with_a_json_object(page, server: RunningServer) -> None:
    sent: list[dict] = []
    page.on(
        "request",
        lambda request: (
            sent.append(json.loads(request.post_data)) if request.url.endswith("/v1/chat/completions") else None
        ),
    )
    set_setting(page, "temperature", "0")
    set_setting(page, "max-tokens", "60")
    page.check("#json-mode")
    page.dispatch_event("#json-mode", "change")
    ask(page, "Describe a cat.")
    page.locator("#send").wait_for(state="visible", timeout=60000)
    assert sent and sent[-1]["response_format"] == {"type": "json_object"}
    answer = page.locator(".message.assistant .content").last.text_content() or ""
    assert answer.lstrip().startswith("{"), answer
    page.reload()  # the setting is kept
    assert page.is_checked("#json-mode")


def test_thinking_streams_collapsed_then_says_how_long(browser, tiny_thinker_factory) -> None:
    """A reasoning model (a tiny Qwen3 whose template opens <think>; the server caps thinking at 6
    tokens): the thought streams into a collapsed block, as text, and is summed up once answered."""
    loader = engine_loader(str(tiny_thinker_factory("r1_opened")), speculative="off")
    with serve(loader, served_model_name=("thinker",), reasoning_budget=6) as running:
        page = browser.new_page()
        try:
            page.goto(running.base_url + "/")
            page.evaluate("localStorage.clear()")
            page.reload()
            page.wait_for_function("document.getElementById('model').options.length > 0")
            set_setting(page, "max-tokens", "16")
            ask(page, "Count the primes below 20.")
            page.locator("#send").wait_for(state="visible", timeout=60000)
            thinking = page.locator(".message.assistant .thinking").last
            assert thinking.is_visible() and thinking.get_attribute("open") is None  # collapsed
            summary = thinking.locator("summary").text_content() or ""
            assert re.fullmatch(r"Thought for \d+\.\d s, 7 tokens", summary), summary
            assert thinking.locator(".thought *").count() == 0  # the thought is text, never HTML
            assert page.locator(".message.assistant .content").last.text_content()
        finally:
            page.close()
