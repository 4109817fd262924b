"""After `make demo`: the chat page as a newcomer first sees it, in headless Chromium (as tests/test_browser.py).

    make demo-page       # after `make demo`; CI runs both (.ci/run)

It serves the demo's adapter (model/) with `python app.py`, which starts from the adapter's own decoding settings
(model/generation_config.json, the ones its report measured), and asks the Compare tab the first of the report's
held-out questions: each tuned reply must end with EOS, as the page's status line says. Screenshots go to
artifacts/demo_compare_N.png. Not part of `make test`: it needs the demo's model and takes a few minutes.
"""

import json

import pytest
from conftest import ARTIFACTS, ROOT, serve_app

DEMO_MODEL = ROOT / "model"
QUESTIONS = 3  # the base model's side can run to the full 512 tokens: about a minute a question on 2 CPU cores


def test_the_demo_adapter_ends_its_replies_to_held_out_questions_on_the_page(browser, tmp_path):
    from playwright.sync_api import expect

    report_file = DEMO_MODEL / "eval.json"
    if not report_file.is_file():
        pytest.fail(f"no {report_file}: run `make demo` first.")
    questions = json.loads(report_file.read_text())["prompts"][:QUESTIONS]
    assert len(questions) == QUESTIONS

    with serve_app(["--adapter", str(DEMO_MODEL)], tmp_path / "app.log") as url:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        expect(page.get_by_text("the model's own, from its generation_config.json")).to_be_visible(timeout=30_000)
        page.get_by_role("tab", name="Compare with the base model").click()
        box, status = page.get_by_placeholder("One message, two answers"), page.locator("#compare-status")
        ARTIFACTS.mkdir(exist_ok=True)
        for number, question in enumerate(questions, 1):
            page.locator("#compare-clear").click()
            expect(page.locator("#tuned-chat .message")).to_have_count(0)
            box.fill(question)
            box.press("Enter")
            expect(status).to_contain_text("Tuned:", timeout=600_000)  # written once both replies are done
            page.screenshot(path=ARTIFACTS / f"demo_compare_{number}.png", full_page=True)
            tuned = page.locator("#tuned-chat .message.bot").inner_text().strip()
            assert tuned, f"no tuned reply to {question!r}"
            assert "Tuned: ended (EOS)" in status.inner_text(), f"{question!r}: {status.inner_text()}\n{tuned}"
        page.close()
