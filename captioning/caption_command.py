"""``captioning caption --ckpt_path CKPT --output DIR IMAGE [IMAGE ...]``.

Captions image files with a trained checkpoint, in batches (beam search over all images at
once), prints ``<image>\\t<caption>`` per image and writes ``<stem>.png`` (the image plus one
attention panel per word) and ``<stem>.json`` (caption, per-word attention maps, grid size)
into DIR. Files that cannot be read are reported by name on stderr; the others are still
captioned, and the exit status is 1 if any image failed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import torch

from captioning.images import ImageReadError, load_image, to_tensor


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="captioning caption", description=__doc__.split("\n\n")[1])
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files to caption")
    p.add_argument("--ckpt_path", required=True,
                   help="checkpoint written by `captioning fit`, or a run folder (its newest best*.ckpt is used)")
    p.add_argument("--output", required=True, help="folder for the overlay PNGs and JSON files (created)")
    p.add_argument("--beam_size", type=int, default=None, help="default: the model's own (1 = greedy)")
    p.add_argument("--max_length", type=int, default=None, help="longest caption in words")
    p.add_argument("--batch_size", type=int, default=16, help="images decoded together")
    p.add_argument("--image_size", type=int, default=None, help="resize side; default: the training size")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs instead of new names")
    p.add_argument("--no_overlays", action="store_true", help="print captions only")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from captioning.checkpoints import load_model, find_checkpoint
    from captioning.viz import write_caption_result

    try:
        ckpt = find_checkpoint(args.ckpt_path)
        print(f"using checkpoint {ckpt}", file=sys.stderr)
        model = load_model(ckpt, map_location=args.device)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    size = args.image_size or model.hparams.get("image_size") or 224
    failed = 0
    readable: list[tuple[Path, object]] = []
    for name in args.images:
        try:
            readable.append((Path(name), load_image(name)))
        except ImageReadError as err:
            print(f"error: {err}", file=sys.stderr)
            failed += 1

    out_dir = Path(args.output)
    for start in range(0, len(readable), args.batch_size):
        chunk = readable[start: start + args.batch_size]
        batch = torch.stack([to_tensor(img, size) for _, img in chunk]).to(args.device)
        with torch.inference_mode():
            features = model.encoder(batch)
            result = model.generate(features, beam_size=args.beam_size, max_length=args.max_length)
        words = model.words(result)
        grids = model.attention_grids(result)
        for (path, image), w, grid, score in zip(chunk, words, grids, result.scores.tolist()):
            print(f"{path}\t{' '.join(w)}", flush=True)
            if not args.no_overlays and w:
                png, js = write_caption_result(out_dir, path, w, grid, image=image, score=score,
                                               overwrite=args.overwrite)
                print(f"  wrote {png} and {js}", file=sys.stderr)
    if failed:
        print(f"{failed} of {len(args.images)} image(s) could not be read", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
