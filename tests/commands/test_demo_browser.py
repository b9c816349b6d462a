"""``captioning demo`` in a real browser: headless Chromium (Debian's ``chromium``) driven by
Playwright. The page captions an uploaded image exactly as ``captioning caption`` does, shows the
CLI's panel for a clicked word, says what is wrong with a bad file, answers 8 users at once and
a second user while the first one's request still runs, and never touches the network.

Screenshots of every step go to ``<pytest tmp>/demo_screenshots*/``. Without Chromium these tests
skip; ``CAPTIONING_REQUIRE_BROWSER=1`` (set by ``.ci/run``) makes a missing browser a failure.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioning.commands.demo import Demo, build_app, launch
from captioning.commands.main import main as cli_main
from captioning.viz import overlay_panel_boxes

from support.cli import cli_command, cli_env

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

CHROMIUM = Path(os.environ.get("CAPTIONING_CHROMIUM", "/usr/bin/chromium"))
# This machine's closed network: no background fetches, no QUIC, a fresh profile per run.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
TIMEOUT_MS = 60_000


def _unavailable(reason: str) -> None:
    if os.environ.get("CAPTIONING_REQUIRE_BROWSER", "").strip() in ("1", "true", "yes"):
        pytest.fail(f"browser tests required (CAPTIONING_REQUIRE_BROWSER) but {reason}")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_http(url: str, proc: subprocess.Popen | None = None, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the demo exited with status {proc.returncode} before serving")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout:.0f} s")


@pytest.fixture(scope="module")
def browser():
    """The system's Chromium (never a downloaded one) through Playwright, with a fresh temporary
    profile (Playwright's own --user-data-dir); each :class:`Page` is a user with its own context."""
    if not CHROMIUM.is_file():
        _unavailable(f"Chromium not found at {CHROMIUM} (Debian/Ubuntu: apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install -e '.[dev]')")
    pytest.importorskip("gradio")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo_screenshots")

    def snap(page, name: str) -> Path:
        path = folder / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        return path

    snap.folder = folder
    return snap


class Page:
    """One user: a browser context of its own (a browser allows only 6 connections per server and
    context, and each open Gradio page holds some) and its tab; records every request that
    leaves the demo's server."""

    def __init__(self, browser, url: str, wait: bool = True) -> None:
        self.url, self.external = url, []
        self.context = browser.new_context(viewport={"width": 1280, "height": 1000})
        self.context.set_default_timeout(TIMEOUT_MS)
        self.page = self.context.new_page()
        self.page.on("request", self._record)
        self.page.goto(url, wait_until="commit")
        if wait:
            self.ready()

    def ready(self) -> Page:
        self.page.wait_for_selector("#status", state="attached")
        return self

    def _record(self, request) -> None:
        if not request.url.startswith((self.url, "data:", "blob:")):
            self.external.append(request.url)

    def upload(self, path: Path) -> None:
        self.page.locator("#input-image input[type=file]").set_input_files(str(path))

    def wait_status(self, text: str) -> str:
        self.page.wait_for_function("t => document.querySelector('#status').innerText.includes(t)", arg=text)
        return self.page.inner_text("#status")

    def status(self) -> str:
        return self.page.inner_text("#status")

    def words(self) -> list[str]:
        return [w.strip() for w in self.page.locator("#caption-words label").all_inner_texts()]

    def image(self, selector: str) -> np.ndarray:
        """The pixels of the image shown in ``selector``, as served to the browser."""
        src = self.page.locator(f"{selector} img").first.get_attribute("src")
        body = self.page.request.get(src).body()
        return np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))


@pytest.fixture(scope="module")
def ckpt(shapes_run):
    return sorted(shapes_run.rglob("best*.ckpt"))[-1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from captioning.data.shapes import ShapesDataModule

    folder = tmp_path_factory.mktemp("uploads")
    scene = ShapesDataModule().export_images("test", [1], folder)[0]  # 64x64, generated
    (folder / "notes.txt").write_text("a shopping list, not a picture\n")
    (folder / "fake.png").write_text("not a PNG either, whatever its name says\n")
    Image.new("RGB", (300, 300), (200, 40, 40)).save(folder / "large.png")  # 90,000 pixels > --max_pixels
    return {"scene": scene, "notes": folder / "notes.txt", "fake": folder / "fake.png", "large": folder / "large.png"}


@pytest.fixture(scope="module")
def cli_result(ckpt, files, tmp_path_factory):
    """What ``captioning caption`` writes for the scene (beam 2, as the demo below starts with)."""
    out = tmp_path_factory.mktemp("cli_caption")
    assert (
        cli_main(["caption", "--ckpt_path", str(ckpt), "--beam_size", "2", "--output", str(out), str(files["scene"])])
        == 0
    )
    stem = files["scene"].stem
    return out / f"{stem}.png", json.loads((out / f"{stem}.json").read_text())


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    """``captioning demo`` in its own process on a free port (what a user runs)."""
    tmp = tmp_path_factory.mktemp("demo_server")
    port = _free_port()
    log = open(tmp / "demo.log", "w")  # noqa: SIM115 - the server writes into it until the fixture ends
    proc = subprocess.Popen(
        cli_command("demo", "--ckpt_path", str(ckpt), "--port", str(port), "--beam_size", "2", "--max_pixels", "40000"),
        env=cli_env(tmp, OMP_NUM_THREADS="1"),
        cwd=tmp,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}/"
        try:
            _wait_for_http(url, proc)
        except AssertionError as err:
            raise AssertionError(f"{err}\n{(tmp / 'demo.log').read_text()[-3000:]}") from None
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_caption_and_a_clicked_word_are_what_the_cli_writes(browser, server, files, cli_result, shots):
    cli_png, cli_json = cli_result
    user = Page(browser, server)
    shots(user.page, "01-start")
    user.upload(files["scene"])
    user.wait_status(f"{files['scene'].name}: captioned")
    shots(user.page, "02-captioned")
    assert user.words() == cli_json["words"] and len(cli_json["words"]) >= 3
    cli_pixels = np.asarray(Image.open(cli_png).convert("RGB"))
    assert np.array_equal(user.image("#strip"), cli_pixels)  # the strip is the CLI's overlay

    k = 2
    boxes = overlay_panel_boxes(Image.open(cli_png).size, len(cli_json["words"]))
    user.page.locator("#caption-words label").nth(k).click()
    user.page.wait_for_function(
        "t => document.querySelector('#word-info').innerText.includes(t)",
        arg=f"word {k + 1} of {len(cli_json['words'])}",
    )
    shots(user.page, f"03-word-{k + 1}")
    assert np.array_equal(
        user.image("#word-view"), cli_pixels[boxes[k + 1][1] : boxes[k + 1][3], boxes[k + 1][0] : boxes[k + 1][2]]
    )
    link = user.page.locator("#result-json a").first.get_attribute("href")
    ours = json.loads(user.page.request.get(link).body())
    assert {k: v for k, v in ours.items() if k != "image"} == {k: v for k, v in cli_json.items() if k != "image"}
    assert user.external == []  # fonts, scripts, styles: all from the demo's own server


def test_bad_files_get_a_message_and_the_server_keeps_serving(browser, server, files, cli_result, shots):
    user = Page(browser, server)
    user.upload(files["notes"])  # refused by the page itself (not image/*)
    user.page.get_by_text("Invalid file type").first.wait_for()
    user.page.wait_for_timeout(1000)  # the message slides in
    shots(user.page, "04-text-file")
    user.upload(files["fake"])  # named .png, so it reaches the server
    assert "fake.png: not an image in a supported format" in user.wait_status("fake.png")
    shots(user.page, "05-fake-png")
    user.upload(files["large"])
    assert "large.png: image is 300x300 = 90,000 pixels, more than the limit of 40,000" in user.wait_status("large.png")
    assert user.words() == []
    shots(user.page, "06-too-many-pixels")
    user.upload(files["scene"])
    user.wait_status(f"{files['scene'].name}: captioned")
    assert user.words() == cli_result[1]["words"]
    shots(user.page, "07-good-image-after-bad-ones")
    user.page.locator("#examples button.gallery-item").nth(1).click()  # a built-in example scene
    user.wait_status("scene_1.png: captioned")
    assert user.words()
    shots(user.page, "07b-example-scene")


def test_eight_users_at_once_are_all_answered(browser, server, files, cli_result, shots):
    users = [Page(browser, server, wait=False) for _ in range(8)]  # the 8 pages load side by side
    for user in users:
        user.ready()
    start = time.perf_counter()
    for user in users:
        user.upload(files["scene"])
    for user in users:
        user.wait_status(f"{files['scene'].name}: captioned")
    elapsed = time.perf_counter() - start
    for user in users:
        assert user.words() == cli_result[1]["words"]
    shots(users[-1].page, "08-eighth-user")
    print(f"8 concurrent uploads answered in {elapsed:.2f} s")
    (shots.folder / "timing.json").write_text(json.dumps({"eight_users_s": round(elapsed, 3)}))
    for user in users:
        user.context.close()


class GatedDemo(Demo):
    """The real model, but ``slow.png`` waits for a gate; results carry a stubbed sentinel weight."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.started, self.gate = threading.Event(), threading.Event()

    def caption(self, path, name=None, beam_size=None):
        if name == "slow.png":
            self.started.set()
            assert self.gate.wait(120)
        result = super().caption(path, name, beam_size)
        result.sentinel = [0.25] * len(result.words)
        return result


@pytest.fixture
def local_app(tmp_path):
    """Serve a :class:`Demo` (or a problem message) in this process, as ``captioning demo`` does."""
    apps = []

    def serve(demo: Demo | None, problem: str | None = None) -> str:
        port = _free_port()
        app = launch(build_app(demo, problem), "127.0.0.1", port, concurrency=4, allowed_paths=[str(tmp_path)])
        apps.append(app)
        return f"http://127.0.0.1:{port}/"

    yield serve
    for app in apps:
        app.close()


def test_a_second_user_is_answered_while_the_first_request_runs(browser, local_app, ckpt, files, tmp_path, shots):
    from captioning.io.model_folders import load_any

    demo = GatedDemo(load_any(str(ckpt)), str(ckpt), tmp_path / "work", beam_size=2)
    url = local_app(demo)
    slow, fast = tmp_path / "slow.png", tmp_path / "fast.png"
    slow.write_bytes(files["scene"].read_bytes())
    fast.write_bytes(files["scene"].read_bytes())
    first, second = Page(browser, url), Page(browser, url)
    try:
        first.upload(slow)
        assert demo.started.wait(60), "the first request never reached the model"
        second.upload(fast)
        second.wait_status("fast.png: captioned")  # while the first one is still held
        assert "slow.png: captioned" not in first.status() and first.words() == []
        assert "sentinel weight β = 0.25: 75% from the image" in second.page.inner_text("#word-info")
        shots(second.page, "09-second-user-answered-first")
    finally:
        demo.gate.set()
    first.wait_status("slow.png: captioned")
    assert first.words() == second.words()
    shots(first.page, "10-first-user-answered-after")
    first.context.close()  # before the server stops: it waits for open pages
    second.context.close()


def test_a_model_that_cannot_be_loaded_is_a_message_on_the_page(browser, tmp_path, shots):
    port = _free_port()
    missing = tmp_path / "no-such-run"
    proc = subprocess.Popen(
        cli_command("demo", "--ckpt_path", str(missing), "--port", str(port)),
        env=cli_env(tmp_path, OMP_NUM_THREADS="1"),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}/"
        _wait_for_http(url, proc)
        for _ in range(2):  # and it keeps serving
            user = Page(browser, url)
            text = user.wait_status("could not be loaded")
            assert text.strip().startswith("⚠") and str(missing) in text
        shots(user.page, "11-model-cannot-be-loaded")
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert f"error: model {missing} could not be loaded" in out


def test_a_text_model_translates_and_shows_its_heatmap(browser, local_app, tmp_path, shots):
    from captioning.data.text_tasks import SyntheticTextDataModule
    from captioning.models.seq2seq import Seq2SeqModel

    model = Seq2SeqModel(
        vocab=SyntheticTextDataModule(task="dates").vocab_data,
        embed_dim=16,
        encoder_dim=16,
        decoder_dim=32,
        attention_dim=16,
        max_length=12,
    ).eval()
    user = Page(browser, local_app(Demo(model, "tiny-text", tmp_path / "work")))
    user.page.locator("#source-text textarea").fill("12 March 2021")
    user.page.locator("#translate-button").click()
    user.wait_status("translated in")
    heatmap = user.image("#heatmap")
    assert heatmap.shape[0] > 50 and heatmap.shape[1] > 50
    shots(user.page, "12-text-model")
    user.context.close()
