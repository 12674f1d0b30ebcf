"""The playground page driven in a real headless Chromium against `janus-server serve` (tiny model).

The tiny checkpoint here has Janus-Pro's image shapes (576 tokens, 384x384 PNGs), so a generation
takes the real number of decode steps: long enough to stop one half-way and see that it stopped, or to
watch its previews replace each other.
Every test fails on a JavaScript error or console.error in the page; screenshots go to tmp_path.
"""

from __future__ import annotations

import base64
import os
import re
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.support.browser import console_problems, require_browser, start_chromium, wait_for
from tests.support.servers import start_server

MAX_IMAGE_BYTES = 1024 * 1024  # above a 384x384 noise PNG (so "use as input" works), below the one made here


@pytest.fixture(scope="module")
def model_384(tmp_path_factory) -> Path:
    require_browser()
    from janus_core.tiny.janus import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-model-384", "hf", seed=0, image_size=384)


@pytest.fixture(scope="module")
def page_server(model_384, tmp_path_factory):
    proc = start_server(["serve", "--model", str(model_384)], tmp_path_factory.mktemp("logs"),
                        env={"JANUS_MAX_IMAGE_BYTES": str(MAX_IMAGE_BYTES)})
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def browser():
    require_browser()
    driver = start_chromium()
    yield driver
    driver.quit()


@pytest.fixture()
def page(browser, page_server):
    """The page freshly loaded, with the model name shown (its first API call succeeded)."""
    browser.get(page_server.url + "/")
    browser.execute_script("sessionStorage.clear()")
    wait_for(lambda: browser.find_element("id", "model").get_attribute("data-ready"), 30, "the model name")
    browser.get_log("browser")  # start every test with an empty console
    return browser


def _el(driver, css: str):
    return driver.find_element("css selector", css)


def _set(driver, element_id: str, value: str) -> None:
    field = driver.find_element("id", element_id)
    field.clear()
    field.send_keys(value)


def _ask(driver, question: str, max_tokens: str):
    """Send `question` from the chat panel; returns the assistant's answer element once it appears."""
    _set(driver, "chat-max-tokens", max_tokens)
    _set(driver, "chat-input", question)
    _el(driver, "#chat-send").click()
    return wait_for(lambda: driver.find_elements("css selector", "#chat-log .msg.assistant"), 10, "an answer")[0]


def _answered(answer) -> None:
    """Wait for a streaming answer to end, and check it ended as done (not stopped, not failed)."""
    wait_for(lambda: answer.get_attribute("data-state") != "streaming", 60, "the answer to finish")
    assert answer.get_attribute("data-state") == "done", answer.text


def _metric(server, pattern: str, default: float | None = None) -> float:
    """A sample from /metrics; a labelled series appears only once observed, hence `default`."""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    match = re.search(pattern, text, flags=re.M)
    if match is None and default is None:
        raise AssertionError(f"no sample matches {pattern!r} in /metrics")
    return float(match.group(1)) if match else float(default)


def _png_file(path, size, noise=False):
    image = Image.effect_noise(size, 120).convert("RGB") if noise else Image.new("RGB", size, (40, 160, 90))
    image.save(path)
    return str(path)


BIG_SEED = 2**53 + 1  # a JavaScript number would round it to 2**53


def test_generates_two_images_with_seeds(page, page_server, tmp_path):
    _set(page, "gen-prompt", "a red fox in the snow")
    _set(page, "gen-n", "2")
    _set(page, "gen-seed", str(BIG_SEED))
    _el(page, "#gen-submit").click()
    job = _el(page, "#gen-jobs .job")
    wait_for(lambda: job.get_attribute("data-state") != "running", 120, "the generation to finish")
    page.save_screenshot(str(tmp_path / "generated.png"))
    assert job.get_attribute("data-state") == "done", job.text
    assert job.get_attribute("data-step") == job.get_attribute("data-total") == "576"

    images = job.find_elements("css selector", ".gallery img")
    assert len(images) == 2
    for img in images:  # decoded by the browser, at the model's size
        assert page.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) == 384
    seeds = [c.get_attribute("data-seed") for c in job.find_elements("css selector", ".gallery .seed")]
    assert seeds == [str(BIG_SEED), str(BIG_SEED + 1)]  # image i of a request uses seed + i, digit for digit
    shown = [img.get_attribute("src") for img in images]
    assert all(src.startswith("data:image/png;base64,iVBOR") for src in shown) and shown[0] != shown[1]
    links = job.find_elements("css selector", ".gallery a.download")
    assert [a.get_attribute("download") for a in links] == [f"janus-{BIG_SEED}.png", f"janus-{BIG_SEED + 1}.png"]
    assert [a.get_attribute("href") for a in links] == shown

    # "use as input" hands an image to the chat panel, and a question about it gets an answer
    job.find_elements("css selector", ".gallery button.use")[1].click()
    attached = wait_for(lambda: page.find_elements("css selector", "#attachments img"), 10, "the attachment")
    assert attached[0].get_attribute("src") == shown[1]
    answer = _ask(page, "What is in this picture?", "16")
    _answered(answer)
    assert page.find_element("css selector", "#chat-log .msg.user .thumbs img").get_attribute("src") == shown[1]
    page.save_screenshot(str(tmp_path / "playground.png"))
    if os.environ.get("JANUS_PLAYGROUND_SCREENSHOT"):  # how docs/playground.png is made (then shrunk)
        page.save_screenshot(os.environ["JANUS_PLAYGROUND_SCREENSHOT"])
    # "reuse seed" prepares a one-image request that gives that image again
    job.find_elements("css selector", ".gallery button.reuse")[1].click()
    assert page.find_element("id", "gen-seed").get_attribute("value") == str(BIG_SEED + 1)
    assert page.find_element("id", "gen-n").get_attribute("value") == "1"
    assert console_problems(page) == []


def test_shows_only_the_generation_fields_the_model_takes(page):
    """Janus-Pro: temperature, no steps (a `hidden` label stays hidden whatever the row's layout says)."""
    assert page.find_element("id", "gen-temperature-label").is_displayed()
    assert not page.find_element("id", "gen-steps-label").is_displayed()


def test_the_demo_model_holds_a_conversation_with_an_image(page_server, tmp_path):
    """The offline demo's model (this 384-pixel tiny checkpoint): a second turn after a full-length random
    answer, sent back as chat clients do, still fits its context."""
    data = base64.b64encode(Path(_png_file(tmp_path / "q.png", (384, 384), noise=True)).read_bytes()).decode()
    image = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is in this image?"}, image]}]
    for follow_up in ("What colour is it?", "Anything else?"):
        reply = httpx.post(page_server.url + "/v1/understand", timeout=120,
                           json={"messages": messages, "max_new_tokens": 256, "temperature": 0})
        assert reply.status_code == 200, reply.text
        messages += [{"role": "assistant", "content": reply.json()["text"]}, {"role": "user", "content": follow_up}]


def test_dice_picks_a_seed_beyond_float_precision(page):
    _el(page, "#gen-dice").click()
    seed = page.find_element("id", "gen-seed").get_attribute("value")
    assert seed.isdigit() and 0 <= int(seed) < 2**62
    assert console_problems(page) == []


def test_chat_streams_and_follows_up(page, tmp_path):
    page.find_element("id", "chat-files").send_keys(_png_file(tmp_path / "green.png", (96, 64)))
    wait_for(lambda: page.find_elements("css selector", "#attachments img"), 10, "the attachment")
    answer = _ask(page, "What is in this image?", "24")
    _answered(answer)
    assert int(answer.get_attribute("data-updates")) > 1  # streamed: the text grew in several steps
    assert _el(page, "#chat-log .msg.assistant .text").text.strip()
    assert page.find_elements("css selector", "#chat-log .msg.user .thumbs img")

    _set(page, "chat-input", "And what colour is it?")
    page.find_element("id", "chat-input").send_keys("\n")  # Enter sends
    wait_for(lambda: len(page.find_elements("css selector", "#chat-log .msg.assistant")) == 2, 10, "a second answer")
    _answered(page.find_elements("css selector", "#chat-log .msg.assistant")[1])
    page.save_screenshot(str(tmp_path / "chat.png"))
    # the whole conversation goes with each request: two turns of each role are kept
    roles = page.execute_script("return chat.messages.map(m => m.role)")
    assert roles == ["user", "assistant", "user", "assistant"]

    _el(page, "#chat-new").click()
    assert page.find_elements("css selector", "#chat-log .msg") == []
    assert page.execute_script("return chat.messages.length") == 0
    assert console_problems(page) == []


def _engine_sample(server) -> tuple[float, float, float]:
    """(generation requests running, generation decode steps so far, images generated) from one scrape."""
    text = httpx.get(server.url + "/metrics", timeout=10).text

    def sample(pattern: str) -> float:
        match = re.search(pattern, text, flags=re.M)
        return float(match.group(1)) if match else 0.0

    return (sample(r'^janus_running_requests\{kind="generate"\} (\S+)$'),
            sample(r'^janus_decode_step_seconds_count\{kind="generate"\} (\S+)$'),
            sample(r"^janus_images_generated_total (\S+)$"))


def test_stop_cancels_the_generation_on_the_server(page, page_server, tmp_path):
    _, steps_before, images_before = _engine_sample(page_server)
    stops_before = page_server.log().count("stopped job")
    _set(page, "gen-prompt", "a long walk")
    _set(page, "gen-n", "1")
    _el(page, "#gen-submit").click()
    job = _el(page, "#gen-jobs .job")
    wait_for(lambda: int(job.get_attribute("data-step") or 0) >= 5, 60, "the first progress events")
    job.find_element("css selector", "button.stop").click()
    wait_for(lambda: job.get_attribute("data-state") != "running", 10, "the page to stop")
    page.save_screenshot(str(tmp_path / "stopped.png"))
    assert job.get_attribute("data-state") == "stopped"
    assert int(job.get_attribute("data-step")) < 576
    assert "stopped at step" in job.text

    # The server stopped the job, not just the page: the worker says so, and a scrape taken after
    # the job's steps were counted shows nothing running, far fewer than 576 steps and no image.
    wait_for(lambda: page_server.log().count("stopped job") > stops_before, 30, "the worker to stop the job")
    assert re.search(r"stopped job \w+ after [\d.]+ s: cancelled", page_server.log())
    running, steps, images = wait_for(
        lambda: (s := _engine_sample(page_server))[0] == 0 and s[1] > steps_before and s, 30,
        "a scrape with the job's steps and nothing running")
    assert steps - steps_before < 0.75 * 576, f"{steps - steps_before} decode steps ran; Stop came at step 5-ish"
    assert images == images_before
    assert job.find_elements("css selector", ".gallery img[data-state=final]") == []  # a preview may stay
    assert console_problems(page) == []


def test_oversize_image_shows_a_clear_message(page, tmp_path):
    path = _png_file(tmp_path / "big.png", (1024, 1024), noise=True)
    assert os.path.getsize(path) > MAX_IMAGE_BYTES
    page.find_element("id", "chat-files").send_keys(path)
    wait_for(lambda: page.find_elements("css selector", "#attachments img"), 10, "the attachment")
    _set(page, "chat-input", "What is this?")
    _el(page, "#chat-send").click()
    error = wait_for(lambda: page.find_elements("css selector", "#chat-log .msg.assistant .error"), 30,
                     "the error message")[0]
    page.save_screenshot(str(tmp_path / "too-large.png"))
    assert "Too large for this server (413" in error.text
    assert f"limit of {MAX_IMAGE_BYTES} bytes" in error.text
    assert page.execute_script("return chat.messages.length") == 0  # the failed turn is not history
    assert not _el(page, "#chat-send").get_attribute("disabled")
    assert console_problems(page, allowed_statuses=(413,)) == []


def test_page_assets_are_local_and_locked_down(page_server):
    page = httpx.get(page_server.url + "/playground", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    refs = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert refs and all(r.startswith(("/playground/", "data:")) for r in refs), refs
    for ref in refs:
        if ref.startswith("/"):
            assert httpx.get(page_server.url + ref, timeout=10).status_code == 200
    script = httpx.get(page_server.url + "/playground/playground.js", timeout=10).text
    assert "http://" not in script and "https://" not in script


def test_asks_for_the_api_key_once_and_keeps_it_in_the_session(browser):
    """Behind --api-key the page loads without one, asks for it, and keeps it in sessionStorage only."""
    from server.settings import Settings
    from tests.support.app_server import serving

    with serving(Settings(api_key=["s3cret"])) as url:
        browser.get(url + "/")
        browser.execute_script("sessionStorage.clear(); localStorage.clear()")
        browser.refresh()
        dialog = browser.find_element("id", "key-dialog")
        wait_for(lambda: dialog.get_attribute("open") is not None, 30, "the key dialog")
        _set(browser, "key-input", "wrong")
        _el(browser, "#key-save").click()
        wait_for(lambda: "invalid API key" in browser.find_element("id", "key-error").text, 30, "the refusal")
        _set(browser, "key-input", "s3cret")
        _el(browser, "#key-save").click()
        wait_for(lambda: browser.find_element("id", "model").get_attribute("data-ready"), 30, "the model name")
        assert dialog.get_attribute("open") is None
        assert browser.execute_script("return sessionStorage.getItem('janus-playground-api-key')") == "s3cret"
        assert browser.execute_script("return localStorage.length") == 0
        browser.refresh()  # the same tab keeps the key: no second question
        wait_for(lambda: browser.find_element("id", "model").get_attribute("data-ready"), 30, "the model name")
        assert browser.find_element("id", "key-dialog").get_attribute("open") is None
        assert console_problems(browser, allowed_statuses=(401,)) == []


def test_readable_on_a_phone(page, tmp_path):
    page.set_window_size(390, 844)
    try:
        page.refresh()
        wait_for(lambda: page.find_element("id", "model").get_attribute("data-ready"), 30, "the model name")
        page.save_screenshot(str(tmp_path / "phone.png"))
        # one column, nothing wider than the screen
        assert page.execute_script("return document.documentElement.scrollWidth") <= 390
        chat, gen = (page.find_element("id", i).rect for i in ("chat-panel", "gen-panel"))
        assert gen["y"] >= chat["y"] + chat["height"] and gen["x"] == chat["x"]
        assert console_problems(page) == []
    finally:
        page.set_window_size(1280, 900)


def test_drop_and_paste_add_images_and_refuse_other_files(page, tmp_path):
    png = base64.b64encode(Path(_png_file(tmp_path / "drop.png", (32, 32))).read_bytes()).decode()
    send = """
        const [b64, name, type, target, kind] = arguments;
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], name, {type}));
        const event = kind === "drop" ? new DragEvent("drop", {dataTransfer: data, bubbles: true, cancelable: true})
                                      : new ClipboardEvent("paste", {clipboardData: data, bubbles: true});
        document.getElementById(target).dispatchEvent(event);
    """
    page.execute_script(send, png, "drop.png", "image/png", "drop-zone", "drop")
    wait_for(lambda: len(page.find_elements("css selector", "#attachments img")) == 1, 10, "the dropped image")
    page.execute_script(send, png, "pasted.png", "image/png", "chat-input", "paste")
    wait_for(lambda: len(page.find_elements("css selector", "#attachments img")) == 2, 10, "the pasted image")
    page.execute_script(send, base64.b64encode(b"hello").decode(), "notes.txt", "text/plain", "drop-zone", "drop")
    assert "notes.txt is not an image" in wait_for(lambda: page.find_element("id", "chat-error").text, 10, "refusal")
    names = [img.get_attribute("alt") for img in page.find_elements("css selector", "#attachments img")]
    assert names == ["drop.png", "pasted.png"]
    page.find_elements("css selector", "#attachments button")[0].click()  # remove one again
    assert [img.get_attribute("alt") for img in page.find_elements("css selector", "#attachments img")] == [
        "pasted.png"]
    assert console_problems(page) == []


def test_stop_cancels_a_streaming_answer(page, page_server, tmp_path):
    # Text only, so that nearly the whole context (1024) is left to decode: the tiny model streams
    # hundreds of tokens a second, and the click must land while the answer is still streaming.
    stops_before = page_server.log().count("stopped job")
    answer = _ask(page, "Describe every detail.", "900")
    wait_for(lambda: int(answer.get_attribute("data-updates") or 0) >= 3, 60, "the first pieces of text")
    _el(page, "#chat-stop").click()
    wait_for(lambda: answer.get_attribute("data-state") != "streaming", 10, "the page to stop")
    assert answer.get_attribute("data-state") == "stopped", answer.text
    assert int(answer.get_attribute("data-updates")) < 900
    assert page.execute_script("return chat.messages.map(m => m.role)") == ["user", "assistant"]  # partial kept
    wait_for(lambda: page_server.log().count("stopped job") > stops_before, 30, "the worker to stop the job")
    wait_for(lambda: _metric(page_server, r'^janus_running_requests\{kind="understand"\} (\S+)$', 0) == 0, 30,
             "the engine to drop the job")
    assert console_problems(page) == []


# The job's state and its first image's, read in one script: "a preview while the job runs" is one observation.
IMAGE_STATE = """
    const job = arguments[0], img = job.querySelector(".gallery img");
    return {job: job.dataset.state, image: img && img.dataset.state, step: img && Number(img.dataset.step),
            width: img && img.complete ? img.naturalWidth : 0, images: job.querySelectorAll(".gallery img").length,
            src: img && img.src.slice(0, 30) + img.src.slice(-120)};  // a PNG's tail holds its checksums
"""


def test_shows_the_image_forming_then_the_final_image(browser, model_384, tmp_path_factory, tmp_path):
    """With the preview decoder given all the time it wants, the page draws each preview in the image's slot
    while the job runs (a later one replacing an earlier one), then the final image in that same <img>."""
    server = start_server(["serve", "--model", str(model_384)], tmp_path_factory.mktemp("logs"),
                          env={"JANUS_PREVIEW_SHARE": "1"})
    try:
        browser.get(server.url + "/")
        wait_for(lambda: browser.find_element("id", "model").get_attribute("data-ready"), 30, "the model name")
        browser.get_log("browser")
        _set(browser, "gen-prompt", "a fox forming")
        _set(browser, "gen-n", "1")
        _el(browser, "#gen-submit").click()
        job = _el(browser, "#gen-jobs .job")

        def preview_after(step: int):
            state = browser.execute_script(IMAGE_STATE, job)
            assert state["job"] == "running", f"the job ended before the page showed a preview after step {step}"
            return state["image"] == "preview" and state["step"] > step and state["width"] == 384 and state

        first = wait_for(lambda: preview_after(0), 60, "a preview")
        img = _el(job, ".gallery img")
        assert first["src"].startswith("data:image/png;base64,iVBOR") and first["images"] == 1
        later = wait_for(lambda: preview_after(first["step"]), 60, "a later preview")
        browser.save_screenshot(str(tmp_path / "preview.png"))
        assert later["src"] != first["src"] and later["images"] == 1

        wait_for(lambda: job.get_attribute("data-state") != "running", 60, "the generation to finish")
        assert job.get_attribute("data-state") == "done", job.text
        final = browser.execute_script(IMAGE_STATE, job)
        assert final["image"] == "final" and final["width"] == 384 and final["images"] == 1
        assert final["src"] not in (first["src"], later["src"])
        assert img.get_attribute("data-step") is None  # the same <img> (not stale), now showing the result
        assert job.find_elements("css selector", ".gallery .seed[data-seed]")  # the final card's caption
        assert console_problems(browser) == []
    finally:
        server.stop()
