"""Command line: ``captioning <command>``; ``captioning --help`` lists the commands.

Each command is a module of this package with a ``main(args) -> exit status``: ``fit``,
``validate``, ``test`` and ``predict`` are the LightningCLI of
:mod:`captioning.commands.lightning_cli`; ``caption``, ``translate``, ``export`` and the others
are argparse programs that need only a trained model or a config.

Every command ends a user error (see :mod:`captioning.errors`) with one line,
``error: <message>``, and exit status 2; a bug keeps its traceback (exit 1); ``--debug``
anywhere on the command line (or ``CAPTIONING_DEBUG=1``) shows every traceback.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from captioning.commands.openmp import choose_wait_policy

LIGHTNING = "captioning.commands.lightning_cli"
# name -> (module, one-line help); the Lightning commands take their subcommand as an argument.
COMMANDS = {
    "fit": (LIGHTNING, "train a model from a config (then test it with --test_after_fit true)"),
    "validate": (LIGHTNING, "score a checkpoint on the validation split"),
    "test": (LIGHTNING, "score a checkpoint on the test split"),
    "predict": (LIGHTNING, "caption the test split into a COCO results JSON"),
    "caption": (
        "captioning.commands.caption",
        "caption images or folders with a trained model; writes attention overlays (PNG) and JSON",
    ),
    "translate": (
        "captioning.commands.translate",
        "translate sentences with a text model; writes source x target heatmaps",
    ),
    "cache-features": (
        "captioning.commands.cache_features",
        "encode every image of a cached config once (features for training the decoder)",
    ),
    "export": (
        "captioning.commands.export",
        "write a trained model as a shareable folder (safetensors, config.json, model card)",
    ),
    "push": ("captioning.commands.push", "upload an exported model folder to the Hugging Face Hub"),
    "attach-encoder": (
        "captioning.commands.attach_encoder",
        "give a model trained on precomputed features its image encoder",
    ),
    "demo": (
        "captioning.commands.demo",
        "a local web page: caption a photo (or translate a sentence) and see where the model looked",
    ),
}


def usage() -> str:
    """``captioning --help``: every command with one line each."""
    width = max(len(name) for name in COMMANDS) + 2
    lines = ["usage: captioning <command> [options]   (captioning <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}{text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "Training commands take --config configs/<experiment>.yaml (see configs/)."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``captioning`` console script and ``python -m captioning``.

    Returns the exit status: 0, a command's own status, or 2 after ``error: <one line>`` for a
    user error (:mod:`captioning.errors`); other exceptions propagate (traceback, exit 1).
    """
    from captioning.errors import DEBUG, print_user_error, split_debug

    args, debug = split_debug(list(sys.argv[1:] if argv is None else argv))
    token = DEBUG.set(debug)
    try:
        return _run(args)
    except Exception as err:
        if debug or not print_user_error(err):
            raise
        return 2
    finally:
        DEBUG.reset(token)


def _run(args: list[str]) -> int:
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    # Before torch is imported (OpenMP reads it once): spin between operations on an idle
    # machine, sleep when other programs keep a core busy (captioning/commands/openmp.py).
    choose_wait_policy()
    if args[0] not in COMMANDS:
        print(f"error: unknown command {args[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[args[0]][0])
    return int(module.main(args if module.__name__ == LIGHTNING else args[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
