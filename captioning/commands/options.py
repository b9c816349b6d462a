"""Options several commands share: where a model comes from, what it may import, where it runs."""

from __future__ import annotations

import argparse
import sys


def add_trust_argument(parser: argparse.ArgumentParser) -> None:
    """``--trust_module MODULE`` (repeatable): classes a model file may name from MODULE."""
    parser.add_argument(
        "--trust_module",
        action="append",
        default=[],
        metavar="MODULE",
        help="allow the model file to name classes from MODULE (your own encoder); importing it runs "
        "its code, so only for code you trust. Repeatable",
    )


def add_model_arguments(parser: argparse.ArgumentParser, ckpt_help: str) -> None:
    """The options every command that runs a model takes: where the model comes from
    (``--ckpt_path`` or ``--model``, one required), ``--trust_module`` and ``--device``;
    :func:`captioning.io.model_folders.load_any` reads them."""
    import torch

    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt_path", help=ckpt_help)
    source.add_argument(
        "--model",
        help="model folder written by `captioning export`, or a Hugging Face Hub repo id "
        "(owner/name; needs the [hub] extra)",
    )
    add_trust_argument(parser)
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the model runs (default: cuda when available, else cpu)",
    )


def fail(message: str) -> int:
    """Print ``error: <message>`` and return the user-error exit status."""
    print(f"error: {message}", file=sys.stderr)
    return 2
