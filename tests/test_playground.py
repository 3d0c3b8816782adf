"""The playground at /, in real headless Chromium (Debian's, driven by Playwright) against a live
server with tiny models: streaming, compare columns, stop, errors by their field, chat kept
across a reload, untrusted output shown as text, nothing sent beyond 127.0.0.1, and axe-core's
accessibility audit; screenshots at desktop and phone width go to .artifacts/."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import (
    REPO,
    chromium_path,
    engine_counters,
    local_only,
    served,
    tiny_config,
)
from tests.test_docs import ARTIFACTS
from tests.tiny_models import save_tiny_gpt2, save_tiny_llama
from textgen.auth.keystore import KeyStore

pytestmark = pytest.mark.slow

AXE = REPO / "tests" / "js" / "node_modules" / "axe-core" / "axe.min.js"
# Counts each output's DOM updates, with when they happened (run in the page).
WATCH = """() => {
  window.updates = [];
  const watched = {childList: true, subtree: true, characterData: true};
  new MutationObserver((records) => {
    for (const r of records) {
      const node = r.target.nodeType === 1 ? r.target : r.target.parentElement;
      const column = node.closest('.column');
      if (column && node.closest('.output')) {
        window.updates.push({column: column.getAttribute('aria-label'), t: performance.now()});
      }
    }
  }).observe(document.getElementById('outputs'), watched);
}"""


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Two tiny models with room for long outputs (slow enough to stop, or to see stream)."""
    root = tmp_path_factory.mktemp("playground")
    models = {
        "tiny-llama": save_tiny_llama(root / "tiny-llama", max_positions=2048),
        "tiny-gpt2": save_tiny_gpt2(root / "tiny-gpt2", max_positions=2048),
    }
    with served(tiny_config(models, root / "cache")) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium_path())
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Any, site: str) -> Iterator[Any]:
    # The page forbids eval, which Playwright's waiting uses; test_a_strict_policy checks it.
    context = browser.new_context(bypass_csp=True)
    opened = context.new_page()
    hosts = local_only(opened)
    opened.goto(site)
    opened.wait_for_selector("input[data-kind=model]")
    yield opened
    context.close()
    assert hosts == {"127.0.0.1"}, hosts  # no request left the machine


def choose(page: Any, kind: str, names: list[str]) -> None:
    for box in page.locator(f"input[data-kind={kind}]").all():
        box.set_checked(box.get_attribute("value") in names)


def finished(page: Any, columns: int) -> None:
    stats = "[...document.querySelectorAll('.column .stats')]"
    page.wait_for_function(
        f"{stats}.length === {columns} && {stats}.every(s => s.textContent.includes('finish:'))",
        timeout=60_000,
    )


def test_text_streams_into_the_page(page: Any) -> None:
    page.fill("#prompt", "Once upon a time")
    page.fill("#param-max_new_tokens", "300")
    page.evaluate(WATCH)
    page.click("#generate")
    finished(page, 1)
    updates = page.evaluate("window.updates.length")
    assert updates > 2  # the text grew in several steps, not at once at the end
    stats = page.locator(".column .stats").inner_text()
    assert "TTFT" in stats and "tokens" in stats and "cached" in stats
    assert page.locator(".column .output").inner_text().strip()
    page.set_viewport_size({"width": 1280, "height": 900})
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground-desktop.png"), full_page=True)
    page.set_viewport_size({"width": 390, "height": 844})
    page.screenshot(path=str(ARTIFACTS / "playground-phone.png"), full_page=True)
    # At phone width nothing runs off the side.
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")


def test_compare_streams_four_columns_at_once(page: Any) -> None:
    choose(page, "model", ["tiny-llama", "tiny-gpt2"])
    choose(page, "strategy", ["greedy", "sampling"])
    page.check("#same-seed")
    page.fill("#param-max_new_tokens", "1000")
    page.check("#param-ignore_eos")  # every column writes all its tokens
    page.evaluate(WATCH)
    page.click("#generate")
    finished(page, 4)
    labels = page.locator(".column").evaluate_all("cs => cs.map(c => c.getAttribute('aria-label'))")
    assert sorted(labels) == sorted(
        f"{m} {s}" for m in ("tiny-llama", "tiny-gpt2") for s in ("greedy", "sampling")
    )
    spans = page.evaluate(
        """() => { const by = {};
        for (const u of window.updates) { by[u.column] ??= [u.t, u.t]; by[u.column][1] = u.t; }
        return Object.values(by); }"""
    )
    assert len(spans) == 4
    # Every column was still updating after every other one had started: they streamed together.
    assert max(first for first, _ in spans) < min(last for _, last in spans)


def test_stop_cancels_on_the_server(page: Any, site: str) -> None:
    before = engine_counters(site, "tiny-llama")["cancelled"]
    page.fill("#param-max_new_tokens", "1000")
    page.check("#param-ignore_eos")  # a long output, to stop in the middle
    page.fill("#prompt", "Tell me everything")
    page.click("#generate")
    page.wait_for_function("document.querySelector('.column .output')?.textContent.length > 0")
    page.click("#stop")
    page.wait_for_function(
        "document.querySelector('.column .stats').textContent.includes('stopped')"
    )
    for _ in range(100):  # the engine drops it at its next step
        if engine_counters(site, "tiny-llama")["cancelled"] > before:
            break
        page.wait_for_timeout(100)
    assert engine_counters(site, "tiny-llama")["cancelled"] == before + 1
    text = page.locator(".column .output").inner_text()
    assert 0 < len(text.split()) and "finish:" not in page.inner_text(".column .stats")


def test_an_invalid_parameter_is_explained_by_its_field(page: Any) -> None:
    choose(page, "strategy", ["sampling"])
    page.fill("#param-temperature", "9")
    page.click("#generate")
    page.wait_for_function("document.getElementById('err-temperature').textContent.length > 0")
    message = page.inner_text("#err-temperature")
    assert "temperature" in message and "5.0" in message


def test_chat_sends_the_conversation_and_keeps_it_across_a_reload(page: Any) -> None:
    page.check("input[name=mode][value=chat]")
    page.fill("#system", "You are terse.")
    page.fill("#user-message", "Hello there")
    page.fill("#param-max_new_tokens", "12")
    sent: list[dict[str, Any]] = []
    page.on(
        "request",
        lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/generate") else None,
    )
    page.click("#generate")
    page.wait_for_selector("#conversation li:nth-child(2)")
    assert sent[0]["messages"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hello there"},
    ]
    roles = page.locator("#conversation .role").all_inner_texts()
    assert [r.lower() for r in roles] == ["user", "assistant"]
    reply = page.locator("#conversation textarea").nth(1).input_value()
    assert reply.strip()
    page.reload()
    page.wait_for_selector("input[data-kind=model]")
    page.check("input[name=mode][value=chat]")
    kept = page.locator("#conversation textarea").evaluate_all("ts => ts.map(t => t.value)")
    assert kept == ["Hello there", reply]


def test_model_output_is_shown_as_text_not_run(page: Any) -> None:
    attack = '<img src=x onerror="window.pwned=1"> and **bold** <script>window.pwned=2</script>'
    events = [
        {"model": "tiny-llama", "prompt_index": 0, "index": 0, "text": attack},
        {"model": "tiny-llama", "prompt_index": 0, "index": 0, "text": "",
         "finish_reason": "length", "completion_tokens": 3},
    ]  # fmt: skip
    stream = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    # The server's answer is replaced (this isolates the page's rendering of untrusted text).
    page.route(
        "**/generate",
        lambda route: route.fulfill(status=200, content_type="text/event-stream", body=stream),
    )
    page.click("#generate")
    finished(page, 1)
    output = page.locator(".column .output")
    assert "<img src=x" in output.inner_text()
    assert output.locator("img, script").count() == 0
    assert output.locator("strong").inner_text() == "bold"  # Markdown still renders
    assert page.evaluate("window.pwned") is None


def test_copy_as_curl_and_python(page: Any) -> None:
    page.fill("#prompt", "Hi")
    page.click("#copy-curl")
    curl = page.inner_text("#copied")
    assert curl.startswith("curl -N -X POST http://127.0.0.1:") and '"prompt":"Hi"' in curl
    page.click("#copy-python")
    python = page.inner_text("#copied")
    assert "from openai import OpenAI" in python and "client.completions.create(" in python


def test_a_strict_policy_keeps_scripts_to_textgens_files(browser: Any, site: str) -> None:
    policy = requests.get(site, timeout=30).headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "connect-src 'self'" in policy
    context = browser.new_context()
    page = context.new_page()
    try:
        page.goto(site)
        page.wait_for_selector("input[data-kind=model]")
        page.evaluate(
            """() => { const s = document.createElement('script');
            s.textContent = 'window.ran = 1'; document.body.append(s); }"""
        )
        assert page.evaluate("() => window.ran") is None  # an inline script does not run
    finally:
        context.close()


def test_axe_finds_no_serious_accessibility_violation(browser: Any, site: str) -> None:
    assert AXE.is_file(), "axe-core comes from npm: npm ci --prefix tests/js (make setup-dev)"
    context = browser.new_context(bypass_csp=True)  # to inject axe into the page
    page = context.new_page()
    try:
        page.goto(site)
        page.wait_for_selector("input[data-kind=model]")
        page.add_script_tag(path=str(AXE))
        for mode in ("completion", "chat"):
            page.check(f"input[name=mode][value={mode}]")
            result = page.evaluate("axe.run(document)")
            bad = [
                (v["id"], v["impact"], len(v["nodes"]))
                for v in result["violations"]
                if v["impact"] in ("serious", "critical")
            ]
            assert bad == [], bad
        # Usable from the keyboard: Tab reaches the Generate button.
        page.focus("#prompt") if page.is_visible("#prompt") else None
        for _ in range(40):
            page.keyboard.press("Tab")
            if page.evaluate("document.activeElement.id") == "generate":
                break
        assert page.evaluate("document.activeElement.id") == "generate"
    finally:
        context.close()


def test_with_auth_on_a_key_is_asked_for_and_used(
    browser: Any, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    database = f"sqlite:///{tmp_path / 'textgen.db'}"
    key = KeyStore(database).create("browser")
    config = tiny_config(model_dirs, tmp_path / "cache", AUTH="api_key", DATABASE_URL=database)
    with served(config) as url:
        context = browser.new_context(bypass_csp=True)
        page = context.new_page()
        try:
            page.goto(url)
            page.wait_for_function("!document.getElementById('banner').hidden")
            assert "API key" in page.inner_text("#banner")
            page.fill("#api-key", key)
            page.dispatch_event("#api-key", "change")
            page.wait_for_selector("input[data-kind=model]")
            assert page.is_hidden("#banner")
            page.fill("#param-max_new_tokens", "4")
            page.click("#generate")
            finished(page, 1)
            # Kept for the tab only (sessionStorage), never in localStorage.
            assert page.evaluate("sessionStorage.getItem('textgen.apiKey')") == key
            assert key not in page.evaluate("JSON.stringify(localStorage)")
        finally:
            context.close()
