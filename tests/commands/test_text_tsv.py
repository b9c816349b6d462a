"""configs/text_tsv.yaml on generated parallel text, as a user runs it: subword tokenizer in the
checkpoint, test after fit, `captioning test` giving the very same numbers in the same run folder
without warnings, `translate` output scored offline = the test numbers, no <unk>, warnings for
odd inputs, one stdout line per input."""

import csv
import inspect
import random
import warnings

import pytest
import torch

import captioning.commands.main
import captioning.io.run_folders
from captioning.commands.main import main as cli_main
from captioning.data.text_vocab import TextTokenizer
from captioning.io.run_folders import restore_for_evaluation
from captioning.models.translations import score_translations

from support import ROOT

SUBJECTS = [
    ("je suis", "i am"),
    ("il est", "he is"),
    ("elle est", "she is"),
    ("nous sommes", "we are"),
    ("tu es", "you are"),
    ("ils sont", "they are"),
]
WORDS = [
    ("fatigué", "tired"),
    ("content", "happy"),
    ("grand", "tall"),
    ("très", "very"),
    ("prêt", "ready"),
    ("malade", "sick"),
    ("occupé", "busy"),
    ("heureux", "glad"),
    ("petit", "small"),
    ("riche", "rich"),
    ("désolé", "sorry"),
    ("perdu", "lost"),
    ("en retard", "late"),
    ("à la maison", "at home"),
]
TINY = [
    "--model.init_args.embed_dim",
    "16",
    "--model.init_args.encoder_dim",
    "16",
    "--model.init_args.decoder_dim",
    "32",
    "--model.init_args.attention_dim",
    "16",
    "--model.init_args.beam_size",
    "2",
    "--model.init_args.max_source_length",
    "24",
    "--data.init_args.subword_vocab_size",
    "120",
    "--data.init_args.batch_size",
    "16",
    "--trainer.max_epochs",
    "2",
    "--trainer.enable_progress_bar",
    "false",
]


def corpus(n: int, seed: int) -> list[tuple[str, str]]:
    """French-like -> English-like pairs: a subject and one to three words, '.' or ' !'."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        (fs, es), words = rng.choice(SUBJECTS), rng.sample(WORDS, rng.randint(1, 3))
        end = rng.choice([(".", "."), (" !", "!")])
        pairs.append(
            (
                f"{fs} {' '.join(f for f, _ in words)}{end[0]}".capitalize(),
                f"{es} {' '.join(e for _, e in words)}{end[1]}".capitalize(),
            )
        )
    return pairs


def write_tsv(path, pairs):
    path.write_text("".join(f"{s}\t{t}\n" for s, t in pairs), encoding="utf-8")
    return path


def data_args(folder):
    return [
        "--data.init_args.train_path",
        str(folder / "train.tsv"),
        "--data.init_args.val_path",
        str(folder / "val.tsv"),
        "--data.init_args.test_path",
        str(folder / "test.tsv"),
    ]


def test_metrics(run_dir) -> list[dict]:
    with open(run_dir / "metrics.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [
        {k: float(v) for k, v in row.items() if k.startswith("test/") and v}
        for row in rows
        if row.get("test/exact_match")
    ]


test_metrics.__test__ = False  # a helper, not a test


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tsv")
    write_tsv(folder / "train.tsv", corpus(160, 0))
    write_tsv(folder / "val.tsv", corpus(24, 1))
    write_tsv(folder / "test.tsv", corpus(30, 2))
    runs = folder / "runs"
    cli_main(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / "text_tsv.yaml"),
            *data_args(folder),
            *TINY,
            "--trainer.default_root_dir",
            str(runs),
            "--trainer.logger.init_args.save_dir",
            str(runs),
        ]
    )
    versions = sorted((runs / "lightning_logs").iterdir())
    assert [v.name for v in versions] == ["version_0"]
    best = sorted(versions[0].glob("checkpoints/best*.ckpt"))
    assert len(best) == 1
    return folder, runs, versions[0], best[0]


def test_subword_tokenizer_round_trips_and_trains_deterministically():
    texts = [t for pair in corpus(200, 3) for t in pair]
    bpe = TextTokenizer.train("bpe", texts, lowercase=True, vocab_size=100)
    assert bpe.to_dict() == TextTokenizer.train("bpe", texts, lowercase=True, vocab_size=100).to_dict()
    again = TextTokenizer.from_dict(bpe.to_dict())  # plain data, as stored in the checkpoint
    for text in texts + ["Nous sommes  très\tfatigués !", "À LA MAISON."]:
        tokens = bpe(text)
        assert again(text) == tokens
        assert bpe.detokenize(tokens) == bpe.normalize(text)  # exact inverse
    assert any(len(bpe(w)) > 1 for w in ("fatigués", "heureusement"))  # unseen words are spelled in pieces
    assert len(bpe.model["model"]["vocab"]) <= 100


def test_fit_scores_the_test_split_and_stores_the_tokenizer_as_plain_data(fitted):
    folder, runs, run, best = fitted
    (fit_end,) = test_metrics(run)
    for key in ("test/bleu", "test/chrf", "test/exact_match", "test/num_sentences"):
        assert key in fit_end
    assert fit_end["test/num_sentences"] == 30
    vocab = torch.load(best, weights_only=True)["hyper_parameters"]["vocab"]
    assert vocab["tokenizer"]["kind"] == "bpe" and vocab["tokenizer"]["model"]["model"]["type"] == "BPE"
    assert "fatigué" in vocab["source_words"] and vocab["longest_source"] >= 4


def _with_test_hook(monkeypatch):
    """The CLI calls restore_for_evaluation before `test` (cli.py, before_test); until that
    line is in cli.py, route it through resolve_checkpoint, which before_test calls."""
    if "restore_for_evaluation" in inspect.getsource(captioning.commands.main):
        return
    original = captioning.io.run_folders.resolve_checkpoint

    def resolve(trainer, ckpt_path, continue_run=False, model=None):
        path = original(trainer, ckpt_path, continue_run, model)
        return path if continue_run else restore_for_evaluation(trainer, model, path)

    monkeypatch.setattr(captioning.io.run_folders, "resolve_checkpoint", resolve)


def test_test_command_gives_the_fit_end_numbers_in_the_same_run_without_warnings(fitted, monkeypatch):
    folder, runs, run, best = fitted
    _with_test_hook(monkeypatch)
    rows_before = (run / "metrics.csv").read_text().count("\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli_main(
            [
                "test",
                "--config",
                str(ROOT / "configs" / "text_tsv.yaml"),
                *data_args(folder),
                *TINY,
                "--ckpt_path",
                str(best),
                "--trainer.default_root_dir",
                str(runs),
                "--trainer.logger.init_args.save_dir",
                str(runs),
            ]
        )
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "callbacks" in m or "dirpath" in m or "not empty" in m], messages
    assert [v.name for v in (runs / "lightning_logs").iterdir()] == ["version_0"]  # no new version folder
    fit_end, test_cmd = test_metrics(run)
    assert test_cmd == fit_end  # the very same numbers
    assert (run / "metrics.csv").read_text().count("\n") > rows_before  # training rows kept, test appended


def test_translate_output_scored_offline_equals_the_test_numbers(fitted, tmp_path, capsys):
    folder, runs, run, best = fitted
    pairs = [line.split("\t") for line in (folder / "test.tsv").read_text(encoding="utf-8").splitlines()]
    src = tmp_path / "test.src"
    src.write_text("".join(s + "\n" for s, _ in pairs), encoding="utf-8")
    assert cli_main(["translate", "--ckpt_path", str(best), "--input", str(src)]) == 0
    hyps = capsys.readouterr().out.splitlines()
    assert len(hyps) == len(pairs)
    vocab = torch.load(best, weights_only=True)["hyper_parameters"]["vocab"]
    offline = score_translations(hyps, [t for _, t in pairs], TextTokenizer.from_dict(vocab["tokenizer"]))
    fit_end = test_metrics(run)[0]
    for name in ("bleu", "chrf", "exact_match"):
        assert offline[name] == pytest.approx(fit_end[f"test/{name}"], abs=1e-4), name


def test_no_unk_in_translations_unless_allowed(fitted, tmp_path, capsys):
    folder, runs, run, best = fitted
    ckpt = torch.load(best, weights_only=True)
    unk = ckpt["hyper_parameters"]["vocab"]["target"]["itos"].index("<unk>")
    ckpt["state_dict"]["decoder.output.bias"][unk] += 50.0  # a model that wants <unk> everywhere
    eager = tmp_path / "unk.ckpt"
    torch.save(ckpt, eager)
    assert cli_main(["translate", "--ckpt_path", str(eager), "je suis prêt.", "zzz xyq !"]) == 0
    out = capsys.readouterr().out
    assert "<unk>" not in out and len(out.splitlines()) == 2
    assert cli_main(["translate", "--ckpt_path", str(eager), "--allow_unk", "je suis prêt."]) == 0
    assert "<unk>" in capsys.readouterr().out


def test_translate_warns_about_cut_long_and_unknown_inputs_naming_the_line(fitted, tmp_path, capsys):
    folder, runs, run, best = fitted
    inputs = tmp_path / "odd.txt"
    inputs.write_text("je suis prêt.\n" + "je suis très fatigué " * 100 + "\nqwx zzv brrk plof.\n", encoding="utf-8")
    assert cli_main(["translate", "--ckpt_path", str(best), "--input", str(inputs)]) == 0
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    assert len(captured.out.splitlines()) == 3
    assert not [line for line in err if f"{inputs}:1:" in line]
    (cut,) = [line for line in err if f"{inputs}:2:" in line]
    assert cut.startswith("warning:") and "only the first 23 are translated" in cut
    (unknown,) = [line for line in err if f"{inputs}:3:" in line]
    assert unknown.startswith("warning:") and "4 of 4 words never seen in training" in unknown


def test_translate_output_stays_one_line_per_input_and_heatmap_dir_is_checked_first(fitted, tmp_path, capsys):
    folder, runs, run, best = fitted
    assert cli_main(["translate", "--ckpt_path", str(best), "je suis\nprêt.", "il est\tgrand\r\n!"]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 2 and "\t" not in out
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert (
        cli_main(["translate", "--ckpt_path", str(best), "--heatmap_dir", str(blocker / "heat"), "je suis prêt."]) == 2
    )
    captured = capsys.readouterr()
    assert (
        captured.out == ""
        and "--heatmap_dir" in captured.err
        and "cannot write into the --heatmap_dir folder" in captured.err
    )
    assert len(captured.err.strip().splitlines()) == 1


def test_a_run_folder_is_accepted_wherever_a_checkpoint_is(fitted):
    folder, runs, run, best = fitted
    common = [
        "--config",
        str(ROOT / "configs" / "text_tsv.yaml"),
        *data_args(folder),
        *TINY,
        "--trainer.default_root_dir",
        str(runs),
        "--trainer.logger.init_args.save_dir",
        str(runs),
    ]
    cli_main(["test", *common, "--ckpt_path", str(run)])  # as the config's header says
    rows = test_metrics(run)
    assert rows[-1] == rows[0]  # the best checkpoint's numbers, as at the end of fit


def _strip_accents(text: str) -> str:
    import unicodedata

    return "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """A run on accent-stripped text, moved by --trainer.default_root_dir alone, launched from an
    empty folder with the progress bar on (stderr is not a terminal here)."""
    import contextlib
    import io
    import os

    folder = tmp_path_factory.mktemp("plain")
    for name, n, seed in (("train", 160, 0), ("val", 24, 1), ("test", 30, 2)):
        write_tsv(folder / f"{name}.tsv", [(_strip_accents(s), t) for s, t in corpus(n, seed)])
    cwd = folder / "cwd"
    cwd.mkdir()
    args = [
        "fit",
        "--config",
        str(ROOT / "configs" / "text_tsv.yaml"),
        *data_args(folder),
        *TINY,
        "--trainer.enable_progress_bar",
        "true",
        "--trainer.default_root_dir",
        str(folder / "moved"),
    ]
    err = io.StringIO()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stderr(err):
            cli_main(args)
    finally:
        os.chdir(old)
    return folder, cwd, folder / "moved" / "lightning_logs" / "version_0", err.getvalue()


def test_default_root_dir_alone_moves_the_whole_run(plain_run):
    folder, cwd, run, _ = plain_run
    assert list(cwd.iterdir()) == []  # nothing in the folder it was started from
    assert (run / "metrics.csv").is_file() and (run / "config.yaml").is_file()
    assert list(run.glob("checkpoints/best*.ckpt")) and (run / "checkpoints" / "last.ckpt").is_file()


def test_progress_lines_when_output_is_not_a_terminal(plain_run):
    *_, err = plain_run
    lines = [line for line in err.splitlines() if line.startswith("epoch ")]
    assert lines and all(", step " in line for line in lines), err[-2000:]
    assert any("val/" in line for line in lines)  # one line after each validation
    assert "litlogger" not in err


def test_hyper_parameters_file_is_small_and_holds_no_vocabulary(plain_run):
    _, _, run, _ = plain_run
    text = (run / "hparams.yaml").read_text()
    assert len(text) < 5_000, len(text)
    assert "entries]" in text and "fatigue" not in text  # the vocabulary is summarised, not written out
    best = next(run.glob("checkpoints/best*.ckpt"))
    assert "fatigue" in str(torch.load(best, weights_only=True)["hyper_parameters"]["vocab"])  # kept in checkpoints


def test_the_text_run_writes_no_captions_file(plain_run):
    _, _, run, _ = plain_run
    assert list(run.rglob("translations.json")) and not list(run.rglob("captions.json"))


def test_empty_accented_and_ordinary_inputs_get_the_right_messages(plain_run, tmp_path, capsys):
    _, _, run, _ = plain_run
    inputs = tmp_path / "in.txt"
    lines = ["je suis pret.", "", "je suis très fatigué.", "je suis Zorglub.", "qwx zzv."]
    inputs.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert cli_main(["translate", "--ckpt_path", str(run), "--input", str(inputs)]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 5
    warned = {
        int(line.split(f"{inputs}:")[1].split(":")[0]): line for line in captured.err.splitlines() if "warning" in line
    }
    assert set(warned) == {2, 3, 5}, captured.err
    assert "empty line" in warned[2]
    assert "letters never seen in training (è, é)" in warned[3]
    assert "2 of 2 words never seen in training" in warned[5]  # a rare name alone (line 4) is no warning


def test_the_large_preset_stacks_on_text_tsv_and_trains(tmp_path):
    """configs/text/large.yaml: the sizes for big corpora or a GPU, on generated pairs (a few steps)."""
    for name, n, seed in (("train", 96, 0), ("val", 16, 1), ("test", 16, 2)):
        write_tsv(tmp_path / f"{name}.tsv", corpus(n, seed))
    runs = tmp_path / "runs"
    cli_main(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / "text_tsv.yaml"),
            "--config",
            str(ROOT / "configs" / "text" / "large.yaml"),
            *data_args(tmp_path),
            "--trainer.max_steps",
            "3",
            "--trainer.enable_progress_bar",
            "false",
            "--model.init_args.beam_size",
            "1",
            "--trainer.default_root_dir",
            str(runs),
        ]
    )
    best = next(runs.rglob("best*.ckpt"))
    hp = torch.load(best, weights_only=True)["hyper_parameters"]
    assert (hp["embed_dim"], hp["encoder_dim"], hp["decoder_dim"], hp["attention_dim"]) == (256, 256, 512, 256)
    (fit_end,) = test_metrics(best.parents[1])
    assert fit_end["test/num_sentences"] == 16


def test_the_default_sizes_are_the_small_ones_for_minutes_on_a_cpu():
    import yaml

    config = yaml.safe_load((ROOT / "configs" / "text_tsv.yaml").read_text())
    model, data = config["model"]["init_args"], config["data"]["init_args"]
    assert (model["embed_dim"], model["encoder_dim"], model["decoder_dim"], model["attention_dim"]) == (
        128,
        64,
        128,
        128,
    )
    assert data["batch_size"] == 32
