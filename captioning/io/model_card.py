"""What a checkpoint remembers about its training run, and the model card an export writes.

Every checkpoint our models write carries ``checkpoint["captioning"]`` (plain data and one
uint8 tensor, so it still loads with ``weights_only=True``):

* ``scores``: the latest validation/test metrics when it was written (``val/cider``, ...);
* ``data``: one line saying what it was trained on (the datamodule's ``describe()``);
* ``trained``: epoch, global step, the monitored metric and its best value;
* ``example`` (image models): the first validation image (at most 320 px), its id and
  references, so ``captioning export`` can show a real overlay on the model card.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

EXAMPLE_SIDE = 320


def run_summary(trainer: Any, with_example: bool, cached_example: dict | None = None) -> dict:
    """``checkpoint["captioning"]`` for the run ``trainer`` is in (see the module docstring)."""
    metrics = {}
    for name, value in getattr(trainer, "callback_metrics", {}).items():
        if name.startswith(("val/", "test/")):
            value = float(value)
            if math.isfinite(value):
                metrics[name] = round(value, 6)
    datamodule = getattr(trainer, "datamodule", None)
    describe = getattr(datamodule, "describe", None)
    checkpoint = getattr(trainer, "checkpoint_callback", None)
    best = getattr(checkpoint, "best_model_score", None)
    summary: dict[str, Any] = {
        "scores": metrics,
        "data": describe() if callable(describe) else type(datamodule).__name__ if datamodule is not None else None,
        "trained": {
            "epoch": int(trainer.current_epoch),
            "global_step": int(trainer.global_step),
            "monitor": getattr(checkpoint, "monitor", None),
            "best_score": float(best) if best is not None else None,
        },
    }
    example = cached_example
    if with_example and example is None and datamodule is not None and hasattr(datamodule, "example"):
        try:
            example = pack_example(datamodule.example("val"))
        except Exception:  # noqa: BLE001 - a card picture must never stop training
            example = None
    if example is not None:
        summary["example"] = example
    return summary


def pack_example(example: dict | None) -> dict | None:
    """A datamodule example ``{"image": PIL, "image_id", "references"}`` as checkpoint data."""
    if not example or example.get("image") is None:
        return None
    image = example["image"].convert("RGB")
    scale = EXAMPLE_SIDE / max(image.size)
    if scale < 1:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))  # (H, W, 3)
    return {
        "image": pixels,
        "image_id": str(example.get("image_id")),
        "references": [str(r) for r in example.get("references") or []][:5],
    }


def unpack_example(example: Any) -> dict | None:
    """``checkpoint["captioning"]["example"]`` -> ``{"image": PIL, "image_id", "references"}`` (or None)."""
    from PIL import Image

    if not isinstance(example, dict) or not isinstance(example.get("image"), torch.Tensor):
        return None
    pixels = example["image"]
    if pixels.dtype != torch.uint8 or pixels.dim() != 3 or pixels.shape[-1] != 3:
        return None
    return {
        "image": Image.fromarray(pixels.numpy()),
        "image_id": str(example.get("image_id")),
        "references": [str(r) for r in example.get("references") or []],
    }


def user_module_imports(module: str) -> list[str]:
    """Third-party packages the source of ``module`` imports (not the standard library, not
    itself, not this package), read from its file without running it; [] when not found."""
    import ast
    import importlib.util
    import sys

    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return []
    origin = spec.origin if spec is not None else None
    if not origin or not origin.endswith(".py"):
        return []
    try:
        with open(origin, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, UnicodeDecodeError):
        return []
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    skip = set(sys.stdlib_module_names) | {module, "captioning", "__future__"}
    return sorted(names - skip)


def model_card(
    name: str, config: dict, example_png: str | None, example: dict | None, example_caption: str | None
) -> str:
    """The README.md of an exported model folder."""
    from captioning.io.trust import user_modules

    info = config.get("training") or {}
    scores = info.get("scores") or {}
    modules = user_modules(config)
    trust_flags = "".join(f" --trust_module {m}" for m in modules)
    trust_arg = f", trust_modules={modules!r}" if modules else ""
    kind = "image captioner" if config["class_path"].endswith("ImageCaptioner") else "text seq2seq model"
    encoder = (config.get("init_args") or {}).get("encoder") or {}
    lines = [
        "---",
        "library_name: attention-captioning",
        "tags:",
        "- image-captioning" if "image" in kind else "- translation",
        "- attention",
        "---",
        "",
        f"# {name}",
        "",
        f"An attention {kind} exported by attention-captioning (`{config['class_path']}`).",
        "",
        "## Use",
        "",
        "```bash",
        "pip install 'attention-captioning[hub]'",
        f"captioning caption --model {name}{trust_flags} --output overlays photo.jpg"
        if "image" in kind
        else f'captioning translate --model {name}{trust_flags} "a sentence"',
        "```",
        "",
        "```python",
        "from captioning.io.model_folders import load_pretrained",
        "",
        f'model = load_pretrained("{name}"{trust_arg})',
        "```",
        "",
    ]
    if modules:
        lines += ["## Code this model needs", ""]
        for module in modules:
            needs = user_module_imports(module)
            lines += [
                f"This model uses code from `{module}`, which is not part of attention-captioning. "
                f"Loading the model imports and runs it, so it loads only when you trust it "
                f"(`--trust_module {module}` above) and `{module}` is installed, or lies in the current folder, "
                "or in a folder on `PYTHONPATH`."
                + (f" It imports: {', '.join(f'`{n}`' for n in needs)}." if needs else ""),
                "",
            ]
    if encoder:
        pre = config.get("preprocessing") or {}
        lines += [
            "## Encoder",
            "",
            f"`{encoder.get('class_path')}` with `{dict(encoder.get('init_args') or {})}`.",
            "",
        ]
        if pre:
            lines += [
                f"Input: {pre.get('image_size')} x {pre.get('image_size')} pixels, mean {pre.get('mean')}, "
                f"std {pre.get('std')} (applied by the encoder).",
                "",
            ]
    lines += ["## Training", "", f"Data: {info.get('data') or 'not recorded'}.", ""]
    trained = info.get("trained") or {}
    if trained:
        lines += [
            f"Epoch {trained.get('epoch')}, step {trained.get('global_step')}; kept by "
            f"`{trained.get('monitor')}` = {trained.get('best_score')}.",
            "",
        ]
    if scores:
        lines += ["| metric | value |", "|---|---|"] + [f"| `{k}` | {v:.4f} |" for k, v in sorted(scores.items())]
        lines += [""]
    if example_png:
        refs = "; ".join((example or {}).get("references", [])[:3])
        lines += [
            "## Where it looks",
            "",
            f"![attention overlay]({example_png})",
            "",
            f"Generated: *{example_caption}*" + (f" (references: {refs})" if refs else ""),
            "",
        ]
    return "\n".join(lines)
