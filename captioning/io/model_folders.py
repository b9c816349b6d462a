"""Shareable trained models: export a checkpoint to a model folder, load one from disk or the Hub.

A model folder (what ``captioning export`` writes and ``captioning push`` uploads)::

    config.json         {"format", "class_path", "init_args" (sizes, encoder, vocabulary ...),
                         "preprocessing" (input size, mean/std), "training" (scores, data, steps)}
    model.safetensors   the weights (safetensors: tensors only, nothing is unpickled)
    README.md           the model card (how to use it, its scores, an attention overlay)
    example.png/.json   that overlay: the first validation image, captioned by the model

:func:`load_pretrained` takes a folder or a Hugging Face Hub repo id (``owner/name``, through
``huggingface_hub``, the optional extra ``.[hub]``): downloaded into the Hub cache on first use
when online; offline (``HF_HUB_OFFLINE=1`` or ``CAPTIONING_OFFLINE=1``) only the cache is read.
The classes config.json names are built by :func:`captioning.io.trust.build_model` (ours, or the
user's explicitly trusted modules), exactly as for checkpoints.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from captioning.io.trust import trusted_modules

FORMAT = "attention-captioning/1"
CONFIG_FILE, WEIGHTS_FILE, CARD_FILE = "config.json", "model.safetensors", "README.md"
EXAMPLE_PNG, EXAMPLE_JSON = "example.png", "example.json"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelNotFoundError(FileNotFoundError):
    """A model folder or Hub repo that cannot be found (or downloaded); the message says what to do."""


# ----------------------------------------------------------------------------- export
def model_config(model: Any) -> dict:
    """config.json of ``model``: its class and constructor arguments as plain data."""
    cls = type(model)
    init_args = {k: v for k, v in dict(model.hparams).items() if not k.startswith("_")}
    config: dict[str, Any] = {
        "format": FORMAT,
        "class_path": f"{cls.__module__}.{cls.__qualname__}",
        "init_args": json.loads(json.dumps(init_args)),
    }
    preprocessing = getattr(getattr(model, "encoder", None), "preprocessing", None)
    if preprocessing is not None:
        config["preprocessing"] = preprocessing.to_dict()
    config["training"] = json.loads(json.dumps(_training_info(model)))
    return config


def _training_info(model: Any) -> dict:
    info = dict(getattr(model, "checkpoint_info", None) or {})
    info.pop("example", None)  # goes to example.png, not into the config
    return info


def export_model(
    ckpt_path: str | os.PathLike,
    output: str | os.PathLike,
    trust_modules: Sequence[str] = (),
    overwrite: bool = False,
    name: str | None = None,
    beam_size: int | None = None,
) -> Path:
    """Write the model folder of ``ckpt_path`` (a checkpoint or run folder) to ``output``.

    An existing non-empty ``output`` is refused unless ``overwrite`` (then replaced as a whole,
    only after the new folder is complete). Returns the folder.
    """
    from safetensors.torch import save_file

    from captioning.io.model_loading import find_checkpoint, load_model

    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not overwrite:
        raise FileExistsError(f"{output} exists and is not empty; choose a new folder, or --overwrite to replace it")
    ckpt = find_checkpoint(ckpt_path)
    model = load_model(ckpt, trust_modules=trust_modules)
    config = model_config(model)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        # Tensors that share memory (tied weights) are saved once each: copy them apart.
        state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
        example_png, example, caption = _write_example(model, tmp, beam_size)
        from captioning.io.model_card import model_card

        card = model_card(name or output.name, config, example_png, example, caption)
        (tmp / CARD_FILE).write_text(card, encoding="utf-8")
        _shareable(tmp)
        if output.exists():
            shutil.rmtree(output) if output.is_dir() else output.unlink()
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


def _shareable(folder: Path) -> None:
    """The permissions a plain ``mkdir``/``open`` give under the umask (``mkdtemp`` makes the folder
    private, some writers their files): an exported model is meant to be shared."""
    from captioning.io.outputs import current_umask

    umask = current_umask()
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _write_example(model: Any, folder: Path, beam_size: int | None) -> tuple[str | None, dict | None, str | None]:
    """Caption the checkpoint's example image and draw its overlay (image models that have one)."""
    from captioning.io.model_card import unpack_example
    from captioning.models.inference import caption_images
    from captioning.models.protocols import is_captioner
    from captioning.viz import attention_overlay

    example = unpack_example((getattr(model, "checkpoint_info", None) or {}).get("example"))
    if example is None or not is_captioner(model) or not model.encoder.sees_images:
        return None, None, None
    result = caption_images(model, [example["image"]], beam_size=beam_size)[0]
    attention_overlay(example["image"], result.words, result.attention, title=f"image {example['image_id']}").save(
        folder / EXAMPLE_PNG
    )
    record = {
        "image_id": example["image_id"],
        "caption": result.text,
        "words": result.words,
        "references": example["references"],
        "attention": result.attention.round(decimals=5).tolist(),
    }
    (folder / EXAMPLE_JSON).write_text(json.dumps(record) + "\n", encoding="utf-8")
    return EXAMPLE_PNG, example, result.text


# ----------------------------------------------------------------------------- load
def resolve_model_dir(name: str | os.PathLike, revision: str | None = None) -> Path:
    """A local model folder, or the Hub repo ``owner/name`` downloaded into (or read from) the Hub cache."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelNotFoundError(
            f"{path} is a file; --model takes a model folder (written by `captioning export`) "
            "or a Hugging Face Hub repo id (owner/name); a .ckpt file goes to --ckpt_path"
        )
    text = str(name)
    if not _REPO_ID.match(text):
        raise ModelNotFoundError(f"{text}: no such model folder, and not a Hugging Face Hub repo id (owner/name)")
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as err:
        raise ModelNotFoundError(
            f"{text}: no such local folder; loading from the Hugging Face Hub needs "
            "huggingface_hub: pip install 'attention-captioning[hub]'"
        ) from err
    from captioning.nn.encoders import offline

    local_only = offline() or bool(constants.HF_HUB_OFFLINE)
    try:
        folder = snapshot_download(
            repo_id=text,
            revision=revision,
            local_files_only=local_only,
            allow_patterns=[CONFIG_FILE, WEIGHTS_FILE, CARD_FILE, EXAMPLE_PNG, EXAMPLE_JSON],
        )
    except LocalEntryNotFoundError as err:
        why = "downloads are off (offline mode)" if local_only else "it could not be downloaded (no network?)"
        raise ModelNotFoundError(
            f"model {text} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
            f"{why}: run once with a network, or copy the cache from a machine that has it"
        ) from err
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise ModelNotFoundError(
            f"model {text} could not be fetched from the Hugging Face Hub: "
            f"{err.__class__.__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from err
    return Path(folder)


def read_model_config(folder: Path) -> dict:
    """config.json of a model folder, checked to be ours."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"{folder} has no {CONFIG_FILE}: not a model folder written by `captioning export`")
    from captioning.io.plain_data import check_plain_data

    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    except RecursionError:
        raise ValueError(f"{path}: nested too deeply to be a model config") from None
    check_plain_data(config, str(path), tensors=False)
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{path}: not an attention-captioning model config (format {FORMAT!r} expected)")
    if not isinstance(config.get("init_args"), dict):
        raise ValueError(f"{path}: init_args must be a dict")
    return config


def load_pretrained(
    name_or_path: str | os.PathLike,
    trust_modules: Sequence[str] = (),
    map_location: str | torch.device = "cpu",
    revision: str | None = None,
) -> Any:
    """The model in a model folder or Hub repo, weights loaded, in eval mode.

    Args:
        name_or_path: a folder written by ``captioning export`` or a Hub repo id ``owner/name``.
        trust_modules: modules (beyond ours) whose classes the config may name (see
            :mod:`captioning.io.trust`).
        revision: Hub branch, tag or commit (default: main).
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    from captioning.io.model_loading import build_for_weights, check_finite_weights

    folder = resolve_model_dir(name_or_path, revision)
    config = read_model_config(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelNotFoundError(f"{folder} has no {WEIGHTS_FILE}")
    try:  # the header only: every tensor's shape, nothing allocated
        with safe_open(str(weights), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{weights}: not a readable safetensors file ({err})") from err
    source = f"{folder / CONFIG_FILE} with {WEIGHTS_FILE}"
    model = build_for_weights(
        config.get("class_path"), config["init_args"], trusted_modules(trust_modules), source, shapes
    )
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{weights}: not a readable safetensors file ({err})") from err
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        from captioning.io.model_loading import state_dict_problem

        raise ValueError(
            f"{weights} does not match the model {CONFIG_FILE} describes: {state_dict_problem(err)}"
        ) from err
    check_finite_weights(model, str(weights))
    model.checkpoint_info = config.get("training") or {}
    return model.to(map_location).eval()


def load_any(
    ckpt_path: str | None = None,
    model: str | None = None,
    trust_modules: Sequence[str] = (),
    map_location: str | torch.device = "cpu",
    default_class: str = "captioning.models.image_captioner.ImageCaptioner",
) -> Any:
    """What the commands take: ``--ckpt_path`` (checkpoint or run folder) or ``--model`` (folder or repo)."""
    if (ckpt_path is None) == (model is None):
        raise ValueError(
            "give either --ckpt_path (a checkpoint or run folder) or --model (an exported model "
            "folder or Hub repo id), not both"
        )
    if model is not None:
        return load_pretrained(model, trust_modules, map_location)
    from captioning.io.model_loading import load_model

    assert ckpt_path is not None
    return load_model(ckpt_path, default_class=default_class, map_location=map_location, trust_modules=trust_modules)


# ----------------------------------------------------------------------------- push
def push_model(
    model_dir: str | os.PathLike,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    api: Any = None,
) -> Any:
    """Upload a model folder to the Hub repo ``repo_id`` (created if needed); returns the commit info.

    ``api``: a ``huggingface_hub.HfApi`` (default: a new one, using ``token`` or the saved login).
    """
    folder = Path(model_dir)
    if not folder.is_dir():
        raise ModelNotFoundError(f"{folder}: no such model folder (write one with `captioning export`)")
    read_model_config(folder)
    if not (folder / WEIGHTS_FILE).is_file():
        raise ModelNotFoundError(f"{folder} has no {WEIGHTS_FILE}")
    if not _REPO_ID.match(repo_id):
        raise ValueError(f"--repo_id must look like owner/name, got {repo_id!r}")
    if api is None:
        try:
            from huggingface_hub import HfApi
        except ImportError as err:
            raise ImportError(
                "pushing to the Hugging Face Hub needs huggingface_hub: pip install 'attention-captioning[hub]'"
            ) from err
        api = HfApi(token=token)
    api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    return api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        repo_type="model",
        commit_message=commit_message or f"Upload {folder.name} with attention-captioning",
    )
