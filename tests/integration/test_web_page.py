"""The web page at `/`, in a real headless Chromium against the running stack: submit from the page,
watch the job live, play the result in the video element, upload an image, cancel from the list.

A screenshot of each page state goes to VIDEOGEN_TEST_ARTIFACTS (default: test-artifacts/).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright

from tests.helpers import TOKENS, png_bytes

ARTIFACTS = Path(os.environ.get("VIDEOGEN_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))


def chromium() -> str:
    found = os.environ.get("VIDEOGEN_CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
    )
    if found is None:
        pytest.fail("no Chromium: install Debian's `chromium` (scripts/test does when it can) or set VIDEOGEN_CHROMIUM")
    return found


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def page(browser, stack) -> Page:
    context = browser.new_context(viewport={"width": 1200, "height": 1000})
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda exc: errors.append(str(exc)))
    opened.goto(stack.gateway_url + "/")
    opened.fill("#api-key", TOKENS["tester"])
    opened.dispatch_event("#api-key", "change")
    expect(opened.locator("#model option[value='ltx-tiny']")).to_have_count(1)
    yield opened
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"web-page-{name}.png"), full_page=True)


def fill_small_job(page: Page, model: str, prompt: str) -> None:
    page.select_option("#model", model)
    page.fill("#prompt", prompt)
    for field, value in (("#width", "32"), ("#height", "32"), ("#num_frames", "9"), ("#num_inference_steps", "2")):
        page.fill(field, value)


def test_submit_watch_and_play(page: Page) -> None:
    fill_small_job(page, "ltx-tiny", "a paper boat on a pond")
    page.click("#submit")
    expect(page.locator("#status")).to_have_text("succeeded", timeout=60_000)
    expect(page.locator("#progress")).to_have_js_property("value", 1)
    video = page.locator("#result")
    expect(video).to_be_visible()
    # The browser fetched the MP4 through the presigned link and decoded its first frame.
    page.wait_for_function("document.getElementById('result').readyState >= 2", timeout=30_000)
    assert page.evaluate(
        "[document.getElementById('result').videoWidth, document.getElementById('result').videoHeight]"
    ) == [32, 32]
    job_id = page.inner_text("#job-id")
    expect(page.locator(f"#jobs tr[data-job-id='{job_id}'] td").nth(3)).to_have_text("succeeded")
    shot(page, "succeeded")


def test_image_upload_makes_an_image_to_video_job(page: Page, tmp_path) -> None:
    image = tmp_path / "still.png"
    image.write_bytes(png_bytes(32, 32))
    page.select_option("#mode", "image-to-video")
    expect(page.locator("#file-field")).to_be_visible()
    fill_small_job(page, "ltx-tiny", "the still comes alive")
    page.set_input_files("#file", str(image))
    page.click("#submit")
    expect(page.locator("#status")).to_have_text("succeeded", timeout=60_000)
    page.wait_for_function("document.getElementById('result').readyState >= 2", timeout=30_000)
    job_id = page.inner_text("#job-id")
    expect(page.locator(f"#jobs tr[data-job-id='{job_id}'] td").nth(2)).to_have_text("image-to-video")
    shot(page, "image-to-video")


def test_errors_are_shown_and_a_job_can_be_cancelled_from_the_list(page: Page) -> None:
    fill_small_job(page, "ltx-tiny", "odd size")
    page.fill("#width", "33")
    page.click("#submit")
    expect(page.locator("#form-error")).to_contain_text("width", timeout=30_000)
    expect(page.locator("#form-error")).to_contain_text("422")

    page.select_option("#model", "ltx-slow")
    page.fill("#prompt", "a long one")
    for field, value in (("#width", "256"), ("#height", "256"), ("#num_frames", "65"), ("#num_inference_steps", "200")):
        page.fill(field, value)
    page.click("#submit")
    expect(page.locator("#phase")).to_have_text("denoising", timeout=60_000)
    job_id = page.inner_text("#job-id")
    page.click(f"#jobs tr[data-job-id='{job_id}'] button.cancel")
    expect(page.locator("#status")).to_have_text("cancelled", timeout=30_000)
    shot(page, "cancelled")


# Submit a small job, wait until it has ended, then follow it with an EventSource, as a page would.
FOLLOW_AN_ENDED_JOB = """
async ([key, deadlineMs]) => {
  const auth = {"Authorization": `Bearer ${key}`, "Content-Type": "application/json"};
  const body = {prompt: "over already", model: "ltx-tiny", width: 32, height: 32, num_frames: 9,
                num_inference_steps: 2};
  const accepted = await (await fetch("/api/v1/generate/text-to-video",
                                      {method: "POST", headers: auth, body: JSON.stringify(body)})).json();
  const deadline = Date.now() + deadlineMs;
  for (;;) {
    const job = await (await fetch(`/api/v1/jobs/${accepted.job_id}`, {headers: auth})).json();
    if (["succeeded", "failed", "cancelled"].includes(job.status)) break;
    if (Date.now() > deadline) return {error: "the job did not end"};
    await new Promise((r) => setTimeout(r, 200));
  }
  return await new Promise((resolve) => {
    const source = new EventSource(`/api/v1/events?job_id=${accepted.job_id}&access_token=${key}`);
    const seen = {opens: 0, events: [], states: []};
    source.onopen = () => seen.opens++;
    source.addEventListener("job.event", (e) => seen.events.push(JSON.parse(e.data).status));
    source.onerror = () => {
      seen.states.push(source.readyState);
      if (source.readyState === EventSource.CLOSED) resolve(seen);
    };
    setTimeout(() => { source.close(); resolve({...seen, error: "still reconnecting"}); },
               deadline - Date.now());
  });
}
"""


def test_an_event_source_stops_once_its_job_has_ended(page: Page) -> None:
    """The stream of an ended job replays it and ends; the EventSource reconnects with the terminal
    event's id as Last-Event-ID and gets 204, which closes it for good instead of a reconnect loop."""
    seen = page.evaluate(FOLLOW_AN_ENDED_JOB, [TOKENS["tester"], 60_000])
    assert "error" not in seen, seen
    assert seen["opens"] == 1 and seen["events"][-1] == "succeeded" and seen["events"][0] == "queued"
    # First the end of the stream (the EventSource goes to reconnect), then the 204 that closes it.
    assert seen["states"] == [0, 2]
