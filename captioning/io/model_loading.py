"""Load a trained model from a Lightning checkpoint with ``weights_only=True``.

Everything needed (vocabulary, model sizes, encoder config) is plain data in the
checkpoint's ``hyper_parameters``. The classes it names are built by
:func:`captioning.io.trust.build_model` (our model and encoder classes, or user classes the user
trusts; nothing else is imported or called). The encoder is rebuilt without pretrained
weights: the checkpoint's state dict holds the trained ones, so captioning works offline even
when the ImageNet weights file is not on this machine.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from captioning.io.checkpoint_integrity import find_checkpoint
from captioning.io.trust import build_model, trusted_modules

__all__ = [
    "find_checkpoint",
    "read_checkpoint",
    "load_model",
    "build_for_weights",
    "check_finite_weights",
    "attach_encoder",
]


def read_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint written by ``captioning fit`` (``weights_only=True``), or say why not.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointReadError: not a file; damaged or truncated; holds pickled Python objects
            other than tensors and plain data; or a PyTorch file that is not one of our
            checkpoints (no ``state_dict`` / ``hyper_parameters``).
    """
    from captioning.io.checkpoint_files import CheckpointReadError, load_checkpoint_file

    path = Path(path)
    ckpt = load_checkpoint_file(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        what = f"keys {sorted(map(str, ckpt))[:6]}" if isinstance(ckpt, dict) else f"a {type(ckpt).__name__}"
        raise CheckpointReadError(
            f"{path} is a PyTorch file but not a checkpoint of this package ({what}, "
            "no state_dict/hyper_parameters); give a .ckpt written by `captioning fit`"
        )
    return ckpt


def state_dict_problem(err: RuntimeError) -> str:
    """torch's multi-line load_state_dict error -> its first problem and how many there are, on one line."""
    problems = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
    if not problems:
        return str(err).strip().splitlines()[0] if str(err).strip() else "weights do not fit"
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return problems[0].rstrip(".") + more


def build_for_weights(
    class_path: Any, init_args: dict, trust: Sequence[str], source: str, shapes: dict[str, tuple[int, ...]]
) -> Any:
    """Build the model a file describes, after checking on the meta device (no memory) that the
    sizes it declares are the sizes of the weights it holds.

    A model file is a few numbers (grid 866, channels 1000, ...) and the weights; the numbers
    alone decide how much memory building the model takes. Building it first on PyTorch's meta
    device costs nothing and gives every tensor's shape: each must be the stored one, and the
    whole model (buffers included) may not be much larger than what is stored.

    Raises:
        ValueError: naming ``source`` and the first tensor that differs.
    """
    with torch.device("meta"):
        skeleton = build_model(class_path, copy.deepcopy(init_args), trust, source)
    # The model's own load hooks run (checkpoints of earlier releases name some tensors differently).
    stored = {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}
    try:
        missing, unexpected = skeleton.load_state_dict(stored, strict=False)
    except RuntimeError as err:  # size mismatches
        raise ValueError(
            f"{source}: the sizes it declares do not match its weights: {state_dict_problem(err)}"
        ) from None
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match {type(skeleton).__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    needed = sum(t.numel() for t in [*skeleton.parameters(), *skeleton.buffers()])
    held = sum(math.prod(shape) for shape in shapes.values())
    if needed > 2 * held + 50_000_000:  # non-persistent buffers sized by a declared number
        raise ValueError(
            f"{source}: the model it declares needs {needed:,} numbers but the file stores {held:,}; refused"
        )
    return build_model(class_path, init_args, trust, source)


def check_finite_weights(model: torch.nn.Module, source: str) -> None:
    """Refuse weights holding NaN or infinite values (they caption nothing but padding)."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(
                f"{source}: the weights hold NaN or infinite values (first: {name}); the training that wrote "
                "them diverged: use an earlier checkpoint or train again"
            )


def load_model(
    path: str | Path,
    default_class: str = "captioning.models.image_captioner.ImageCaptioner",
    map_location: str | torch.device = "cpu",
    trust_modules: Sequence[str] = (),
) -> pl.LightningModule:
    """Rebuild the LightningModule saved in ``path`` (file or run folder) and load its weights (eval mode).

    Args:
        default_class: the model class when the checkpoint does not name one (models trained
            outside the CLI).
        trust_modules: modules (beyond ours) whose classes the checkpoint may name; see
            :mod:`captioning.io.trust` (``$CAPTIONING_TRUST_MODULES`` adds to them).
    """
    path = find_checkpoint(path)
    ckpt = read_checkpoint(path)
    hparams = ckpt["hyper_parameters"]
    if not isinstance(hparams, dict):
        raise ValueError(f"checkpoint {path}: hyper_parameters must be a dict, got {type(hparams).__name__}")
    hparams = dict(hparams)
    class_path = hparams.pop("_class_path", None) or default_class
    state = ckpt["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {path}: state_dict must map names to tensors")
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    model = build_for_weights(class_path, hparams, trusted_modules(trust_modules), f"checkpoint {path}", shapes)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"checkpoint {path} does not match {type(model).__name__}: {state_dict_problem(err)}") from err
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not match {type(model).__name__}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    check_finite_weights(model, f"checkpoint {path}")
    model.checkpoint_info = ckpt.get("captioning") if isinstance(ckpt.get("captioning"), dict) else {}
    return model.to(map_location).eval()


def attach_encoder(ckpt_path: str, encoder_file: str, output: str, trust_modules: Sequence[str] = ()) -> Path:
    """Write a copy of ``ckpt_path`` whose encoder is the one ``encoder_file`` describes (weights included)."""
    import yaml

    from captioning.data.images import Preprocessing
    from captioning.io.checkpoint_files import atomic_save
    from captioning.io.trust import build_encoder, trusted_modules
    from captioning.nn.encoders import encoder_config

    out = Path(output)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose another --output (nothing is overwritten)")
    from captioning.io.plain_data import load_yaml_text

    try:
        spec = load_yaml_text(Path(encoder_file).read_text(encoding="utf-8"), str(encoder_file))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as err:
        raise ValueError(f"{encoder_file}: cannot read it as YAML/JSON ({type(err).__name__}: {err})") from err
    source = find_checkpoint(ckpt_path)
    ckpt = read_checkpoint(source)
    hparams = ckpt["hyper_parameters"]
    old = hparams.get("encoder") if isinstance(hparams, dict) else None
    if not isinstance(old, dict) or old.get("class_path") != "captioning.nn.encoders.PrecomputedFeatures":
        raise ValueError(
            f"{source} was not trained on precomputed features (its encoder is "
            f"{(old or {}).get('class_path')!r}); it can caption images as it is"
        )
    if isinstance(spec, dict) and "encoder" in spec and "class_path" not in spec:
        spec = spec["encoder"]  # a config fragment `encoder: {class_path, init_args}`
    encoder = build_encoder(spec, trusted_modules(trust_modules), source=str(encoder_file), restore=False)
    init = old.get("init_args") or {}
    want = (init.get("grid_size"), init.get("channels"))
    if (encoder.grid_size, encoder.out_channels) != want:
        raise ValueError(
            f"{encoder_file}: the encoder makes {encoder.grid_size}x{encoder.grid_size}x"
            f"{encoder.out_channels} features, the model was trained on {want[0]}x{want[0]}x{want[1]}"
        )
    recorded = Preprocessing(
        init.get("image_size", 224),
        tuple(init.get("mean", (0.485, 0.456, 0.406))),
        tuple(init.get("std", (0.229, 0.224, 0.225))),
    )
    if encoder.preprocessing != recorded:
        print(
            f"warning: the model's features were recorded as made with {recorded}; the attached encoder uses "
            f"{encoder.preprocessing}. Captions are only as good as the features match.",
            file=sys.stderr,
        )
    new = dict(ckpt)
    new["hyper_parameters"] = {**hparams, "encoder": json.loads(json.dumps(encoder_config(encoder)))}
    state = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("encoder.")}
    state.update({f"encoder.{k}": v.detach().cpu() for k, v in encoder.state_dict().items()})
    new["state_dict"] = state
    atomic_save(new, out)
    return out
