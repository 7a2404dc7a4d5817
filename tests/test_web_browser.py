"""`ragkit serve` in a real browser (Playwright driving Debian's chromium, headless): a question's answer streams
in with its citations, a citation opens the document scrolled to the highlighted evidence, and every search mode
shows hits. Real models: all-MiniLM-L6-v2 (dense, and its own token vectors for the late stage) and the embedded
SmolLM2-135M-Instruct. Screenshots go to the test's folder, and to $RAGKIT_SCREENSHOTS when set (docs/ keeps one).
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from ragkit.api import Index
from ragkit.config import Settings
from ragkit.service import Service
from ragkit.web.app import create_app

CHROMIUM = "/usr/bin/chromium"
SCREENSHOTS = os.environ.get("RAGKIT_SCREENSHOTS")  # read at import: the tests' fixtures clear RAGKIT_* variables
ARTICLES = ("Oxygen.txt", "1973_oil_crisis.txt", "Amazon_rainforest.txt")
QUESTION = "When did the 1973 oil crisis begin?"
DEEP_QUESTION = "How is oxygen transported in bulk?"  # answered deep in Oxygen.txt (line 129 of 156)


@pytest.fixture(scope="module")
def site(tmp_path_factory, minilm, shared_data):
    """A live `ragkit serve` (uvicorn in a thread) over three SQuAD articles."""
    import uvicorn

    root = tmp_path_factory.mktemp("site")
    (root / "docs").mkdir()
    for name in ARTICLES:
        shutil.copy(shared_data / "squad-v1.1-dev" / "docs" / name, root / "docs" / name)
    settings = Settings(dense_model=str(minilm), late_model=str(minilm), reader="generate", reader_model="embedded",
                        answer_tokens=96)
    index = Index(root / "index", settings)
    index.add(root / "docs")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(Service(index)), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"no browser at {CHROMIUM}: install Debian's chromium (apt-get install chromium), as the "
                    "README's set-up does")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def shoot(page, folder: Path, name: str) -> None:
    page.screenshot(path=str(folder / name), full_page=False)
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SCREENSHOTS) / name), full_page=False)


def in_view(page, selector: str) -> bool:
    """Whether the first element `selector` names starts inside the window (a cited passage may be taller)."""
    return page.evaluate("""(selector) => {
        const box = document.querySelector(selector).getBoundingClientRect();
        return box.top >= 0 && box.top < window.innerHeight;
    }""", selector)


def ask(page, site: str, question: str) -> list[int]:
    """Ask on the page; the answer's length each time its text changed."""
    page.goto(site)
    page.evaluate("""() => {
        window.answerLengths = [];
        const text = document.getElementById('answer-text');
        new MutationObserver(() => window.answerLengths.push(text.textContent.length))
            .observe(text, {childList: true, characterData: true, subtree: true});
    }""")
    page.fill("#q", question)
    page.click("#ask-button")
    page.wait_for_selector("#citations li a", timeout=180_000)
    return page.evaluate("window.answerLengths")


def test_an_answer_streams_in_and_its_citation_opens_the_highlighted_evidence(site, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1100, "height": 800})
    lengths = ask(page, site, QUESTION)
    assert len({n for n in lengths if n > 0}) > 3  # the text grew piece by piece before the citations came
    assert "October 1973" in page.inner_text("#answer-text")
    shoot(page, tmp_path, "ask.png")
    first = page.locator("#citations li a").first
    assert first.inner_text().startswith("1973_oil_crisis.txt:")
    first.click()
    page.wait_for_url("**/document?**")
    assert "1973_oil_crisis.txt" in page.inner_text("h1")
    assert in_view(page, "li.cited") and page.locator("li.cited mark").count() > 0  # the evidence highlighted
    shoot(page, tmp_path, "document.png")


def test_a_citation_deep_in_a_long_document_opens_scrolled_to_its_lines(site, browser):
    page = browser.new_page(viewport={"width": 1100, "height": 800})
    ask(page, site, DEEP_QUESTION)
    links = page.locator("#citations li a")
    places = [links.nth(i).inner_text() for i in range(links.count())]
    deep = next(i for i, place in enumerate(places) if place.startswith("Oxygen.txt:")
                and int(place.split(":")[1].split("-")[0]) > 100)
    line = int(places[deep].split(":")[1].split("-")[0])
    links.nth(deep).click()
    page.wait_for_url("**/document?**")
    assert page.evaluate("window.scrollY") > 0 and in_view(page, f"#L{line}")
    assert page.locator(f"#L{line}").get_attribute("class") == "cited"
    assert page.locator("li.cited mark").count() > 0
    assert page.locator("ol.lines li").count() < 156  # only the neighbourhood of the cited lines


@pytest.mark.parametrize("mode", ["hybrid", "dense", "bm25", "late"])
def test_each_search_mode_shows_hits_with_their_places(site, browser, mode, tmp_path):
    page = browser.new_page(viewport={"width": 1100, "height": 800})
    page.goto(site)
    page.fill("#q", "oil embargo prices")
    page.select_option("#mode", mode)
    page.click("#search-button")
    page.wait_for_selector("#results")
    hits = page.locator("article.hit")
    assert hits.count() > 0
    assert "1973_oil_crisis.txt" in hits.first.locator(".where a").inner_text()
    if mode in ("late", "hybrid"):  # evidence comes from the late stage's token alignment
        assert page.locator("article.hit mark").count() > 0
    if mode == "hybrid":
        shoot(page, tmp_path, "search.png")


def test_the_status_page_runs_an_index_update_and_shows_its_result(site, browser, shared_data):
    page = browser.new_page(viewport={"width": 1100, "height": 800})
    page.goto(site + "/status")
    assert page.inner_text("#files") == str(len(ARTICLES))
    page.click("#index-button")
    page.wait_for_function("document.getElementById('index-message').textContent.includes('unchanged')",
                           timeout=120_000)
    assert f"{len(ARTICLES)} unchanged" in page.inner_text("#index-message")
