"""``captioning translate --ckpt_path CKPT [--input FILE | TEXT ...] [--heatmap_dir DIR] [--beam_size K]``.

Translates sentences with a text seq2seq checkpoint (tokenised exactly as in training: the
tokenizer and vocabularies are in the checkpoint) and prints one translation per input line
on stdout. With ``--heatmap_dir`` it also writes, per sentence, ``<name>.png`` (source x
target attention heatmap) and ``<name>.json`` (tokens and the attention matrix). Existing
files are never replaced unless ``--overwrite``: a free name ``<name>-1``, ``-2``, ... is
used instead. Problems are reported on stderr naming the file and line; the exit status
is 1 if any sentence could not be translated, 2 for an unusable checkpoint or input file.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Sequence

import torch


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="captioning translate", description=__doc__.split("\n\n")[1])
    p.add_argument("texts", nargs="*", metavar="TEXT", help="sentences to translate (or use --input)")
    p.add_argument("--ckpt_path", required=True, help="checkpoint written by `captioning fit` with a text config, "
                                                      "or a run folder (its newest best*.ckpt, else last.ckpt)")
    p.add_argument("--input", help="file with one sentence per line ('-' = stdin); in a TSV file only the "
                                   "text before the first tab is used")
    p.add_argument("--heatmap_dir", help="write <name>.png (attention heatmap) and <name>.json here")
    p.add_argument("--beam_size", type=int, default=None, help="default: the model's own (1 = greedy)")
    p.add_argument("--max_length", type=int, default=None, help="longest output in tokens")
    p.add_argument("--batch_size", type=int, default=32, help="sentences decoded together")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--overwrite", action="store_true", help="replace existing heatmap files")
    return p


def read_lines(name: str) -> list[tuple[str, str]]:
    """(label "file:line", text) per line of a file ('-' = stdin); raises ValueError naming the line."""
    if name == "-":
        data, label = sys.stdin.buffer.read(), "<stdin>"
    else:
        path = Path(name)
        if not path.is_file():
            raise ValueError(f"input file {path} does not exist")
        data, label = path.read_bytes(), str(path)
    if data.endswith(b"\n"):
        data = data[:-1]
    out = []
    for number, raw in enumerate(data.split(b"\n") if data else [], start=1):
        try:
            line = raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as err:
            raise ValueError(f"{label}, line {number}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column "
                             f"{err.start + 1})") from err
        out.append((f"{label}:{number}", line.split("\t", 1)[0].lstrip("\ufeff")))
    return out


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^\w]+", "-", text.lower()).strip("-")[:limit] or "sentence"


def write_heatmap(directory: Path, stem: str, record: dict, figure, overwrite: bool = False) -> Path:
    """Save ``<stem>.png`` and ``<stem>.json``; never replaces existing files unless ``overwrite``."""
    from captioning.viz import claim_output_pair

    directory.mkdir(parents=True, exist_ok=True)
    png, js = claim_output_pair(directory, stem, str(record.get("source", stem)), overwrite)
    js.write_text(json.dumps(record) + "\n", encoding="utf-8")
    figure.save(png)
    return png


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if bool(args.texts) == bool(args.input):
        print("error: give the sentences either as TEXT arguments or with --input FILE (not both)", file=sys.stderr)
        return 2
    from captioning.checkpoints import load_model, find_checkpoint
    from captioning.viz import seq2seq_heatmap

    try:
        inputs = read_lines(args.input) if args.input else [(f"argument {i}", t) for i, t in enumerate(args.texts, 1)]
        model = load_model(find_checkpoint(args.ckpt_path), default_class="captioning.text_model.Seq2SeqModel",
                           map_location=args.device)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not hasattr(model, "translate"):
        print(f"error: {args.ckpt_path} holds a {type(model).__name__}, not a text seq2seq model "
              "(use `captioning caption` for image checkpoints)", file=sys.stderr)
        return 2

    # Sentences that cannot be encoded (empty, too long for 'location' attention) get an
    # empty output line, so output line i still belongs to input line i.
    good: list[int] = []
    failed = 0
    for i, (label, text) in enumerate(inputs):
        if not text.strip():
            continue
        try:
            model.encode_texts([text])
            good.append(i)
        except ValueError as err:
            print(f"error: {label}: {str(err).replace('input 1', 'sentence')}", file=sys.stderr)
            failed += 1
    results: dict[int, object] = {}
    for start in range(0, len(good), args.batch_size):
        chunk = good[start:start + args.batch_size]
        with torch.inference_mode():
            translated = model.translate([inputs[i][1] for i in chunk], args.beam_size, args.max_length)
        results.update(zip(chunk, translated))

    out_dir = Path(args.heatmap_dir) if args.heatmap_dir else None
    for i, (label, text) in enumerate(inputs):
        tr = results.get(i)
        print(tr.text if tr is not None else "", flush=True)
        if tr is None or out_dir is None:
            continue
        record = {"input": label, "source": text, "translation": tr.text, "source_tokens": tr.source_tokens,
                  "target_tokens": tr.target_tokens, "attention": tr.alpha.round(decimals=5).tolist(),
                  "score": tr.score}
        figure = seq2seq_heatmap(tr.source_tokens, tr.target_tokens, tr.alpha)
        png = write_heatmap(out_dir, f"{i + 1:04d}-{_slug(text)}", record, figure, args.overwrite)
        print(f"  wrote {png}", file=sys.stderr)
    if failed:
        print(f"{failed} of {len(inputs)} sentence(s) could not be translated", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
