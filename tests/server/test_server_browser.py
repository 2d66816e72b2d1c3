"""The page at / in a real browser: playwright driving Debian's headless chromium against a real uvicorn.

Playwright cannot download its own browser here; Debian's `chromium` package is used (README: apt-get install
-y chromium). Without it these tests skip with the reason, except under CI=true, where that is a failure.
"""

from __future__ import annotations

import os
import shutil

import pytest

from srv import wait_until
from t2i.server import Limits

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def _missing(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the browser tests must run)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed (pip install -e '.[test]')")
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        _missing("no chromium found (apt-get install -y chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, live):
    url = live(limits=Limits(max_steps=5000, max_pixel_steps=10**10))
    context = browser.new_context()
    pg = context.new_page()
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(url + "/")
    pg.wait_for_function("document.getElementById('status').textContent === 'ready'", timeout=30_000)
    pg.url_base = url
    yield pg
    context.close()
    assert not errors, errors


def set_fast(page, steps=2):
    page.fill("#steps", str(steps))
    page.fill("#width", "32")
    page.fill("#height", "32")


def test_type_a_prompt_generate_see_image_and_seed(page):
    page.fill("#prompt", "a red circle")
    set_fast(page)
    page.fill("#seed", "1234")
    # A1111's "Schedule type" beside the sampler: Automatic by default, the server's schedulers, sent as `scheduler`
    assert page.input_value("#scheduler") == "Automatic"
    assert {"Automatic", "Karras", "Exponential"} <= set(page.locator("#scheduler option").all_inner_texts())
    page.select_option("#scheduler", "Exponential")
    with page.expect_request(lambda r: r.url.endswith("/t2i/v1/jobs") and r.method == "POST") as sent:
        page.click("#generate")
    assert sent.value.post_data_json["scheduler"] == "Exponential"
    card = page.locator("#gallery .card").first
    card.wait_for(timeout=30_000)
    assert card.locator(".seed").inner_text() == "Seed: 1234"
    assert card.locator("img").evaluate("img => img.complete && img.naturalWidth") == 32
    assert card.locator(".params").text_content().startswith("a red circle\nSteps: 2")
    assert "Schedule type: Exponential" in card.locator(".params").text_content()
    # re-use the last seed after a random one
    page.click("#random-seed")
    assert page.input_value("#seed") == "-1"
    page.click("#reuse-seed")
    assert page.input_value("#seed") == "1234"


def test_inpaint_with_a_painted_mask(page):
    page.fill("#prompt", "a blue star")
    set_fast(page, steps=4)
    page.fill("#seed", "3")
    page.click("#generate")
    page.locator("#gallery .card").first.wait_for(timeout=30_000)
    page.click("#gallery .card .to-img2img")  # the result becomes the init image
    page.wait_for_function("document.getElementById('init-canvas').width === 32")
    page.locator("#mask-canvas").scroll_into_view_if_needed()
    box = page.locator("#mask-canvas").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.3)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.6, steps=5)
    page.mouse.up()
    page.fill("#strength", "1")
    page.click("#generate")
    page.locator("#gallery .card").nth(1).wait_for(timeout=30_000)
    params = page.locator("#gallery .card .params").first.text_content()
    assert "Mask blur" in params and "Denoising strength: 1" in params


def test_interrupt_a_long_job(page):
    page.fill("#prompt", "a long one")
    set_fast(page, steps=4000)
    page.click("#generate")
    page.wait_for_function("document.getElementById('progress').value > 0", timeout=30_000)
    page.click("#interrupt")
    wait_until(lambda: "interrupted" in page.inner_text("#status"), timeout=30)
    assert page.is_enabled("#generate")


def test_drop_a_png_to_read_its_parameters(page, tmp_path):
    import base64

    import httpx

    r = httpx.post(page.url_base + "/sdapi/v1/txt2img",
                   json={"prompt": "a green square", "seed": 77, "steps": 3, "width": 32, "height": 32}, timeout=60)
    data = r.json()["images"][0]
    page.evaluate("""async (b64) => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], 'x.png', {type: 'image/png'}));
        const drop = document.getElementById('drop');
        drop.dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
    }""", data)
    page.wait_for_function("document.getElementById('prompt').value === 'a green square'", timeout=10_000)
    assert page.input_value("#seed") == "77" and page.input_value("#steps") == "3"
    assert "Seed: 77" in page.inner_text("#png-info")
    assert base64.b64decode(data)[:4] == b"\x89PNG"


def test_the_api_page_works_offline(browser, live):
    """/docs in chromium with every request to another host refused: Swagger UI comes from package files and
    lists the API's operations."""
    url = live()
    context = browser.new_context()
    elsewhere = []

    def only_here(route):
        if route.request.url.startswith(url):
            return route.continue_()
        elsewhere.append(route.request.url)
        return route.abort()

    context.route("**/*", only_here)
    pg = context.new_page()
    pg.goto(url + "/docs")
    pg.locator(".opblock").first.wait_for(timeout=30_000)
    assert pg.locator(".opblock").count() >= 30  # an operation block per route of the API
    assert "/sdapi/v1/txt2img" in pg.locator("#swagger-ui").inner_text()
    context.close()
    assert elsewhere == []
