"""``captioning caption (--ckpt_path CKPT | --model DIR_OR_REPO) --output DIR IMAGE_OR_FOLDER ...``.

Captions image files (folders are searched recursively for image extensions) in batches
(beam search over all images of a batch at once) and prints one record per image:
``<image>\\t<caption>`` (``--format tsv``; backslashes, tabs, line breaks and every other
control character in file names are escaped: ``\\\\``, ``\\t``, ``\\n``, ``\\x1b``) or one JSON
object per line (``--format jsonl``). Into DIR it writes ``<stem>.png`` (the image plus one
attention panel per word) and ``<stem>.json`` (caption, per-word attention maps, grid size),
each through a temporary file renamed into place (a failed write leaves the earlier pair whole;
a symbolic link in DIR is replaced, never followed); existing files are kept (new names get
``-1``, ``-2``, ...) unless ``--overwrite``. Files that cannot be read (not an image, too many
pixels) or whose results cannot be written (a full disk) are reported by name, one line each,
on stderr and the others are still captioned; the exit status is 1 if any image failed, 2 when
nothing could start (no model, output not writable). Only the records go to stdout: whatever
else prints while the model loads or runs (a third-party encoder) goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TextIO

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def build_parser() -> argparse.ArgumentParser:
    from captioning.commands.options import add_model_arguments
    from captioning.data.images import DEFAULT_MAX_PIXELS

    p = argparse.ArgumentParser(prog="captioning caption", description=__doc__.split("\n\n")[1])
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, or folders (searched recursively)")
    add_model_arguments(
        p, "checkpoint written by `captioning fit`, or a run folder (its newest valid best*.ckpt is used)"
    )
    p.add_argument(
        "--output", help="folder for the overlay PNGs and JSON files (created); required unless --no_overlays"
    )
    p.add_argument("--format", choices=("tsv", "jsonl"), default="tsv", help="stdout records (default tsv)")
    p.add_argument("--beam_size", type=int, default=None, help="default: the model's own (1 = greedy)")
    p.add_argument("--max_length", type=int, default=None, help="longest caption in words")
    p.add_argument("--allow_unk", action="store_true", help="let captions contain <unk> (default: never)")
    p.add_argument("--batch_size", type=int, default=16, help="images decoded together")
    p.add_argument(
        "--max_pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help=f"refuse images with more pixels than this, each by name (decompression bombs; default "
        f"{DEFAULT_MAX_PIXELS:,})",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs instead of new names")
    p.add_argument("--no_overlays", action="store_true", help="print captions only")
    p.add_argument(
        "--overlay_scale",
        choices=("word", "caption"),
        default="word",
        help="heat colours: each panel to its own maximum (word), or one scale for all panels of a "
        "caption (caption: a flat map stays dim). Each label shows the word's peak weight either way",
    )
    p.add_argument(
        "--progress",
        choices=("auto", "on", "off"),
        default="auto",
        help="progress bar on stderr (auto: with more than one batch on a terminal)",
    )
    return p


def find_images(inputs: Sequence[str]) -> Iterator[Path]:
    """Files as given (whatever their extension), and image files under folders, sorted."""
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        else:
            yield path


def tsv_field(text: str) -> str:
    """One TSV field on one terminal line (:func:`captioning.io.outputs.terminal_text`)."""
    from captioning.io.outputs import terminal_text

    return terminal_text(text)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    records = sys.stdout  # the records' stream; anything else printed meanwhile goes to stderr
    with contextlib.redirect_stdout(sys.stderr):
        return _caption(args, records)


def _caption(args: argparse.Namespace, records: TextIO) -> int:
    from captioning.data.images import ImageReadError, load_image, small_image_warning
    from captioning.io.model_folders import load_any
    from captioning.io.outputs import check_writable, json_line, terminal_text
    from captioning.io.results import write_caption_result
    from captioning.models.inference import caption_images
    from captioning.models.protocols import is_captioner

    def fail(message: str) -> int:
        print(f"error: {terminal_text(message)}", file=sys.stderr)
        return 2

    if args.output is None and not args.no_overlays:
        return fail("--output DIR is needed for the overlays (or --no_overlays to print captions only)")
    out_dir = Path(args.output) if args.output and not args.no_overlays else None
    try:
        if out_dir is not None:
            check_writable(out_dir)  # before loading a model or decoding anything
        if args.ckpt_path is not None:
            from captioning.io.model_loading import find_checkpoint

            args.ckpt_path = str(find_checkpoint(args.ckpt_path))
            print(f"using checkpoint {args.ckpt_path}", file=sys.stderr)
        model = load_any(args.ckpt_path, args.model, args.trust_module, map_location=args.device)
    except (OSError, ValueError, ImportError) as err:
        return fail(str(err))
    if not is_captioner(model):
        return fail(
            f"{args.ckpt_path or args.model} holds a {type(model).__name__}, not an image captioner "
            "(use `captioning translate` for text models)"
        )
    if not model.encoder.sees_images:
        return fail(
            f"{args.ckpt_path or args.model} was trained on precomputed features and has no image "
            "encoder: attach the extractor first (captioning attach-encoder --help)"
        )

    files = list(find_images(args.images))
    if not files:
        return fail(f"no image files found in {', '.join(args.images)}")
    if args.max_pixels < 1:
        return fail(f"--max_pixels must be a positive number of pixels, got {args.max_pixels}")
    max_pixels = args.max_pixels
    failed, done = 0, 0
    show = args.progress == "on" or (args.progress == "auto" and len(files) > args.batch_size and sys.stderr.isatty())
    progress = _progress(len(files), show)
    for start in range(0, len(files), args.batch_size):
        chunk = []
        for path in files[start : start + args.batch_size]:
            try:
                image = load_image(path, max_pixels=max_pixels)
            except ImageReadError as err:
                print(f"error: {terminal_text(str(err))}", file=sys.stderr)
                failed += 1
                continue
            warning = small_image_warning(image, path)
            if warning:
                print(f"warning: {terminal_text(warning)}", file=sys.stderr)
            chunk.append((path, image))
        results = caption_images(
            model,
            [img for _, img in chunk],
            args.beam_size,
            args.max_length,
            allow_unk=True if args.allow_unk else None,
        )
        for (path, image), result in zip(chunk, results):
            written = None
            if out_dir is not None:  # an empty caption still gets its (image-only) overlay and JSON
                try:
                    written = write_caption_result(
                        out_dir,
                        path,
                        result.words,
                        result.attention,
                        image=image,
                        score=result.score,
                        overwrite=args.overwrite,
                        sentinel=result.sentinel,
                        scale=args.overlay_scale,
                    )
                except OSError as err:  # a full disk, a folder made read-only meanwhile: this image only
                    reason = err.strerror or str(err)
                    where = terminal_text(f"{path}: results not written to {out_dir}")
                    print(f"error: {where}: {reason}", file=sys.stderr)
                    failed += 1
            if args.format == "jsonl":
                record = {"image": str(path), "caption": result.text, "score": result.score}
                if written:
                    record.update(overlay=str(written[0]), json=str(written[1]))
                print(json_line(record), file=records, flush=True)
            else:
                print(f"{tsv_field(str(path))}\t{tsv_field(result.text)}", file=records, flush=True)
            done += written is not None or out_dir is None
        progress(len(files[start : start + args.batch_size]))
    progress(0, close=True)
    if out_dir is not None and done:
        print(f"wrote {done} overlay(s) and JSON file(s) to {out_dir}", file=sys.stderr)
    if failed:
        print(f"{failed} of {len(files)} image(s) could not be read or written", file=sys.stderr)
    return 1 if failed else 0


def _progress(total: int, show: bool):
    """update(n) / update(0, close=True); a tqdm bar on stderr when ``show``."""
    if not show:
        return lambda n, close=False: None
    from tqdm import tqdm

    bar = tqdm(total=total, unit="image", file=sys.stderr, dynamic_ncols=True)

    def update(n: int, close: bool = False) -> None:
        bar.update(n)
        if close:
            bar.close()

    return update


if __name__ == "__main__":
    sys.exit(main())
