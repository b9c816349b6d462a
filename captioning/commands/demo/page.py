"""The demo's web page (Gradio): the layout, its request handlers (which turn the model side's
results into what the page shows, problems into one message, never an exception), and
serving it. Gradio is imported only here, and only when the page is built."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from captioning.commands.demo.service import MAX_BEAM, CaptionResult, Demo, DemoError, escape

INSTALL_HINT = "the demo needs gradio: pip install 'attention-captioning[demo]'"
# Set before gradio is imported: no telemetry, no version check, no Hub telemetry.
OFFLINE_ENV = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_DISABLE_TELEMETRY": "1", "GRADIO_SSR_MODE": "False"}


CSS = """
#caption-words .wrap { gap: 0.15em 0.2em; }
#caption-words label { border: none !important; background: transparent !important; box-shadow: none !important;
  padding: 0.1em 0.3em !important; font-size: 1.35em; cursor: pointer; border-radius: 6px; }
#caption-words label:hover { background: #fff1c2 !important; }
#caption-words label.selected { background: #ffd65c !important; }
#caption-words input[type=radio] { display: none; }
#word-view img, #strip img { image-rendering: auto; }
#word-view img { width: 100%; height: 100%; object-fit: contain; }
.word-info { line-height: 1.7; }
.word-info .word { font-size: 1.3em; }
.sentinel-bar { display: inline-block; width: 12em; height: 0.7em; margin-left: 0.6em; background: #cfd8ff;
  border-radius: 3px; vertical-align: middle; overflow: hidden; }
.sentinel-bar span { display: block; height: 100%; background: #e4572e; }
.demo-error { background: #fdecea; border: 1px solid #f3a39b; color: #7d1a12; padding: 0.5em 0.8em;
  border-radius: 6px; }
.demo-warning { background: #fff6d6; border: 1px solid #f0d27a; padding: 0.4em 0.8em; border-radius: 6px;
  margin-bottom: 0.3em; }
.demo-ok { color: #555; }
"""


def require_gradio() -> Any:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    try:
        import gradio as gr
    except ImportError as err:
        from captioning.errors import UserError

        raise UserError(INSTALL_HINT) from err
    return gr


def _message(text: str, kind: str = "error") -> str:
    icon = {"error": "&#9888;&#65039;", "warning": "&#9432;", "ok": ""}[kind]
    return f"<div class='demo-{kind}'>{icon} {escape(text)}</div>" if text else ""


def build_app(demo: Demo | None, problem: str | None = None, examples: Sequence[Path] = ()) -> Any:
    """The Gradio page: for ``demo``'s image captioner or text model, or only ``problem`` (the
    message saying why no model could be loaded)."""
    gr = require_gradio()
    title = "Where the model looked: attention captioning"
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(1800, 3600)) as app:
        gr.Markdown(f"# {title}")
        if demo is None:
            gr.HTML(_message(problem or "no model", "error"), elem_id="status")
            return app
        gr.Markdown(demo.describe(), elem_id="model-info")
        if demo.kind == "image":
            _image_page(gr, demo, examples)
        else:
            _text_page(gr, demo)
    return app


def _image_page(gr: Any, demo: Demo, examples: Sequence[Path]) -> None:
    with gr.Row():
        with gr.Column(scale=2):
            image = gr.Image(
                label="Image: drop, paste or pick one",
                type="filepath",
                sources=["upload", "clipboard"],
                elem_id="input-image",
                height=320,
            )
            beam = gr.Slider(
                1, MAX_BEAM, value=demo.default_beam, step=1, label="Beam size (1 = greedy)", elem_id="beam-size"
            )
            button = gr.Button("Caption", variant="primary", elem_id="caption-button")
            if examples:
                gr.Examples(
                    [[str(p)] for p in examples],
                    inputs=[image],
                    label="Example scenes",
                    cache_examples=False,
                    elem_id="examples",
                )
        with gr.Column(scale=3):
            status = gr.HTML("", elem_id="status")
            words = gr.Radio(
                [],
                label="Caption: click a word to see where the model looked",
                elem_id="caption-words",
                interactive=True,
            )
            with gr.Row():
                with gr.Column(scale=3, min_width=240):
                    word_view = gr.Image(
                        label="Attention for the chosen word",
                        show_label=False,
                        format="png",
                        elem_id="word-view",
                        interactive=False,
                        height=300,
                    )
                with gr.Column(scale=2, min_width=200):
                    word_info = gr.HTML("", elem_id="word-info")
    gr.Markdown("### All words (the overlay `captioning caption` writes)")
    strip = gr.Image(label="All words", show_label=False, format="png", elem_id="strip", interactive=False)
    record = gr.File(label="Result JSON (as `captioning caption` writes it)", elem_id="result-json", interactive=False)
    state = gr.State(None)
    outputs = [status, words, word_view, word_info, strip, record, state]

    def on_caption(upload: Any, beam_size: Any) -> tuple:
        page = caption_request(demo, upload, beam_size)
        choices = [(w, i) for i, w in enumerate(page["words"])]
        return (
            page["status"],
            gr.update(choices=choices, value=0 if choices else None),
            page["word_image"],
            page["word_html"],
            page["strip"],
            page["record"],
            page["result"],
        )

    def on_word(result: CaptionResult | None, index: Any) -> tuple:
        page = word_request(demo, result, index)
        return page["word_image"], page["word_html"]

    # preprocess=False: the handler gets the uploaded file as it is and reads it with our image
    # loader (its checks and messages), not Gradio's PIL conversion.
    # The API has one endpoint, /caption (e.g. gradio_client's predict(handle_file(path), 3, api_name="/caption")).
    events = dict(fn=on_caption, inputs=[image, beam], outputs=outputs, preprocess=False)
    button.click(**events, api_name="caption")
    image.change(**events, api_visibility="private")
    beam.release(**events, api_visibility="private")
    words.input(
        on_word, inputs=[state, words], outputs=[word_view, word_info], concurrency_limit=None, api_visibility="private"
    )


def _text_page(gr: Any, demo: Demo) -> None:
    with gr.Row():
        with gr.Column():
            source = gr.Textbox(label="Sentence", lines=2, elem_id="source-text")
            beam = gr.Slider(1, MAX_BEAM, value=demo.default_beam, step=1, label="Beam size (1 = greedy)")
            button = gr.Button("Translate", variant="primary", elem_id="translate-button")
        with gr.Column():
            status = gr.HTML("", elem_id="status")
            target = gr.Textbox(label="Translation", interactive=False, elem_id="translation")
    heatmap = gr.Image(
        label="Attention: source (columns) x output (rows)", format="png", elem_id="heatmap", interactive=False
    )
    record = gr.File(label="Result JSON (as `captioning translate` writes it)", interactive=False)

    def on_translate(text: str, beam_size: Any) -> tuple:
        page = translate_request(demo, text, beam_size)
        return page["status"], page["translation"], page["heatmap"], page["record"]

    events = dict(fn=on_translate, inputs=[source, beam], outputs=[status, target, heatmap, record])
    button.click(**events, api_name="translate")
    source.submit(**events, api_visibility="private")


def _upload_path(upload: Any) -> tuple[str | None, str | None]:
    """(server path, the user's file name) of an upload payload (Gradio FileData dict, or a path)."""
    if upload is None:
        return None, None
    if isinstance(upload, (str, os.PathLike)):
        return str(upload), Path(upload).name
    if isinstance(upload, dict):
        path, name = upload.get("path"), upload.get("orig_name")
    else:
        path, name = getattr(upload, "path", None), getattr(upload, "orig_name", None)
    return path, name or (Path(path).name if path else None)


def _empty_caption(status: str = "") -> dict:
    return {
        "status": status,
        "words": [],
        "word_image": None,
        "word_html": "",
        "strip": None,
        "record": None,
        "result": None,
    }


def caption_request(demo: Demo, upload: Any, beam_size: Any) -> dict:
    """The image page's caption request: everything it shows, as plain values.

    Keys: ``status`` (HTML: an error or warnings), ``words``, ``word_image`` (the first word's
    heatmap), ``word_html``, ``strip`` and ``record`` (file paths), ``result`` (kept in the
    session for word clicks). Problems come back as a message, never as an exception.
    """
    path, name = _upload_path(upload)
    if path is None:
        return _empty_caption()
    try:
        result = demo.caption(path, name, beam_size)
    except DemoError as err:
        return _empty_caption(_message(str(err)))
    note = f"{result.name}: captioned in {result.seconds:.2f} s (beam {result.beam_size}, score {result.score:.3f})"
    status = "".join(_message(w, "warning") for w in result.warnings) + _message(note, "ok")
    page: dict[str, Any] = {
        "status": status,
        "words": result.words,
        "word_image": None,
        "word_html": "",
        "strip": str(result.strip),
        "record": str(result.record),
        "result": result,
    }
    if result.words:
        view = demo.word(result, 0)
        page.update(word_image=view.image, word_html=view.html)
    else:
        page["word_html"] = "<div class='word-info'>(empty caption)</div>"
    return page


def word_request(demo: Demo, result: CaptionResult | None, index: Any) -> dict:
    """A click on caption word ``index``: its heatmap and description."""
    if result is None or index is None:
        return {"word_image": None, "word_html": ""}
    try:
        view = demo.word(result, int(index))
    except (DemoError, TypeError, ValueError) as err:
        return {"word_image": None, "word_html": _message(str(err))}
    return {"word_image": view.image, "word_html": view.html}


def translate_request(demo: Demo, text: str, beam_size: Any) -> dict:
    """The text page's request: ``status``, ``translation``, ``heatmap`` and ``record`` paths."""
    try:
        tr = demo.translate(text, beam_size)
    except DemoError as err:
        return {"status": _message(str(err)), "translation": "", "heatmap": None, "record": None}
    status = "".join(_message(w, "warning") for w in tr.warnings)
    status += _message(f"translated in {tr.seconds:.2f} s (beam {tr.beam_size})", "ok")
    return {"status": status, "translation": tr.text, "heatmap": str(tr.heatmap), "record": str(tr.record)}


LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
_FILE_ROUTES = ("/gradio_api/file=", "/file=", "/gradio_api/file/", "/file/")
_PROXY_ROUTES = ("/gradio_api/proxy=", "/proxy=")
_URL_LIKE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]+:|//|\\\\|/\\|\\/)")


def allowed_hosts(host: str, share: bool = False, extra: Sequence[str] = ()) -> tuple[str, ...] | None:
    """Host names the page answers to (the ``Host`` header, port left out); None = any.

    Listening on this machine only (the default): its local names, so a web page elsewhere
    cannot reach the demo through a name of its own that resolves to 127.0.0.1 (DNS
    rebinding). A specific address or name: that one too. All interfaces (``0.0.0.0``, ``::``)
    or a share link: any name, unless ``extra`` (``--allowed_hosts``) lists them.
    """
    if extra:
        return tuple(dict.fromkeys([*LOCAL_NAMES, *(h.strip().lower() for h in extra if h.strip())]))
    if share or host in ("0.0.0.0", "::", ""):
        return None
    return tuple(dict.fromkeys([*LOCAL_NAMES, host.lower()]))


def _host_name(header: str) -> str:
    header = header.strip().lower()
    if header.startswith("["):  # [::1]:7860
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _names_a_url(path: str) -> bool:
    """A Gradio file route whose file is a URL (Gradio would fetch it server-side) or any proxy route."""
    if path.startswith(_PROXY_ROUTES):
        return True
    for prefix in _FILE_ROUTES:
        if path.startswith(prefix):
            rest = path[len(prefix) :]
            for _ in range(3):  # encoded once or twice over
                rest = unquote(rest)
            return bool(_URL_LIKE.match(rest.lstrip()))
    return False


class RequestGuard:
    """ASGI middleware in front of the page: refuses requests for other host names (400) and
    file routes naming a URL (403: the page is offline by design; Gradio would fetch any URL
    for any visitor)."""

    def __init__(self, app: Any, hosts: Sequence[str] | None = LOCAL_NAMES) -> None:
        self.app, self.hosts = app, (None if hosts is None else frozenset(hosts))

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            headers = dict(scope.get("headers") or [])
            host = _host_name(headers.get(b"host", b"").decode("latin-1"))
            raw = scope.get("raw_path")
            paths = [scope.get("path", ""), raw.decode("latin-1") if isinstance(raw, bytes) else ""]
            status, text = None, ""
            if self.hosts is not None and host not in self.hosts:
                status, text = 400, f"host {host!r} is not served here (allowed: {', '.join(sorted(self.hosts))})"
            elif any(_names_a_url(p) for p in paths):
                status, text = 403, "this page serves its own files only, never a URL"
            if status is not None:
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                body = text.encode()
                await send(
                    {
                        "type": "http.response.start",
                        "status": status,
                        "headers": [
                            (b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def launch(
    app: Any,
    host: str = "127.0.0.1",
    port: int | None = 7860,
    concurrency: int = 4,
    share: bool = False,
    allowed_paths: Sequence[str] = (),
    hosts: Sequence[str] | None = LOCAL_NAMES,
) -> Any:
    """Serve ``app`` (from :func:`build_app`) in background threads and return it (``app.local_url``;
    ``app.close()`` stops it). Requests are queued; ``concurrency`` of them run at the same time.
    ``hosts``: the host names answered (:func:`allowed_hosts`; None = any)."""
    from starlette.middleware import Middleware

    gr = require_gradio()
    app.queue(default_concurrency_limit=concurrency)
    theme = gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )  # system fonts: nothing to download
    app.launch(
        server_name=host,
        server_port=port,
        share=share,
        quiet=True,
        prevent_thread_lock=True,
        ssr_mode=False,
        theme=theme,
        css=CSS,
        run_history=False,
        footer_links=["api", "settings"],
        allowed_paths=list(allowed_paths),
        max_file_size="200mb",
        app_kwargs={"middleware": [Middleware(RequestGuard, hosts=hosts)]},
    )
    return app
