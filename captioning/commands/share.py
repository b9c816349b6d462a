"""``captioning export``, ``captioning push`` and ``captioning attach-encoder``.

* ``export --ckpt_path CKPT --output DIR``: a self-contained model folder (safetensors weights,
  config.json, model card with an attention overlay; see captioning/io/model_folders.py).
* ``push --model DIR --repo_id OWNER/NAME``: upload that folder to the Hugging Face Hub (the
  login of ``huggingface-cli login`` or ``$HF_TOKEN``).
* ``attach-encoder --ckpt_path CKPT --encoder ENCODER.yaml --output NEW.ckpt``: a model trained
  on precomputed features (``PrecomputedFeatures`` encoder) gets the real extractor, so it can
  caption photos. ENCODER.yaml holds ``class_path`` and ``init_args`` of the extractor (ours:
  ``captioning.nn.encoders.ImageEncoder``, ``captioning.nn.timm_encoder.TimmEncoder``; your own
  needs ``--trust_module``). Its grid and channels must match the features the model saw.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Sequence


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _trust_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust_module", action="append", default=[], metavar="MODULE",
                   help="allow classes from MODULE (your own encoder); importing it runs its code. Repeatable")


def export_main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="captioning export",
                                description="Write a trained model as a self-contained, shareable model folder.")
    p.add_argument("--ckpt_path", required=True, help="checkpoint, or a run folder (its newest valid best*.ckpt)")
    p.add_argument("--output", required=True, help="new model folder (must not exist or be empty)")
    p.add_argument("--name", help="model name on the card (default: the folder name; use owner/name when "
                                  "you will push it)")
    p.add_argument("--beam_size", type=int, default=None, help="beam for the card's example caption")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    _trust_flag(p)
    args = p.parse_args(argv)
    from captioning.io.model_folders import export_model

    try:
        folder = export_model(args.ckpt_path, args.output, args.trust_module, args.overwrite, args.name, args.beam_size)
    except (OSError, ValueError, ImportError) as err:
        return _fail(str(err))
    print(f"wrote {folder} ({', '.join(sorted(f.name for f in folder.iterdir()))})", file=sys.stderr)
    return 0


def push_main(argv: Sequence[str] | None = None, api=None) -> int:
    p = argparse.ArgumentParser(prog="captioning push", description="Upload a model folder to the Hugging Face Hub.")
    p.add_argument("--model", required=True, help="model folder written by `captioning export`")
    p.add_argument("--repo_id", required=True, help="owner/name of the Hub model repo (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--commit_message", default=None)
    args = p.parse_args(argv)
    from captioning.io.model_folders import push_model

    try:
        info = push_model(args.model, args.repo_id, private=args.private, commit_message=args.commit_message, api=api)
    except (OSError, ValueError, ImportError) as err:
        return _fail(str(err))
    except Exception as err:  # noqa: BLE001 - network/auth errors of huggingface_hub: one line, not a traceback
        return _fail(f"upload to {args.repo_id} failed: {err.__class__.__name__}: {str(err).splitlines()[0]}")
    url = getattr(info, "commit_url", None) or f"https://huggingface.co/{args.repo_id}"
    print(f"uploaded {args.model} to {url}", file=sys.stderr)
    return 0


def attach_main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="captioning attach-encoder",
                                description="Give a model trained on precomputed features its image encoder.")
    p.add_argument("--ckpt_path", required=True, help="checkpoint (or run folder) of a model trained on features")
    p.add_argument("--encoder", required=True, help="YAML/JSON file with the extractor's class_path and init_args")
    p.add_argument("--output", required=True, help="new checkpoint file (must not exist)")
    _trust_flag(p)
    args = p.parse_args(argv)
    try:
        path = attach_encoder(args.ckpt_path, args.encoder, args.output, args.trust_module)
    except (OSError, ValueError, ImportError) as err:
        return _fail(str(err))
    print(f"wrote {path}: caption photos with captioning caption --ckpt_path {path} ...", file=sys.stderr)
    return 0


def attach_encoder(ckpt_path: str, encoder_file: str, output: str, trust_modules: Sequence[str] = ()) -> Path:
    """Write a copy of ``ckpt_path`` whose encoder is the one ``encoder_file`` describes (weights included)."""
    import torch
    import yaml

    from captioning.io.checkpoints import find_checkpoint, read_checkpoint
    from captioning.nn.encoders import encoder_config
    from captioning.data.images import Preprocessing
    from captioning.io.trust import build_encoder, trusted_modules

    out = Path(output)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose another --output (nothing is overwritten)")
    source = find_checkpoint(ckpt_path)
    ckpt = read_checkpoint(source)
    hparams = ckpt["hyper_parameters"]
    old = hparams.get("encoder") if isinstance(hparams, dict) else None
    if not isinstance(old, dict) or old.get("class_path") != "captioning.nn.encoders.PrecomputedFeatures":
        raise ValueError(f"{source} was not trained on precomputed features (its encoder is "
                         f"{(old or {}).get('class_path')!r}); it can caption images as it is")
    try:
        spec = yaml.safe_load(Path(encoder_file).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ValueError(f"{encoder_file}: cannot read it as YAML/JSON ({err})") from err
    if isinstance(spec, dict) and "encoder" in spec and "class_path" not in spec:
        spec = spec["encoder"]  # a config fragment `encoder: {class_path, init_args}`
    encoder = build_encoder(spec, trusted_modules(trust_modules), source=str(encoder_file), restore=False)
    init = old.get("init_args") or {}
    want = (init.get("grid_size"), init.get("channels"))
    if (encoder.grid_size, encoder.out_channels) != want:
        raise ValueError(f"{encoder_file}: the encoder makes {encoder.grid_size}x{encoder.grid_size}x"
                         f"{encoder.out_channels} features, the model was trained on {want[0]}x{want[0]}x{want[1]}")
    recorded = Preprocessing(init.get("image_size", 224), tuple(init.get("mean", (0.485, 0.456, 0.406))),
                             tuple(init.get("std", (0.229, 0.224, 0.225))))
    if encoder.preprocessing != recorded:
        print(f"warning: the model's features were recorded as made with {recorded}; the attached encoder uses "
              f"{encoder.preprocessing}. Captions are only as good as the features match.", file=sys.stderr)
    new = dict(ckpt)
    new["hyper_parameters"] = {**hparams, "encoder": json.loads(json.dumps(encoder_config(encoder)))}
    state = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("encoder.")}
    state.update({f"encoder.{k}": v.detach().cpu() for k, v in encoder.state_dict().items()})
    new["state_dict"] = state
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(new, tmp)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
