"""The demo's model side: the model behind the page and its requests as plain functions (no
Gradio needed): caption an image file or translate a sentence into the result files the
``caption`` / ``translate`` commands write (:mod:`captioning.io.results`), cut one word's
view out of the overlay, and say where the word's attention peaks."""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from captioning.viz import overlay_panel_boxes

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
    """One word's heatmap (a PNG file of the CLI panel's pixels, P x P) and its description (HTML)."""

    image: Path
    html: str


@dataclass
class TranslationResult:
    text: str
    heatmap: Path
    record: Path
    seconds: float
    beam_size: int
    warnings: list[str] = field(default_factory=list)


def escape(text: str) -> str:
    import html

    return html.escape(text, quote=True)


def word_html(words: list[str], index: int, attention: np.ndarray, sentinel: list[float] | None) -> str:
    """What the page says about word ``index``: where its attention peaks, and the sentinel weight."""
    a = attention[index]
    h, w = a.shape
    r, c = divmod(int(a.argmax()), w)
    peak = float(a.max())
    parts = [
        f"<b class='word'>{escape(words[index])}</b> &middot; word {index + 1} of {len(words)}",
        f"attention peak: row {r + 1}, column {c + 1} of the {h}&times;{w} grid, weight {peak:.3f} "
        f"({peak * h * w:.1f}&times; a uniform spread)",
    ]
    if sentinel is not None:
        beta = min(max(sentinel[index], 0.0), 1.0)
        parts.append(
            f"<span class='sentinel'>sentinel weight &beta; = {beta:.2f}: {1 - beta:.0%} from the image, "
            f"{beta:.0%} from the language model</span>"
            f"<span class='sentinel-bar' title='image {1 - beta:.0%} | language model {beta:.0%}'>"
            f"<span style='width:{(1 - beta) * 100:.1f}%'></span></span>"
        )
    return "<div class='word-info'>" + "<br>".join(parts) + "</div>"


class Demo:
    """The model behind the page and its request handlers, as plain functions (no gradio needed).

    Args:
        model: a loaded image captioner or text seq2seq model (eval mode).
        name: what the page calls it (the checkpoint path or model folder/repo).
        max_pixels: images with more pixels are refused (``captioning caption --max_pixels``).
        work_dir: per-request output folders (PNG + JSON) go here.
        beam_size: the beam size control's starting value (default: the model's own, at most ``MAX_BEAM``).
    """

    def __init__(
        self, model: Any, name: str, work_dir: Path, max_pixels: int | None = None, beam_size: int | None = None
    ) -> None:
        from captioning.data.images import DEFAULT_MAX_PIXELS
        from captioning.models.protocols import Translator, is_captioner

        self.model, self.name, self.work_dir = model, name, Path(work_dir)
        self.max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
        if is_captioner(model):
            if not model.encoder.sees_images:
                raise DemoError(
                    f"{name} was trained on precomputed features and has no image encoder, so it "
                    "cannot caption photos: attach the extractor first (captioning attach-encoder --help)"
                )
            self.kind = "image"
        elif isinstance(model, Translator):
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
        from captioning.data.images import ImageReadError, load_image

        if self.kind != "image":
            raise DemoError(f"{self.name} is a text model: type a sentence instead")
        name = Path(name or Path(path).name).name or "image"
        beam = self._beam(beam_size)
        try:
            image = load_image(path, max_pixels=self.max_pixels)
        except ImageReadError as err:  # the message starts with the server-side path: show the user's name
            raise DemoError(str(err).replace(str(path), name, 1)) from err
        try:
            return self._caption(image, name, beam)
        finally:
            del image
            release_memory()  # a large photo's pixels go back to the system, not to this process's heap

    def _caption(self, image: Image.Image, name: str, beam: int) -> CaptionResult:
        from captioning.data.images import small_image_warning
        from captioning.io.results import write_caption_result
        from captioning.models.inference import caption_images

        warnings = [w for w in [small_image_warning(image, name)] if w]
        start = time.perf_counter()
        result = caption_images(self.model, [image], beam_size=beam)[0]
        seconds = time.perf_counter() - start
        attention = result.attention.detach().float().cpu().numpy()
        strip, record = write_caption_result(
            self._request_dir(),
            name,
            result.words,
            attention,
            image=image,
            score=result.score,
            overwrite=True,
            remember=False,
            sentinel=result.sentinel,
        )
        return CaptionResult(
            name,
            list(result.words),
            attention,
            float(result.score),
            strip,
            record,
            seconds,
            beam,
            result.sentinel,
            warnings,
        )

    def word(self, result: CaptionResult, index: int) -> WordView:
        """Word ``index``'s heatmap: its panel cut out of the CLI's overlay (the same pixels), as a
        PNG file of the request's own folder (Gradio serves files by their path; a picture handed
        to it instead is written into its shared cache under a content hash, rewritten in place
        when two requests draw the same one, which truncated downloads)."""
        index = int(index)
        if not 0 <= index < len(result.words):
            raise DemoError(f"no word {index + 1} in a caption of {len(result.words)} word(s)")
        path = result.strip.parent / f"word-{index + 1:03d}.png"
        if not path.is_file():
            with Image.open(result.strip) as strip:
                strip.load()
                box = overlay_panel_boxes(
                    strip.size, len(result.words), CLI_PANEL_SIZE, sentinel=result.sentinel is not None
                )[index + 1]
                panel = strip.convert("RGB").crop(box)
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
            panel.save(tmp, format="PNG")
            os.replace(tmp, path)  # whole or absent: a second click may read it at once
        return WordView(path, word_html(result.words, index, result.attention, result.sentinel))

    def translate(self, text: str, beam_size: Any = None) -> TranslationResult:
        """Translate one sentence; writes the heatmap PNG and JSON ``captioning translate`` writes."""
        from captioning.io.results import sentence_stem, write_translation_result

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
        png, record = write_translation_result(
            self._request_dir(), sentence_stem(text), tr, "demo", text, overwrite=True, remember=False
        )
        return TranslationResult(tr.text, png, record, seconds, beam, warnings)


def release_memory() -> None:
    """Hand freed memory back to the operating system (glibc keeps freed blocks of large images
    in its heap otherwise: a few requests with big photos left the server gigabytes larger)."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return
    trim(0)


def example_images(folder: Path, model: Any, count: int = 3) -> list[Path]:
    """A few scenes of the built-in shapes dataset (and the checkpoint's own example image, when
    it carries one) as PNG files in ``folder``: the page's examples."""
    from captioning.data.shape_scenes import generate_scene
    from captioning.io.model_card import unpack_example

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    example = unpack_example((getattr(model, "checkpoint_info", None) or {}).get("example"))
    if example is not None:  # the id comes from the model file: any characters, "/" and ".." included
        safe_id = re.sub(r"[^A-Za-z0-9_-]+", "_", str(example["image_id"]))[:60].strip("_") or "image"
        path = folder / f"example_{safe_id}.png"
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
