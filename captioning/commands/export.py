"""``captioning export --ckpt_path CKPT --output DIR``: a self-contained model folder (safetensors
weights, config.json, a model card with an attention overlay; :mod:`captioning.io.model_folders`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from captioning.commands.options import add_trust_argument, fail


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="captioning export", description="Write a trained model as a self-contained, shareable model folder."
    )
    p.add_argument("--ckpt_path", required=True, help="checkpoint, or a run folder (its newest valid best*.ckpt)")
    p.add_argument("--output", required=True, help="new model folder (must not exist or be empty)")
    p.add_argument(
        "--name", help="model name on the card (default: the folder name; use owner/name when you will push it)"
    )
    p.add_argument("--beam_size", type=int, default=None, help="beam for the card's example caption")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    add_trust_argument(p)
    args = p.parse_args(argv)
    from captioning.io.model_folders import export_model

    try:
        folder = export_model(args.ckpt_path, args.output, args.trust_module, args.overwrite, args.name, args.beam_size)
    except (OSError, ValueError, ImportError) as err:
        return fail(str(err))
    print(f"wrote {folder} ({', '.join(sorted(f.name for f in folder.iterdir()))})", file=sys.stderr)
    return 0
