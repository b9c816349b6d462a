"""``captioning translate (--ckpt_path CKPT | --model DIR_OR_REPO) [--input FILE | TEXT ...] [--heatmap_dir DIR]``.

Translates sentences with a text seq2seq checkpoint or exported model (tokenised exactly as in training: the
tokenizer and vocabularies are in the checkpoint) and prints exactly one line per input line
on stdout (line breaks or tabs inside a translation become spaces; an input that cannot be
translated gives an empty line). With ``--heatmap_dir`` it also writes, per sentence,
``<name>.png`` (source x target attention heatmap) and ``<name>.json`` (tokens and the
attention matrix; with a sentinel model also each target token's sentinel weight, drawn as a
"language" column beside the heatmap); the folder is checked for writing before anything is
decoded. Existing files are never replaced unless ``--overwrite``: a free name ``<name>-1``,
``-2``, ... is used instead. Problems are reported on stderr naming the file and line: errors (the exit
status is 1 if any sentence could not be translated, 2 for an unusable checkpoint, input
file or heatmap folder) and warnings (exit status unchanged) for an input longer than the
model reads (``max_source_length``: only its first tokens are translated), longer than any
training sentence, or made mostly of words never seen in training. ``<unk>`` is never
output unless ``--allow_unk`` (or the model was trained with ``allow_unk: true``).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import torch


def build_parser() -> argparse.ArgumentParser:
    from captioning.commands.options import add_model_arguments

    p = argparse.ArgumentParser(prog="captioning translate", description=__doc__.split("\n\n")[1])
    p.add_argument("texts", nargs="*", metavar="TEXT", help="sentences to translate (or use --input)")
    add_model_arguments(
        p,
        "checkpoint written by `captioning fit` with a text config, or a run folder (its newest "
        "valid best*.ckpt, else last.ckpt)",
    )
    p.add_argument(
        "--input",
        help="file with one sentence per line ('-' = stdin); in a TSV file only the text before the first tab is used",
    )
    p.add_argument("--heatmap_dir", help="write <name>.png (attention heatmap) and <name>.json here")
    p.add_argument("--beam_size", type=int, default=None, help="default: the model's own (1 = greedy)")
    p.add_argument("--max_length", type=int, default=None, help="longest output in tokens")
    p.add_argument("--batch_size", type=int, default=32, help="sentences decoded together")
    p.add_argument("--overwrite", action="store_true", help="replace existing heatmap files")
    p.add_argument(
        "--allow_unk",
        action="store_true",
        default=None,
        help="let translations contain <unk> (default: the model's allow_unk setting, normally off)",
    )
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
            raise ValueError(
                f"{label}, line {number}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1})"
            ) from err
        out.append((f"{label}:{number}", line.split("\t", 1)[0].lstrip("\ufeff")))
    return out


def one_line(text: str) -> str:
    """``text`` on one line: every run of whitespace (line and paragraph separators, tabs) -> one space."""
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    records = sys.stdout  # one line per input; anything else printed meanwhile goes to stderr
    with contextlib.redirect_stdout(sys.stderr):
        return _translate(args, records)


def _translate(args: argparse.Namespace, records: TextIO) -> int:
    if bool(args.texts) == bool(args.input):
        print("error: give the sentences either as TEXT arguments or with --input FILE (not both)", file=sys.stderr)
        return 2
    from captioning.io.model_folders import load_any
    from captioning.io.outputs import check_writable, terminal_text
    from captioning.io.results import sentence_stem, write_translation_result

    out_dir = Path(args.heatmap_dir) if args.heatmap_dir else None
    try:
        if out_dir is not None:
            check_writable(out_dir, "--heatmap_dir")  # before any decoding: fail in a second, not after the work
        inputs = read_lines(args.input) if args.input else [(f"argument {i}", t) for i, t in enumerate(args.texts, 1)]
        model = load_any(
            args.ckpt_path,
            args.model,
            args.trust_module,
            map_location=args.device,
            default_class="captioning.models.seq2seq.Seq2SeqModel",
        )
    except (OSError, ValueError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from captioning.models.protocols import Translator

    if not isinstance(model, Translator):
        print(
            f"error: {args.ckpt_path or args.model} holds a {type(model).__name__}, not a text seq2seq model "
            "(use `captioning caption` for image checkpoints)",
            file=sys.stderr,
        )
        return 2

    # Sentences that cannot be encoded (empty) get an empty output line, so output line i
    # still belongs to input line i. Odd inputs are translated with a warning naming the line.
    good: list[int] = []
    failed = 0
    for i, (label, text) in enumerate(inputs):
        if not text.strip():
            print(
                f"warning: {terminal_text(label)}: empty line, nothing to translate (its output line is empty)",
                file=sys.stderr,
            )
            continue
        try:
            model.encode_texts([text])
            good.append(i)
        except ValueError as err:
            print(f"error: {terminal_text(label)}: {str(err).replace('input 1', 'sentence')}", file=sys.stderr)
            failed += 1
            continue
        for warning in model.source_report(text).warnings():
            print(f"warning: {terminal_text(label)}: {warning}", file=sys.stderr)
    results: dict[int, Any] = {}
    for start in range(0, len(good), args.batch_size):
        chunk = good[start : start + args.batch_size]
        with torch.inference_mode():
            translated = model.translate(
                [inputs[i][1] for i in chunk], args.beam_size, args.max_length, allow_unk=args.allow_unk
            )
        results.update(zip(chunk, translated))

    for i, (label, text) in enumerate(inputs):
        tr = results.get(i)
        print(one_line(tr.text) if tr is not None else "", file=records, flush=True)
        if tr is None or out_dir is None:
            continue
        png, _ = write_translation_result(
            out_dir, f"{i + 1:04d}-{sentence_stem(text)}", tr, label, text, args.overwrite
        )
        print(f"  wrote {png}", file=sys.stderr)
    if failed:
        print(f"{failed} of {len(inputs)} sentence(s) could not be translated", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
