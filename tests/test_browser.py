"""The `serve` page in a real browser: headless Chromium driven by Playwright, on the tiny models of test_serve.

    apt-get install -y chromium && pip install playwright     # Playwright's own browser download is not needed
    pytest tests/test_browser.py

Chat: a typed message gets a reply streamed token by token; an Emotion picked in the side panel reaches the prompt of
a model trained with it. Compare: two replies, a vote, the reveal, the row in
SQLite, and the conversation going on from the chosen reply. Two pages voting at once; markup and a 200,000-character
message shown safely. Each tab is screenshotted into the test's temp folder (and copied to /tmp/gpt2ft_screens/ to
look at). Everything skips, saying why, when Chromium or Playwright is missing.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from test_serve import (  # helpers shared with the HTTP tests
    RecordingModel,
    build_served_pair,
    conditioned_tokenizer,
    free_port,
    served,
    start_live_app,
)

from gpt2ft.votes import read_votes

CHROMIUM = Path(os.environ.get("GPT2FT_CHROMIUM", "/usr/bin/chromium"))
# The flags known to work for root in a container: no sandbox, no GPU, no network side traffic.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENS_COPY = Path("/tmp/gpt2ft_screens")
TIMEOUT_MS = 30_000

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")
if not CHROMIUM.is_file():
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium)", allow_module_level=True)

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]


@pytest.fixture(scope="module")
def page_app(tmp_path_factory):
    tuned, base = build_served_pair(tmp_path_factory.mktemp("served"))
    votes_db = tmp_path_factory.mktemp("votes") / "votes.sqlite"
    app, url = start_live_app(tuned, votes_db, time_limit=30, concurrency=4)
    yield {"url": url, "votes_db": votes_db, "tuned": str(tuned), "base": str(base)}
    app.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def screens(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("screens")


@pytest.fixture
def page(browser, page_app):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(page_app["url"])
    page.locator("#chat-input textarea").wait_for()
    yield page
    context.close()


def save_screenshot(page, screens: Path, name: str) -> Path:
    path = screens / name
    page.screenshot(path=str(path), full_page=True)
    SCREENS_COPY.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, SCREENS_COPY / name)
    return path


def wait_for_chat_reply(page, replies: int) -> None:
    """Until the Chat tab shows `replies` replies and the last one is complete (Send is off while one streams)."""
    page.wait_for_function(
        "n => document.querySelectorAll('#chat-bot [data-testid=\"bot\"]').length === n"
        " && !document.querySelector('#chat-send').disabled",
        arg=replies,
    )


def wait_until_ready_to_vote(page) -> None:
    page.wait_for_function("() => !document.querySelector('#vote-a').disabled")


def send_to_both(page, message: str) -> None:
    page.get_by_role("tab", name="Compare (blind)").click()
    page.locator("#compare-input textarea").fill(message)
    page.locator("#compare-input textarea").press("Enter")
    wait_until_ready_to_vote(page)


def test_chat_streams_a_reply(page, screens):
    # Record every text the reply bubble shows, to see it grow token by token rather than appear at once.
    page.evaluate(
        """() => {
            window.__replyTexts = [];
            new MutationObserver(() => {
                const bots = document.querySelectorAll('#chat-bot [data-testid="bot"]');
                const text = bots.length ? bots[bots.length - 1].innerText : null;
                if (text !== null && window.__replyTexts[window.__replyTexts.length - 1] !== text) {
                    window.__replyTexts.push(text);
                }
            }).observe(document.querySelector('#chat-bot'), {subtree: true, childList: true, characterData: true});
        }"""
    )
    box = page.locator("#chat-input textarea")
    box.fill("Hi! How was your weekend?")
    box.press("Enter")
    page.locator('#chat-bot [data-testid="user"]').filter(has_text="How was your weekend?").wait_for()
    wait_for_chat_reply(page, 1)
    assert box.input_value() == ""
    texts = [text.strip() for text in page.evaluate("window.__replyTexts") if text.strip() not in ("", "…")]
    assert len(texts) >= 2, texts  # partial texts before the finished reply
    assert page.locator("#model-line").inner_text().count("perplexity") == 2
    save_screenshot(page, screens, "chat.png")


def test_compare_vote_reveal_and_stored_row(page, page_app, screens):
    before = len(read_votes(page_app["votes_db"]))
    send_to_both(page, "Do you like tea?")
    # Blind: the labels are the plain letters and nothing on the page says whose reply is whose.
    assert page.locator("#reply-a").get_by_text("Reply A", exact=True).is_visible()
    assert page.locator("#reply-b").get_by_text("Reply B", exact=True).is_visible()
    body = page.locator("body").inner_text()
    assert "(yours)" not in body and "written by" not in body
    save_screenshot(page, screens, "compare_before_vote.png")
    page.get_by_role("button", name="A is better", exact=True).click()
    reveal = page.locator("#reveal")
    reveal.filter(has_text="You voted").wait_for()
    text = reveal.inner_text()
    assert "You voted A is better" in text
    rows = read_votes(page_app["votes_db"])
    assert len(rows) == before + 1
    row = rows[-1]
    assert row["winner"] == "a" and row["conversation"] == [{"role": "user", "content": "Do you like tea?"}]
    title_a = "gpt2_finetuned" if row["model_a"] == page_app["tuned"] else "base"
    assert f"Reply A was written by {title_a}" in text
    assert page.locator("#reply-a").get_by_text(f"Reply A · {title_a}").is_visible()
    save_screenshot(page, screens, "compare.png")
    # The conversation goes on from the chosen reply.
    page.get_by_role("button", name="Continue with Reply A").click()
    page.locator('#compare-bot [data-testid="bot"]').first.wait_for()
    assert page.locator('#compare-bot [data-testid="user"]').count() == 1
    assert page.locator("#compare-input textarea").is_enabled()


def test_results_tab_counts_the_votes(page, page_app, screens):
    send_to_both(page, "What time is it?")
    page.get_by_role("button", name="Tie", exact=True).click()
    page.locator("#reveal").filter(has_text="You voted").wait_for()
    page.get_by_role("tab", name="Results").click()
    page.get_by_role("button", name="Refresh").click()
    table = page.locator("#results-table")
    votes = len(read_votes(page_app["votes_db"]))
    # The table keeps hidden copies of its cells (to measure them): look at the visible ones.
    table.get_by_text("gpt2_finetuned", exact=True).filter(visible=True).first.wait_for()
    assert table.get_by_text(str(votes), exact=True).filter(visible=True).count() >= 1
    save_screenshot(page, screens, "results.png")


def test_two_pages_vote_at_once(browser, page_app):
    pages = []
    for _ in range(2):
        context = browser.new_context()
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(page_app["url"])
        pages.append(page)
    try:
        for index, page in enumerate(pages):
            send_to_both(page, f"Page {index} asks: where are you going?")
        before = len(read_votes(page_app["votes_db"]))
        # Both clicks go out before either answer comes back.
        pages[0].get_by_role("button", name="B is better", exact=True).click(no_wait_after=True)
        pages[1].get_by_role("button", name="Both are bad", exact=True).click(no_wait_after=True)
        for page in pages:
            page.locator("#reveal").filter(has_text="You voted").wait_for()
        rows = read_votes(page_app["votes_db"])[before:]
        assert sorted(row["winner"] for row in rows) == ["b", "both_bad"]
        assert {row["conversation"][0]["content"] for row in rows} == {
            "Page 0 asks: where are you going?",
            "Page 1 asks: where are you going?",
        }
    finally:
        for page in pages:
            page.context.close()


def test_markup_is_shown_as_text_and_a_huge_message_gets_a_notice(page):
    box = page.locator("#chat-input textarea")
    box.fill('<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script> hello <b>there</b>')
    box.press("Enter")
    wait_for_chat_reply(page, 1)
    assert page.evaluate("window.__pwned") is None
    assert "hello" in page.locator('#chat-bot [data-testid="user"]').first.inner_text()
    box.fill("x" * 200_000)
    box.press("Enter")
    page.get_by_text("only its last 8,000 characters were sent").wait_for()
    wait_for_chat_reply(page, 2)
    assert page.locator("text=Traceback").count() == 0 and page.locator("text=Error").count() == 0
    box.fill("   ")
    box.press("Enter")
    page.get_by_text("Type a message first.").wait_for()


def test_an_emotion_picked_in_the_panel_reaches_the_conditioned_model(browser, tiny_model_dir, tmp_path, screens):
    """A page serving a conditioned model (its template takes emotion and act) beside a plain one: the Emotion
    selector is shown, and the label picked there is in the prompt the model gets (recorded by RecordingModel)."""
    from gpt2ft.modeling import load_model, load_tokenizer
    from gpt2ft.serve import build_app, launch_app
    from gpt2ft.votes import init_votes_db

    tokenizer = conditioned_tokenizer(tiny_model_dir)
    tagged = RecordingModel(load_model(str(tiny_model_dir)))
    plain = served(RecordingModel(load_model(str(tiny_model_dir))), load_tokenizer(str(tiny_model_dir)), "plain")
    app = build_app(served(tagged, tokenizer, "tagged"), plain, votes_db=init_votes_db(tmp_path / "votes.sqlite"))
    url = launch_app(app, port=free_port(), block=False, quiet=True)
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url)
        page.locator("#chat-input textarea").wait_for()
        emotion = page.get_by_label("Emotion", exact=True)
        assert emotion.input_value() == "any" and page.get_by_label("Act", exact=True).is_visible()
        emotion.click()
        page.get_by_role("option", name="sadness", exact=True).click()
        assert emotion.input_value() == "sadness"
        box = page.locator("#chat-input textarea")
        box.fill("Do you like tea ?")
        box.press("Enter")
        wait_for_chat_reply(page, 1)
        assert tokenizer.decode(tagged.prompts[-1]).endswith("Do you like tea ?<|endoftext|>[emotion: sadness]\n")
        save_screenshot(page, screens, "chat_emotion.png")
    finally:
        context.close()
        app.close()


# Words of the visible header cells that the browser broke across lines ("vo / te / s").
BROKEN_HEADER_WORDS = """() => {
    const broken = [];
    for (const th of document.querySelectorAll('#results-table th')) {
        if (th.offsetParent === null || !th.innerText.trim()) continue;
        const walker = document.createTreeWalker(th, NodeFilter.SHOW_TEXT);
        for (let node = walker.nextNode(); node; node = walker.nextNode()) {
            if (!node.parentElement.offsetParent) continue;
            for (const match of node.data.matchAll(/\\S+/g)) {
                const range = document.createRange();
                range.setStart(node, match.index);
                range.setEnd(node, match.index + match[0].length);
                const tops = new Set(Array.from(range.getClientRects()).map(rect => Math.round(rect.top)));
                if (tops.size > 1) broken.push(match[0]);
            }
        }
    }
    return broken;
}"""


def test_results_name_models_by_folder_with_the_path_on_hover(browser, tmp_path_factory, screens):
    """Votes of models named by their full paths (an earlier session's folders): at a normal window width the table
    shows each by its folder's name, the path in the cell's title, and no header breaks inside a word."""
    from gpt2ft.votes import init_votes_db, record_vote

    tuned, base = build_served_pair(tmp_path_factory.mktemp("served_paths"))
    votes_db = init_votes_db(tmp_path_factory.mktemp("votes_paths") / "votes.sqlite")
    run = "/content/drive/MyDrive/gpt2ft/experiments/2025-06-01-learning-rate-5e-5"
    conversation = [{"role": "user", "content": "Hi"}]
    for winner in ("a", "b", "tie", "a", "both_bad"):
        record_vote(votes_db, conversation, "A.", "B.", f"{run}/gpt2_preferred", f"{run}/gpt2_finetuned", winner, {})
    app, url = start_live_app(tuned, votes_db, time_limit=30, concurrency=2)
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url)
        page.locator("#chat-input textarea").wait_for()
        page.get_by_role("tab", name="Results").click()
        table = page.locator("#results-table")
        cell = table.get_by_text("gpt2_preferred", exact=True).filter(visible=True).first
        cell.wait_for()
        assert cell.get_attribute("title") == f"{run}/gpt2_preferred"
        assert table.locator(f'[title="{run}/gpt2_finetuned"]').filter(visible=True).first.inner_text() == (
            "gpt2_finetuned"
        )
        assert run not in table.inner_text()
        assert page.evaluate(BROKEN_HEADER_WORDS) == []
        save_screenshot(page, screens, "results_paths.png")
    finally:
        context.close()
        app.close()
