"""``captioning demo`` driven through its HTTP API, as an attacker or a crowd would: host names it
does not serve, file routes naming URLs, pictures over the shared page's pixel limit, identical
requests at once, and where users' files are kept (and that they are gone once it stops)."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from support.cli import cli_command, cli_env

pytestmark = pytest.mark.e2e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, host: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


@pytest.fixture(scope="module")
def ckpt(shapes_run):
    return sorted(shapes_run.rglob("best*.ckpt"))[-1]


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    """``captioning demo`` in its own process (its TMPDIR a folder of the test), default limits."""
    pytest.importorskip("gradio")
    root = tmp_path_factory.mktemp("demo_http")
    tmp = root / "tmp"
    tmp.mkdir()
    port = _free_port()
    log = open(root / "demo.log", "w")  # noqa: SIM115 - the server writes into it until the fixture ends
    proc = subprocess.Popen(
        cli_command("demo", "--ckpt_path", str(ckpt), "--port", str(port), "--beam_size", "2"),
        env=cli_env(root, OMP_NUM_THREADS="1", TMPDIR=str(tmp)),
        cwd=root,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 240
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the demo exited: {(root / 'demo.log').read_text()[-3000:]}")
        try:
            if _get(url)[0] == 200:
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail("the demo did not answer")
        time.sleep(0.5)
    yield {"url": url, "proc": proc, "tmp": tmp, "log": root / "demo.log"}
    if proc.poll() is None:
        proc.terminate()
        proc.wait(30)
    log.close()


def test_requests_for_another_host_name_are_refused(server):
    assert _get(server["url"])[0] == 200
    assert _get(server["url"], host=f"localhost:{server['url'].rsplit(':', 1)[1].strip('/')}")[0] == 200
    status, body = _get(server["url"], host="evil.example")
    assert status == 400 and b"evil.example" in body
    assert _get(server["url"] + "gradio_api/info", host="rebind.attacker.test:80")[0] == 400


@pytest.mark.parametrize(
    "route",
    [
        "gradio_api/file=http://example.com/x.png",
        "gradio_api/file=https%3A%2F%2Fexample.com%2Fx.png",
        "gradio_api/file=https%253A%252F%252Fexample.com%252Fx.png",
        "gradio_api/file=//example.com/x.png",
        "gradio_api/file/http://169.254.169.254/latest/meta-data/",
        "file=http://example.com/x.png",
        "gradio_api/proxy=http://example.com/",
    ],
)
def test_file_routes_never_fetch_or_redirect_to_a_url(server, route):
    status, body = _get(server["url"] + route)
    assert status == 403, (status, body[:200])


def _caption(url: str, path: Path, beam: int = 2):
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)
    return client.predict(handle_file(str(path)), beam, api_name="/caption")


def test_the_shared_page_refuses_pictures_over_its_own_pixel_limit(server, tmp_path):
    from captioning.commands.demo import DEMO_MAX_PIXELS

    assert DEMO_MAX_PIXELS < 100_000_000
    big = tmp_path / "big.png"
    Image.new("RGB", (4001, 4001), (90, 120, 200)).save(big)  # 16.0 MP + 8,001 pixels, a small file
    assert big.stat().st_size < 1_000_000
    status = _caption(server["url"], big)[0]
    assert "too many pixels" in status or "pixels" in status, status
    assert f"{DEMO_MAX_PIXELS:,}" in status or str(DEMO_MAX_PIXELS) in status, status


def test_identical_requests_at_once_all_get_whole_files(server, tmp_path):
    from captioning.data.shapes import ShapesDataModule

    scene = ShapesDataModule().export_images("test", [2], tmp_path)[0]
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda _: _caption(server["url"], scene), range(12)))
    words = {str(a[1]["choices"]) if isinstance(a[1], dict) else str(a[1]) for a in answers}
    assert len(words) == 1
    for answer in answers:
        for value in (answer[2], answer[4]):  # the first word's view, the strip: downloaded by the client
            path = value if isinstance(value, str) else value.get("path") if isinstance(value, dict) else None
            assert path and Path(path).is_file(), answer
            with Image.open(path) as image:
                image.load()  # a truncated download fails here


def test_users_files_stay_in_the_private_folder_and_are_gone_when_it_stops(server, tmp_path):
    from captioning.data.shapes import ShapesDataModule

    scene = ShapesDataModule().export_images("test", [3], tmp_path)[0]
    _caption(server["url"], scene)
    tmp = server["tmp"]
    assert not (tmp / "gradio").exists(), "Gradio's shared cache folder must not be used"
    [private] = list(tmp.glob("captioning-demo-*"))
    assert private.stat().st_mode & 0o077 == 0, "the demo's folder is private"
    assert any((private / "gradio").rglob("*.png")), "uploads and results are cached inside it"
    server["proc"].send_signal(signal.SIGTERM)
    server["proc"].wait(30)
    assert not private.exists() and os.listdir(tmp) == [], os.listdir(tmp)


def test_the_command_states_its_pixel_limit():
    from captioning.commands.demo import DEMO_MAX_PIXELS, build_parser

    parser = build_parser()
    assert parser.get_default("max_pixels") == DEMO_MAX_PIXELS
    assert f"{DEMO_MAX_PIXELS:,}" in parser.format_help().replace("\n", " ")
    assert f"{DEMO_MAX_PIXELS:,}" in (Path(__file__).parents[2] / "docs" / "demo.md").read_text()
