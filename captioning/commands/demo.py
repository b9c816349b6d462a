"""``captioning demo (--model DIR_OR_REPO | --ckpt_path CKPT) [--host 127.0.0.1] [--port 7860]``.

A local web page (Gradio, the optional extra ``.[demo]``) to try a trained model: drop or pick
an image (a few built-in example scenes are offered), caption it with a chosen beam size, click
a word of the caption to see where the model looked for it, look at the strip of all words and
download the result's JSON. A text model gets a sentence box, its translation and the source x
target heatmap instead. Pictures and files are the ones ``captioning caption`` / ``translate``
write for the same input: the strip *is* the CLI's overlay PNG, a word's view is that word's
panel cut out of it, and the JSON is the CLI's.

The model is loaded once and shared by all requests (inference only, under
``torch.inference_mode``; nothing is stored on it per request); requests go through Gradio's
queue, ``--concurrency`` of them at a time, so a second user is answered while the first
one's request runs. The page never needs the network: analytics, version checks and share
links are off (``--share`` asks for a public link), fonts and scripts come from the local
server. A file that is not an image, an image over ``--max_pixels`` and a model that cannot
be loaded are shown on the page as one clear message; the server keeps serving.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from captioning.viz import overlay_panel_boxes

INSTALL_HINT = "the demo needs gradio: pip install 'attention-captioning[demo]'"
# Set before gradio is imported: no telemetry, no version check, no Hub telemetry.
OFFLINE_ENV = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_DISABLE_TELEMETRY": "1", "GRADIO_SSR_MODE": "False"}
# The overlay panel size of ``captioning caption`` (attention_overlay's default, used by write_caption_result).
CLI_PANEL_SIZE = 160
MAX_BEAM = 10


class DemoError(ValueError):
    """A request the page answers with a message (not an image, too many pixels, no model ...)."""


# ----------------------------------------------------------------------------- results
@dataclass
class CaptionResult:
    """One captioned image as the page shows it.

    ``attention`` (T, H, W); ``strip``/``record``: the PNG and JSON ``captioning caption`` writes;
    ``sentinel``: per-word weight of the visual sentinel (models with one), else None."""

    name: str
    words: list[str]
    attention: np.ndarray
    score: float
    strip: Path
    record: Path
    seconds: float
    beam_size: int
    sentinel: list[float] | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass
class WordView:
    """One word's heatmap (the CLI panel's pixels, P x P) and its description (HTML)."""

    image: Image.Image
    html: str


@dataclass
class TranslationResult:
    text: str
    heatmap: Path
    record: Path
    seconds: float
    beam_size: int
    warnings: list[str] = field(default_factory=list)


def _escape(text: str) -> str:
    import html

    return html.escape(text, quote=True)


def word_html(words: list[str], index: int, attention: np.ndarray, sentinel: list[float] | None) -> str:
    """What the page says about word ``index``: where its attention peaks, and the sentinel weight."""
    a = attention[index]
    h, w = a.shape
    r, c = divmod(int(a.argmax()), w)
    peak = float(a.max())
    parts = [f"<b class='word'>{_escape(words[index])}</b> &middot; word {index + 1} of {len(words)}",
             f"attention peak: row {r + 1}, column {c + 1} of the {h}&times;{w} grid, weight {peak:.3f} "
             f"({peak * h * w:.1f}&times; a uniform spread)"]
    if sentinel is not None:
        beta = min(max(sentinel[index], 0.0), 1.0)
        parts.append(f"<span class='sentinel'>sentinel weight &beta; = {beta:.2f}: {1 - beta:.0%} from the image, "
                     f"{beta:.0%} from the language model</span>"
                     f"<span class='sentinel-bar' title='image {1 - beta:.0%} | language model {beta:.0%}'>"
                     f"<span style='width:{(1 - beta) * 100:.1f}%'></span></span>")
    return "<div class='word-info'>" + "<br>".join(parts) + "</div>"


# ----------------------------------------------------------------------------- the model side
class Demo:
    """The model behind the page and its request handlers, as plain functions (no gradio needed).

    Args:
        model: a loaded image captioner or text seq2seq model (eval mode).
        name: what the page calls it (the checkpoint path or model folder/repo).
        max_pixels: images with more pixels are refused (``captioning caption --max_pixels``).
        work_dir: per-request output folders (PNG + JSON) go here.
        beam_size: the beam size control's starting value (default: the model's own, at most ``MAX_BEAM``).
    """

    def __init__(self, model: Any, name: str, work_dir: Path, max_pixels: int | None = None,
                 beam_size: int | None = None) -> None:
        from captioning.data.images import DEFAULT_MAX_PIXELS
        from captioning.models.inference import is_image_captioner

        self.model, self.name, self.work_dir = model, name, Path(work_dir)
        self.max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
        if is_image_captioner(model):
            if not model.encoder.sees_images:
                raise DemoError(f"{name} was trained on precomputed features and has no image encoder, so it "
                                "cannot caption photos: attach the extractor first (captioning attach-encoder --help)")
            self.kind = "image"
        elif hasattr(model, "translate"):
            self.kind = "text"
        else:
            raise DemoError(f"{name} holds a {type(model).__name__}: neither an image captioner nor a text model")
        self.default_beam = min(MAX_BEAM, max(1, int(model.hparams.get("beam_size") or 1)))  # the model's own
        if beam_size is not None:
            self.default_beam = self._beam(beam_size)
        self._prune_lock = threading.Lock()

    def describe(self) -> str:
        """One line about the model (Markdown)."""
        params = sum(p.numel() for p in self.model.parameters())
        what = type(self.model).__name__
        if self.kind == "image":
            g = self.model.grid_size
            what += f", {g}&times;{g} attention grid, {self.model.encoder.preprocessing.image_size} px input"
        return f"**Model** `{self.name}` ({what}, {params / 1e6:.2f} M parameters, default beam {self.default_beam})"

    def _request_dir(self) -> Path:
        """A fresh folder for one request's files; folders older than an hour are removed (Gradio
        has copied what it serves into its own cache by then)."""
        with self._prune_lock:
            now = time.time()
            for old in self.work_dir.glob("req-*"):
                try:
                    if now - old.stat().st_mtime > 3600:
                        shutil.rmtree(old, ignore_errors=True)
                except OSError:
                    pass
        folder = self.work_dir / f"req-{uuid.uuid4().hex}"
        folder.mkdir(parents=True)
        return folder

    def _beam(self, beam_size: Any) -> int:
        try:
            beam = int(beam_size) if beam_size is not None else self.default_beam
        except (TypeError, ValueError) as err:
            raise DemoError(f"beam size must be a whole number, got {beam_size!r}") from err
        if not 1 <= beam <= MAX_BEAM:
            raise DemoError(f"beam size must be between 1 and {MAX_BEAM}, got {beam}")
        return beam

    def caption(self, path: str | os.PathLike, name: str | None = None, beam_size: Any = None) -> CaptionResult:
        """Caption the image file ``path`` (shown as ``name``); the CLI's PNG and JSON are written
        for it. Raises :class:`DemoError` with a one-line message for unusable files."""
        from captioning.data.images import ImageReadError, load_image, small_image_warning
        from captioning.models.inference import caption_images
        from captioning.viz import write_caption_result

        if self.kind != "image":
            raise DemoError(f"{self.name} is a text model: type a sentence instead")
        name = Path(name or Path(path).name).name or "image"
        beam = self._beam(beam_size)
        try:
            image = load_image(path, max_pixels=self.max_pixels)
        except ImageReadError as err:  # the message starts with the server-side path: show the user's name
            raise DemoError(str(err).replace(str(path), name, 1)) from err
        warnings = [w for w in [small_image_warning(image, name)] if w]
        start = time.perf_counter()
        result = caption_images(self.model, [image], beam_size=beam)[0]
        seconds = time.perf_counter() - start
        attention = result.attention.detach().float().cpu().numpy()
        strip, record = write_caption_result(self._request_dir(), name, result.words, attention, image=image,
                                             score=result.score, overwrite=True, remember=False,
                                             sentinel=result.sentinel)
        return CaptionResult(name, list(result.words), attention, float(result.score), strip, record, seconds, beam,
                             result.sentinel, warnings)

    def word(self, result: CaptionResult, index: int) -> WordView:
        """Word ``index``'s heatmap: its panel cut out of the CLI's overlay (the same pixels)."""
        index = int(index)
        if not 0 <= index < len(result.words):
            raise DemoError(f"no word {index + 1} in a caption of {len(result.words)} word(s)")
        with Image.open(result.strip) as strip:
            strip.load()
            box = overlay_panel_boxes(strip.size, len(result.words), CLI_PANEL_SIZE,
                                      sentinel=result.sentinel is not None)[index + 1]
            panel = strip.convert("RGB").crop(box)
        return WordView(panel, word_html(result.words, index, result.attention, result.sentinel))

    def translate(self, text: str, beam_size: Any = None) -> TranslationResult:
        """Translate one sentence; writes the heatmap PNG and JSON ``captioning translate`` writes."""
        from captioning.commands.translate import heatmap_stem, translation_record, write_heatmap
        from captioning.viz import seq2seq_heatmap

        if self.kind != "text":
            raise DemoError(f"{self.name} is an image captioner: give it an image")
        text = (text or "").strip()
        if not text:
            raise DemoError("type a sentence to translate")
        beam = self._beam(beam_size)
        try:
            self.model.encode_texts([text])
        except ValueError as err:
            raise DemoError(str(err).replace("input 1", "the sentence")) from err
        warnings = list(self.model.source_report(text).warnings())
        start = time.perf_counter()
        with torch.inference_mode():
            tr = self.model.translate([text], beam)[0]
        seconds = time.perf_counter() - start
        figure = seq2seq_heatmap(tr.source_tokens, tr.target_tokens, tr.alpha, sentinel=tr.sentinel)
        png = write_heatmap(self._request_dir(), heatmap_stem(text), translation_record(tr, "demo", text), figure,
                            overwrite=True, remember=False)
        return TranslationResult(tr.text, png, png.with_suffix(".json"), seconds, beam, warnings)


def example_images(folder: Path, model: Any, count: int = 3) -> list[Path]:
    """A few scenes of the built-in shapes dataset (and the checkpoint's own example image, when
    it carries one) as PNG files in ``folder``: the page's examples."""
    from captioning.io.model_card import unpack_example
    from captioning.data.shapes import generate_scene

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    example = unpack_example((getattr(model, "checkpoint_info", None) or {}).get("example"))
    if example is not None:
        path = folder / f"example_{example['image_id']}.png"
        example["image"].save(path)
        paths.append(path)
    size = int(min(256, max(64, 2 * model.encoder.preprocessing.image_size)))
    rng = np.random.default_rng(2024)
    for i in range(count):
        scene = generate_scene(rng, size, num_objects=1 + i % 3)
        path = folder / f"scene_{i + 1}.png"
        Image.fromarray(scene.pixels, "RGB").save(path)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------- the page
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


def _require_gradio() -> Any:
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
    return f"<div class='demo-{kind}'>{icon} {_escape(text)}</div>" if text else ""


def build_app(demo: Demo | None, problem: str | None = None, examples: Sequence[Path] = ()) -> Any:
    """The Gradio page: for ``demo``'s image captioner or text model, or only ``problem`` (the
    message saying why no model could be loaded)."""
    gr = _require_gradio()
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
            image = gr.Image(label="Image: drop, paste or pick one", type="filepath", sources=["upload", "clipboard"],
                             elem_id="input-image", height=320)
            beam = gr.Slider(1, MAX_BEAM, value=demo.default_beam, step=1, label="Beam size (1 = greedy)",
                             elem_id="beam-size")
            button = gr.Button("Caption", variant="primary", elem_id="caption-button")
            if examples:
                gr.Examples([[str(p)] for p in examples], inputs=[image], label="Example scenes",
                            cache_examples=False, elem_id="examples")
        with gr.Column(scale=3):
            status = gr.HTML("", elem_id="status")
            words = gr.Radio([], label="Caption: click a word to see where the model looked", elem_id="caption-words",
                             interactive=True)
            with gr.Row():
                with gr.Column(scale=3, min_width=240):
                    word_view = gr.Image(label="Attention for the chosen word", show_label=False, format="png",
                                         elem_id="word-view", interactive=False, height=300)
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
        return (page["status"], gr.update(choices=choices, value=0 if choices else None), page["word_image"],
                page["word_html"], page["strip"], page["record"], page["result"])

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
    words.input(on_word, inputs=[state, words], outputs=[word_view, word_info], concurrency_limit=None,
                api_visibility="private")


def _text_page(gr: Any, demo: Demo) -> None:
    with gr.Row():
        with gr.Column():
            source = gr.Textbox(label="Sentence", lines=2, elem_id="source-text")
            beam = gr.Slider(1, MAX_BEAM, value=demo.default_beam, step=1, label="Beam size (1 = greedy)")
            button = gr.Button("Translate", variant="primary", elem_id="translate-button")
        with gr.Column():
            status = gr.HTML("", elem_id="status")
            target = gr.Textbox(label="Translation", interactive=False, elem_id="translation")
    heatmap = gr.Image(label="Attention: source (columns) x output (rows)", format="png", elem_id="heatmap",
                       interactive=False)
    record = gr.File(label="Result JSON (as `captioning translate` writes it)", interactive=False)

    def on_translate(text: str, beam_size: Any) -> tuple:
        page = translate_request(demo, text, beam_size)
        return page["status"], page["translation"], page["heatmap"], page["record"]

    events = dict(fn=on_translate, inputs=[source, beam], outputs=[status, target, heatmap, record])
    button.click(**events, api_name="translate")
    source.submit(**events, api_visibility="private")


# ----------------------------------------------------------------------------- request handlers
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
    return {"status": status, "words": [], "word_image": None, "word_html": "", "strip": None, "record": None,
            "result": None}


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
    page = {"status": status, "words": result.words, "word_image": None, "word_html": "",
            "strip": str(result.strip), "record": str(result.record), "result": result}
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


# ----------------------------------------------------------------------------- command
def build_parser() -> argparse.ArgumentParser:
    from captioning.data.images import DEFAULT_MAX_PIXELS
    from captioning.io.model_folders import add_model_arguments

    p = argparse.ArgumentParser(prog="captioning demo", description=__doc__.split("\n\n")[1])
    add_model_arguments(p, "checkpoint written by `captioning fit`, or a run folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                                                       "only; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--share", action="store_true", help="also ask Gradio for a public share link (needs the "
                                                        "internet; off by default)")
    p.add_argument("--beam_size", type=int, default=None, help="the beam size control's starting value "
                                                               "(default: the model's own)")
    p.add_argument("--concurrency", type=int, default=4, help="requests decoded at the same time (default 4); "
                                                              "more wait in the queue")
    p.add_argument("--max_pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"refuse images with more pixels than this (default {DEFAULT_MAX_PIXELS:,})")
    p.add_argument("--no_examples", action="store_true", help="do not offer the built-in example scenes")
    return p


def load_demo(args: argparse.Namespace, work_dir: Path) -> tuple[Demo | None, str | None]:
    """The model of ``--ckpt_path``/``--model`` as a :class:`Demo`, or (None, the one-line reason)."""
    from captioning.io.model_folders import load_any

    name = args.ckpt_path or args.model
    try:
        ckpt = args.ckpt_path
        if ckpt is not None:
            from captioning.io.checkpoints import find_checkpoint

            ckpt = str(find_checkpoint(ckpt))
        model = load_any(ckpt, args.model, args.trust_module, map_location=args.device)
        return Demo(model, ckpt or name, work_dir, args.max_pixels, args.beam_size), None
    except (OSError, ValueError, ImportError, RuntimeError, KeyError, TypeError) as err:
        from captioning.errors import debug_mode

        if debug_mode():  # --debug: the traceback, not a message
            raise
        text = " ".join(str(err).split()) or type(err).__name__
        return None, f"model {name} could not be loaded: {text}"


def launch(app: Any, host: str = "127.0.0.1", port: int | None = 7860, concurrency: int = 4, share: bool = False,
           allowed_paths: Sequence[str] = ()) -> Any:
    """Serve ``app`` (from :func:`build_app`) in background threads and return it (``app.local_url``;
    ``app.close()`` stops it). Requests are queued; ``concurrency`` of them run at the same time."""
    gr = _require_gradio()
    app.queue(default_concurrency_limit=concurrency)
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])  # system fonts: nothing to download
    app.launch(server_name=host, server_port=port, share=share, quiet=True, prevent_thread_lock=True, ssr_mode=False,
               theme=theme, css=CSS, run_history=False, footer_links=["api", "settings"],
               allowed_paths=list(allowed_paths), max_file_size="200mb")
    return app


def _stop(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from captioning.errors import UserError

    if args.concurrency < 1 or args.max_pixels < 1:
        raise UserError("--concurrency and --max_pixels must be positive")
    if args.beam_size is not None and not 1 <= args.beam_size <= MAX_BEAM:
        raise UserError(f"--beam_size must be between 1 and {MAX_BEAM}, got {args.beam_size}")
    _require_gradio()  # before the (slow) model load: say at once what is missing
    work_dir = Path(tempfile.mkdtemp(prefix="captioning-demo-"))
    try:
        demo, problem = load_demo(args, work_dir)
        if problem:
            print(f"error: {problem} (the page shows this message)", file=sys.stderr)
        examples = []
        if demo is not None and demo.kind == "image" and not args.no_examples:
            examples = example_images(work_dir / "examples", demo.model)
        try:
            app = launch(build_app(demo, problem, examples), args.host, args.port, args.concurrency, args.share,
                         [str(work_dir)])
        except OSError as err:  # port taken, address not on this machine
            reason = " ".join(str(err).split(". ")[0].split()) or type(err).__name__
            raise UserError(f"cannot serve on {args.host}:{args.port} ({reason}): choose another --port or --host") \
                from err
        print(f"demo of {args.ckpt_path or args.model} at {app.local_url} (Ctrl-C to stop)", file=sys.stderr,
              flush=True)
        if app.share_url:
            print(f"public link: {app.share_url}", file=sys.stderr, flush=True)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _stop)  # `kill` stops it as Ctrl-C does (temporary files removed)
        app.block_thread()  # until Ctrl-C
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return 2 if problem else 0


if __name__ == "__main__":
    sys.exit(main())
