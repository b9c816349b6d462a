"""``captioning push --model DIR --repo_id OWNER/NAME``: upload an exported model folder to the
Hugging Face Hub (the login of ``huggingface-cli login`` or ``$HF_TOKEN``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from captioning.commands.options import fail


def main(argv: Sequence[str] | None = None, api=None) -> int:
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
        return fail(str(err))
    except Exception as err:  # noqa: BLE001 - network/auth errors of huggingface_hub: one line, not a traceback
        return fail(f"upload to {args.repo_id} failed: {err.__class__.__name__}: {str(err).splitlines()[0]}")
    url = getattr(info, "commit_url", None) or f"https://huggingface.co/{args.repo_id}"
    print(f"uploaded {args.model} to {url}", file=sys.stderr)
    return 0
