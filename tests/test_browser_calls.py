"""The call page in real Chromium (Debian's, headless, fake camera, an espeak-ng wav as the
microphone), against the server with the scripted engine: calls placed from the page itself,
the assistant heard (bytes in, and a level on the played stream) and read, barge-in,
hang-up; and the messages a caller sees when something is refused or breaks.

Screenshots of the page mid-call go to test-artifacts/.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from fake_engine import fake_engine
from playwright.async_api import Browser, Page, async_playwright
from realtime_helpers import API_KEY, RunningServer, running_server

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
SPOKEN = "Hello there. What can you see?"
WAIT_MS = 20_000

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason="Debian's chromium is not installed (apt-get install chromium)",
)


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sentence, then 2.5 s of silence: looped by Chromium, each loop is a new turn,
    and the next loop starts while the reply is still playing (a barge-in)."""
    if shutil.which("espeak-ng") is None or shutil.which("sox") is None:
        pytest.skip("espeak-ng and sox are needed (apt-get install espeak-ng sox)")
    folder = tmp_path_factory.mktemp("mic")
    spoken, wav = folder / "spoken.wav", folder / "mic.wav"
    subprocess.run(["espeak-ng", "-w", str(spoken), SPOKEN], check=True)
    subprocess.run(
        ["sox", str(spoken), "-r", "48000", "-c", "1", "-b", "16", str(wav), "pad", "0.3", "2.5"],
        check=True,
    )
    return wav


@asynccontextmanager
async def chromium(wav: Path) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox",
                "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={wav}",
                "--disable-background-networking",
                "--autoplay-policy=no-user-gesture-required",
                "--auto-select-desktop-capture-source=Entire screen",
            ],
        )
        try:
            yield browser
        finally:
            await browser.close()


async def open_page(browser: Browser, server: RunningServer, **context: Any) -> Page:
    page = await (await browser.new_context(**context)).new_page()
    await page.goto(f"http://127.0.0.1:{server.port}/")
    return page


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    async def wait() -> None:
        while not condition():
            await asyncio.sleep(0.05)

    await asyncio.wait_for(wait(), timeout)


async def inbound_audio_bytes(page: Page) -> int:
    return await page.evaluate(
        """async () => {
            let bytes = 0;
            (await omni.call.pc.getStats()).forEach((r) => {
                if (r.type === "inbound-rtp" && r.kind === "audio") bytes = r.bytesReceived;
            });
            return bytes;
        }"""
    )


async def enter_key(page: Page) -> None:
    await page.click("#settings summary")
    await page.fill("#api-key", API_KEY)


async def hang_up(page: Page, server: RunningServer) -> None:
    await page.click("#hang-up")
    await page.wait_for_function("document.querySelector('#state').dataset.state === 'idle'")
    await until(lambda: not server.gateway.sessions)


async def place_voice_call(page: Page, server: RunningServer, button: str = "#voice-call") -> None:
    await page.click(button)
    await page.wait_for_function(
        "document.querySelector('#state').dataset.state === 'connected'", timeout=WAIT_MS
    )
    assert len(server.gateway.sessions) == 1


async def assistant_heard(page: Page) -> None:
    """The reply's audio arrived and played loud enough, and the turn's latency was shown."""
    await page.wait_for_function("omni.stats.remotePeak > 0.05", timeout=WAIT_MS)
    assert await inbound_audio_bytes(page) > 1000
    await page.wait_for_function("omni.stats.latencies.length >= 1", timeout=WAIT_MS)


async def test_voice_and_video_calls_from_the_page(speech_wav: Path) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    # a reply of about 5 s, so the caller's next sentence comes while it plays
    factory = lambda: fake_engine(filler_tokens=220)
    async with running_server(factory) as server, chromium(speech_wav) as browser:
        page = await open_page(browser, server)
        await enter_key(page)

        # -- a voice call
        await place_voice_call(page, server)
        # the assistant's words appear, and its voice arrives and plays
        await page.wait_for_selector("#transcript li.assistant >> text=Reply 1.", timeout=WAIT_MS)
        await assistant_heard(page)
        latency = await page.evaluate("omni.stats.latencies[0]")
        assert 0 < latency < 3000
        await page.screenshot(path=str(ARTIFACTS / "voice-call.png"), full_page=True)
        # the next loop of the sentence interrupts the reply: cleared, truncated, marked
        await page.wait_for_selector("#transcript li.assistant.interrupted", timeout=WAIT_MS)
        events = await page.evaluate("omni.stats.events")
        assert "output_audio_buffer.cleared" in events
        assert "conversation.item.truncated" in events
        # the line then shows what the server kept: the words the caller heard
        await page.wait_for_function("omni.stats.events.includes('conversation.item.retrieved')")
        heard = await page.locator("#transcript li.assistant.interrupted .text").inner_text()
        assert heard.startswith("Reply 1.") and heard.count("so on") < 200
        latencies = await page.locator("#latencies li").all_inner_texts()
        assert latencies and latencies[0].startswith("Turn 1: ")
        # share the screen mid-call: the model sees it on the next turn
        await page.click("#share-screen")
        await page.wait_for_selector("#share-screen[aria-pressed=true]")
        await page.wait_for_function(
            "document.querySelector('#preview').videoWidth > 0", timeout=WAIT_MS
        )
        await page.wait_for_selector(
            "#transcript li.assistant >> text=camera frames", timeout=WAIT_MS
        )
        await page.click("#share-screen")
        await page.wait_for_selector("#share-screen[aria-pressed=false]")
        await hang_up(page, server)
        assert await page.locator("#alert").is_hidden()

        # -- a video call
        await page.click("#video-call")
        await page.wait_for_function(
            "document.querySelector('#state').dataset.state === 'connected'", timeout=WAIT_MS
        )
        await page.wait_for_function(
            "document.querySelector('#preview').videoWidth > 0", timeout=WAIT_MS
        )
        await page.wait_for_selector(
            "#transcript li.assistant >> text=camera frames", timeout=WAIT_MS
        )
        await page.screenshot(path=str(ARTIFACTS / "video-call.png"), full_page=True)
        await hang_up(page, server)


async def test_what_the_caller_sees_when_things_go_wrong(speech_wav: Path) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    deny = """
        const real = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
        navigator.mediaDevices.getUserMedia = (constraints) =>
            (constraints.%s ? Promise.reject(new DOMException("denied", "NotAllowedError"))
                            : real(constraints));
    """
    async with running_server(fake_engine) as server, chromium(speech_wav) as browser:
        # no API key: the server refuses, and the page says what to do
        page = await open_page(browser, server)
        await page.click("#voice-call")
        await page.wait_for_selector("#alert >> text=needs an API key")
        assert await page.locator("#settings").get_attribute("open") is not None
        assert not server.gateway.sessions

        # the microphone is denied: no call, a clear message
        context = await browser.new_context()
        await context.add_init_script(deny % "audio")
        page = await context.new_page()
        await page.goto(f"http://127.0.0.1:{server.port}/")
        await enter_key(page)
        await page.click("#voice-call")
        await page.wait_for_selector("#alert >> text=Access to the microphone was denied")
        assert await page.locator("#voice-call").is_enabled()

        # the camera is denied: the call goes on with voice only, and says so
        context = await browser.new_context(viewport={"width": 390, "height": 844})
        await context.add_init_script(deny % "video")
        page = await context.new_page()
        await page.goto(f"http://127.0.0.1:{server.port}/")
        await enter_key(page)
        # from the keyboard: tab to "Video call", press Enter
        for _ in range(10):
            await page.keyboard.press("Tab")
            if await page.evaluate("document.activeElement.id") == "video-call":
                break
        await page.keyboard.press("Enter")
        await page.wait_for_selector("#alert >> text=continues with voice only")
        await page.wait_for_function(
            "document.querySelector('#state').dataset.state === 'connected'", timeout=WAIT_MS
        )
        await page.keyboard.press("m")
        assert await page.locator("#muted-badge").is_visible()
        # a phone-sized screen: nothing sticks out sideways
        assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        await page.screenshot(path=str(ARTIFACTS / "phone-call.png"), full_page=True)

        # the server ends the call: the page says so and is ready for the next one
        await server.gateway.close_sessions()
        await page.wait_for_selector("#alert >> text=The call ended", timeout=WAIT_MS)
        assert await page.locator("#video-call").is_enabled()
        await until(lambda: not server.gateway.sessions)
