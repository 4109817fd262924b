"""The chat page in a real headless browser: Debian's Chromium, driven by Playwright, against app.py.

`make test` installs Chromium when it is missing and runs as root (apt-get install chromium); elsewhere install it
yourself or point $CHROMIUM at a Chromium/Chrome binary. Screenshots go to artifacts/ (git-ignored).
"""

import pytest
from conftest import ARTIFACTS

pytestmark = [pytest.mark.slow, pytest.mark.browser]


def test_a_message_typed_in_the_page_gets_the_streamed_reply(chat_server, browser):
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1100, "height": 800})
    page.goto(chat_server)
    box = page.get_by_placeholder("Type a message...")
    box.fill("Is the grass green?")
    box.press("Enter")
    expect(page.locator("#chat .message.user")).to_have_text("Is the grass green?", timeout=30_000)
    expect(page.locator("#chat .message.bot")).to_have_text("Yes.", timeout=60_000)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "chat_page.png")

    # The Compare tab: the same message answered by the base model and by the tuned one, side by side.
    page.get_by_role("tab", name="Compare with the base model").click()
    message = page.get_by_placeholder("One message, two answers")
    message.fill("Is the sky blue?")
    message.press("Enter")
    expect(page.locator("#tuned-chat .message.bot")).to_have_text("Yes.", timeout=60_000)
    expect(page.locator("#base-chat .message.user")).to_have_text("Is the sky blue?")
    expect(page.locator("#compare-status")).to_contain_text("Tuned: ended (EOS)", timeout=60_000)
    base_reply = page.locator("#base-chat .message.bot").inner_text().strip()
    assert base_reply and base_reply != "Yes."  # the random base model says something else
    page.screenshot(path=ARTIFACTS / "compare_page.png")
    page.close()
