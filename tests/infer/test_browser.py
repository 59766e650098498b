"""The web page in a real headless Chromium (Debian's package, driven by Playwright; the Makefile's
`browser` target installs it): upload a photo, paint, undo, clear, change the brush, Inpaint, see
the result beside OpenCV's fill of the same hole (the comparison toggle), download it. The result
must differ from the input only inside the painted area."""

import base64
import io
import os

import numpy as np
import pytest
from PIL import Image

from ce_ray.cluster import free_ports
from ce_ray.data.bundled import load_bundled

CHROMIUM = "/usr/bin/chromium"
LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]  # without these Chromium keeps calling out to the network
TIMEOUT_MS = 180_000  # a shared 2-core machine: slow is fine, a hang is not

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(
        not os.path.exists(CHROMIUM),
        reason=f"{CHROMIUM} is missing: `make browser` (apt-get install chromium) installs it",
    ),
]


@pytest.fixture(scope="module")
def page_url(ray_session, tiny_checkpoint):
    from ray import serve
    from ray.serve.context import _get_global_client

    from ce_ray.infer.serve import build_app

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        serve.start(http_options={"host": "127.0.0.1", "port": free_ports(1)[0]})
        client = _get_global_client()
    serve.run(
        build_app(str(tiny_checkpoint), cpus_per_replica=0.5),
        name="test-browser",
        route_prefix="/t-browser",
        logging_config={"enable_access_log": False, "log_level": "WARNING"},
    )
    try:
        yield f"http://127.0.0.1:{client.http_config.port}/t-browser/"  # trailing /: the page's URLs are relative
    finally:
        serve.delete("test-browser")


B64 = (
    "async (blob) => { let s = ''; for (const c of new Uint8Array(await blob.arrayBuffer())) "
    "s += String.fromCharCode(c); return btoa(s); }"
)
CAPTURE_FORM = f"""() => {{
  const b64 = {B64};
  const original = window.fetch;
  window.fetch = async (url, opts) => {{
    let method = null;
    if (opts && opts.body instanceof FormData) {{
      method = opts.body.get("method") || "model";
      const sent = {{}};
      for (const [k, v] of opts.body.entries()) sent[k] = typeof v === "string" ? btoa(v) : await b64(v);
      window.__ceSent = Object.assign(window.__ceSent || {{}}, {{[method]: sent}});
      window.__ceCalls = (window.__ceCalls || 0) + 1;
    }}
    const reply = await original(url, opts);
    if (method) window.__ceReply = Object.assign(window.__ceReply || {{}},
      {{[method]: {{status: reply.status, body: await b64(await reply.clone().blob())}}}});
    return reply;
  }};
}}"""


def test_paint_inpaint_and_download_in_chromium(page_url, tmp_path):
    from playwright.sync_api import sync_playwright

    photo = dict(load_bundled())["skimage/chelsea"]  # 451x300
    h, w = photo.shape[:2]
    Image.fromarray(photo).save(tmp_path / "cat.png")

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 900}, accept_downloads=True)
            page.set_default_timeout(TIMEOUT_MS)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(page_url)
            page.wait_for_function("document.getElementById('model-info').textContent.includes('step')")
            page.set_input_files("#file", str(tmp_path / "cat.png"))
            page.wait_for_selector("#input-canvas[data-ready='1']")
            assert page.is_disabled("#undo") and page.is_enabled("#inpaint")
            assert page.is_visible("#input-canvas") and page.is_hidden("#input-empty")

            box = page.locator("#input-canvas").bounding_box()
            sx, sy = box["width"] / w, box["height"] / h  # screen px per image px

            def stroke(points):  # points in image pixels
                page.mouse.move(box["x"] + points[0][0] * sx, box["y"] + points[0][1] * sy)
                page.mouse.down()
                for x, y in points[1:]:
                    page.mouse.move(box["x"] + x * sx, box["y"] + y * sy, steps=8)
                page.mouse.up()

            page.locator("#brush").fill("20")
            stroke([(40, 250), (120, 260)])  # painted, then cleared
            page.click("#clear")
            assert page.is_disabled("#undo")
            stroke([(150, 80), (260, 90), (300, 150)])  # kept
            page.locator("#brush").fill("8")
            stroke([(380, 30), (430, 40)])  # painted, then undone
            page.click("#undo")

            # Chromium does not expose multipart bodies with blobs to Playwright: record the form
            # fields the page hands to fetch(), and the reply, instead (test instrumentation; the page
            # itself is unchanged).
            page.evaluate(CAPTURE_FORM)
            page.click("#inpaint")
            page.wait_for_function(
                "() => { const r = document.getElementById('result'); return !r.hidden && r.naturalWidth > 0; }"
            )
            assert page.evaluate("document.getElementById('result').naturalWidth") == w
            assert page.is_visible("#result") and page.is_hidden("#result-empty"), "input and result side by side"
            in_box, out_box = page.locator("#input-canvas").bounding_box(), page.locator("#result").bounding_box()
            assert out_box["x"] >= in_box["x"] + in_box["width"] and abs(out_box["y"] - in_box["y"]) < 5
            assert not errors, errors

            page.wait_for_function(
                "() => { const r = document.getElementById('compare-result'); return !r.hidden && r.naturalWidth > 0; }"
            )
            everything = page.evaluate("window.__ceSent")
            assert set(everything) == {"model", "telea"}, "one request for the model, one for the comparison"
            sent = {k: base64.b64decode(v) for k, v in everything["model"].items()}
            reply = page.evaluate("window.__ceReply")["model"]
            telea = page.evaluate("window.__ceReply")["telea"]
            assert reply["status"] == 200 and telea["status"] == 200
            assert base64.b64decode(everything["telea"]["mask"]) == sent["mask"], "the comparison fills the same hole"
            assert sent["model"].decode() == page.evaluate("document.getElementById('model').value") != ""
            body = base64.b64decode(reply["body"])
            assert sent["image"] == (tmp_path / "cat.png").read_bytes(), "the page posts the photo as uploaded"
            mask = np.asarray(Image.open(io.BytesIO(sent["mask"])).convert("L"))
            assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 255}, "a binary mask at the photo's size"
            hole = mask == 255

            # The painted stroke is in the mask; the cleared and the undone ones are not.
            for x, y in [(150, 80), (200, 85), (260, 90), (280, 120), (300, 150)]:
                assert hole[y, x], (x, y)
            for x, y in [(40, 250), (80, 255), (120, 260), (380, 30), (430, 40)]:
                assert not hole[max(0, y - 8) : y + 8, max(0, x - 8) : x + 8].any(), (x, y)
            # Brush 20 screen px -> a stroke roughly that wide in image px.
            col = hole[:, 200]
            assert 0.5 * 20 / sx <= col.sum() <= 2 * 20 / sx + 2

            # What the page shows is what the server returned.
            shown = page.evaluate(
                f"async () => ({B64})(await (await fetch(document.getElementById('result').src)).blob())"
            )
            assert base64.b64decode(shown) == body

            result = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))
            assert result.shape == photo.shape
            assert np.array_equal(result[~hole], photo[~hole]), "outside the painted area nothing changes"
            assert (result[hole] != photo[hole]).any(-1).mean() > 0.5, "inside it the model painted"

            # Beside it, OpenCV's fill of the same hole: same pixels outside, different inside.
            c_box = page.locator("#compare-result").bounding_box()
            assert (
                c_box["x"] >= out_box["x"] + out_box["width"] - 1 or c_box["y"] >= out_box["y"] + out_box["height"] - 1
            )
            classical = np.asarray(Image.open(io.BytesIO(base64.b64decode(telea["body"]))).convert("RGB"))
            assert np.array_equal(classical[~hole], photo[~hole])
            assert (classical[hole] != result[hole]).any(-1).mean() > 0.2, "the comparison is another method's fill"
            assert "Telea" in page.text_content("#compare-caption")
            # The toggle hides the comparison, and the next Inpaint asks only for the model's fill.
            page.click("#compare-on")
            assert page.is_hidden("#compare-pane")
            calls = page.evaluate("window.__ceCalls")
            page.click("#inpaint")
            page.wait_for_function("document.getElementById('status').textContent.startsWith('Done')")
            assert page.evaluate("window.__ceCalls") == calls + 1
            assert not errors, errors

            with page.expect_download() as dl_info:
                page.click("#download")
            path = dl_info.value.path()
            assert dl_info.value.suggested_filename == "inpainted.png"
            with open(path, "rb") as f:
                assert f.read() == body
        finally:
            browser.close()


KEY = "browser-test-key-0123456789"


@pytest.fixture(scope="module")
def keyed_page_url(page_url, tiny_checkpoint):
    """The same app with an API key, beside the open one (page_url started Serve)."""
    from ray import serve

    from ce_ray.infer.serve import build_app

    serve.run(
        build_app(str(tiny_checkpoint), cpus_per_replica=0.5, api_key=KEY),
        name="test-browser-key",
        route_prefix="/t-browser-key",
        logging_config={"enable_access_log": False, "log_level": "WARNING"},
    )
    try:
        yield page_url.replace("/t-browser/", "/t-browser-key/")
    finally:
        serve.delete("test-browser-key")


def test_the_page_asks_for_the_api_key_once_and_again_after_a_401(keyed_page_url, tmp_path):
    """The page's first call gets a 401: it asks for the key (a wrong one is asked again), keeps it
    for the tab, and sends it on every later call: Inpaint then works without another question."""
    from playwright.sync_api import sync_playwright

    photo = dict(load_bundled())["skimage/chelsea"]
    Image.fromarray(photo).save(tmp_path / "cat.png")
    answers, asked = ["wrong-key", KEY], []

    def answer(dialog):
        asked.append(dialog.message)
        dialog.accept(answers.pop(0)) if answers else dialog.dismiss()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 900})
            page.set_default_timeout(TIMEOUT_MS)
            page.on("dialog", answer)
            page.goto(keyed_page_url)
            page.wait_for_function("document.getElementById('model-info').textContent.includes('step')")
            assert asked == ["This server needs an API key:", "That API key was not accepted. API key:"], asked
            assert page.evaluate("sessionStorage.getItem('ce-ray-api-key')") == KEY
            assert page.evaluate("document.getElementById('model').options.length") == 1, "v1/models answered"
            page.set_input_files("#file", str(tmp_path / "cat.png"))
            page.wait_for_selector("#input-canvas[data-ready='1']")
            page.click("#inpaint")  # the model's fill and the Telea comparison: two keyed POSTs
            page.wait_for_function("document.getElementById('status').textContent.startsWith('Done')")
            assert page.evaluate("document.getElementById('result').naturalWidth") == photo.shape[1]
            assert len(asked) == 2, "the key was asked for once (plus once after the wrong one), not per call"
            # A key that stops working (rotated on the server) is asked for again on the next call.
            page.evaluate("sessionStorage.setItem('ce-ray-api-key', 'rotated-away')")
            answers.append(KEY)
            page.click("#inpaint")
            page.wait_for_function("document.getElementById('status').textContent.startsWith('Done')")
            assert asked[2:] == ["That API key was not accepted. API key:"], asked
            assert page.text_content("#error") == ""
        finally:
            browser.close()
