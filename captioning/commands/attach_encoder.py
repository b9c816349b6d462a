"""``captioning attach-encoder --ckpt_path CKPT --encoder ENCODER.yaml --output NEW.ckpt``: a model
trained on precomputed features (``PrecomputedFeatures`` encoder) gets the real extractor, so it
can caption photos. ENCODER.yaml holds ``class_path`` and ``init_args`` of the extractor (ours:
``captioning.nn.torchvision_encoder.ImageEncoder``, ``captioning.nn.timm_encoder.TimmEncoder``; your own
needs ``--trust_module``). Its grid and channels must match the features the model saw."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from captioning.commands.options import add_trust_argument, fail


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="captioning attach-encoder", description="Give a model trained on precomputed features its image encoder."
    )
    p.add_argument("--ckpt_path", required=True, help="checkpoint (or run folder) of a model trained on features")
    p.add_argument("--encoder", required=True, help="YAML/JSON file with the extractor's class_path and init_args")
    p.add_argument("--output", required=True, help="new checkpoint file (must not exist)")
    add_trust_argument(p)
    args = p.parse_args(argv)
    try:
        from captioning.io.model_loading import attach_encoder

        path = attach_encoder(args.ckpt_path, args.encoder, args.output, args.trust_module)
    except (OSError, ValueError, ImportError) as err:
        return fail(str(err))
    print(f"wrote {path}: caption photos with captioning caption --ckpt_path {path} ...", file=sys.stderr)
    return 0
