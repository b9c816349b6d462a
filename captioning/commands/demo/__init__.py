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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from captioning.commands.demo.page import (
    allowed_hosts,
    build_app,
    caption_request,
    launch,
    require_gradio,
    translate_request,
    word_request,
)
from captioning.commands.demo.service import (
    MAX_BEAM,
    CaptionResult,
    Demo,
    DemoError,
    TranslationResult,
    WordView,
    example_images,
    word_html,
)

__all__ = [
    "CaptionResult",
    "Demo",
    "DemoError",
    "TranslationResult",
    "WordView",
    "allowed_hosts",
    "build_app",
    "build_parser",
    "caption_request",
    "example_images",
    "launch",
    "load_demo",
    "main",
    "translate_request",
    "word_html",
    "word_request",
]


# A shared page decodes strangers' uploads, several at once: a tighter limit than the CLI's.
DEMO_MAX_PIXELS = 16_000_000


def build_parser() -> argparse.ArgumentParser:
    from captioning.commands.options import add_model_arguments
    from captioning.data.images import DEFAULT_MAX_PIXELS

    p = argparse.ArgumentParser(prog="captioning demo", description=__doc__.split("\n\n")[1])
    add_model_arguments(p, "checkpoint written by `captioning fit`, or a run folder")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)",
    )
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument(
        "--share",
        action="store_true",
        help="also ask Gradio for a public share link (needs the internet; off by default)",
    )
    p.add_argument(
        "--beam_size", type=int, default=None, help="the beam size control's starting value (default: the model's own)"
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=4,
        help="requests decoded at the same time (default 4); more wait in the queue",
    )
    p.add_argument(
        "--max_pixels",
        type=int,
        default=DEMO_MAX_PIXELS,
        help=f"refuse images with more pixels than this (default {DEMO_MAX_PIXELS:,}: a large phone photo; "
        f"each request holds its decoded pixels, 3 bytes each, several times over; the CLI allows "
        f"{DEFAULT_MAX_PIXELS:,})",
    )
    p.add_argument(
        "--allowed_hosts",
        nargs="+",
        default=(),
        metavar="NAME",
        help="host names the page answers to besides localhost (default: localhost names, and the "
        "--host address; any name with --host 0.0.0.0 or --share unless this lists them)",
    )
    p.add_argument("--no_examples", action="store_true", help="do not offer the built-in example scenes")
    return p


def load_demo(args: argparse.Namespace, work_dir: Path) -> tuple[Demo | None, str | None]:
    """The model of ``--ckpt_path``/``--model`` as a :class:`Demo`, or (None, the one-line reason)."""
    from captioning.io.model_folders import load_any

    name = args.ckpt_path or args.model
    try:
        ckpt = args.ckpt_path
        if ckpt is not None:
            from captioning.io.model_loading import find_checkpoint

            ckpt = str(find_checkpoint(ckpt))
        model = load_any(ckpt, args.model, args.trust_module, map_location=args.device)
        return Demo(model, ckpt or name, work_dir, args.max_pixels, args.beam_size), None
    except (OSError, ValueError, ImportError, RuntimeError, KeyError, TypeError) as err:
        from captioning.errors import debug_mode

        if debug_mode():  # --debug: the traceback, not a message
            raise
        text = " ".join(str(err).split()) or type(err).__name__
        return None, f"model {name} could not be loaded: {text}"


def _stop(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from captioning.errors import UserError

    if args.concurrency < 1 or args.max_pixels < 1:
        raise UserError("--concurrency and --max_pixels must be positive")
    if args.beam_size is not None and not 1 <= args.beam_size <= MAX_BEAM:
        raise UserError(f"--beam_size must be between 1 and {MAX_BEAM}, got {args.beam_size}")
    work_dir = Path(tempfile.mkdtemp(prefix="captioning-demo-"))  # private (0700), removed on exit
    # Gradio's cache (uploads, served copies of results: users' photos) inside it, not in the
    # world-readable /tmp/gradio that outlives the server. Read by gradio when the app is built.
    previous_cache = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(work_dir / "gradio")
    try:
        require_gradio()  # before the (slow) model load: say at once what is missing
        demo, problem = load_demo(args, work_dir)
        if problem:
            print(f"error: {problem} (the page shows this message)", file=sys.stderr)
        examples = []
        if demo is not None and demo.kind == "image" and not args.no_examples:
            examples = example_images(work_dir / "examples", demo.model)
        try:
            hosts = allowed_hosts(args.host, args.share, args.allowed_hosts)
            app = launch(
                build_app(demo, problem, examples),
                args.host,
                args.port,
                args.concurrency,
                args.share,
                [str(work_dir)],
                hosts,
            )
        except OSError as err:  # port taken, address not on this machine
            reason = " ".join(str(err).split(". ")[0].split()) or type(err).__name__
            raise UserError(
                f"cannot serve on {args.host}:{args.port} ({reason}): choose another --port or --host"
            ) from err
        print(
            f"demo of {args.ckpt_path or args.model} at {app.local_url} (Ctrl-C to stop)", file=sys.stderr, flush=True
        )
        if app.share_url:
            print(f"public link: {app.share_url}", file=sys.stderr, flush=True)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _stop)  # `kill` stops it as Ctrl-C does (temporary files removed)
        app.block_thread()  # until Ctrl-C
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
        if previous_cache is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = previous_cache
    return 2 if problem else 0


if __name__ == "__main__":
    sys.exit(main())
