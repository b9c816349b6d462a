"""Text pair datamodules: TSV reading and its errors, vocabularies, synthetic tasks and alignments."""

import calendar

import pytest
import torch

from captioning.data.batches import collate_text as collate
from captioning.data.text import TsvFormatError, TsvTextDataModule, read_tsv
from captioning.data.text_tasks import MONTHS, SyntheticTextDataModule
from captioning.data.text_vocab import TextTokenizer, TextVocab


def write(tmp_path, name, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


GOOD = "Go.\tVa !\tCC-BY 2.0 attribution\nHi.\tSalut !\n\nRun!\tCours !\r\n"


def test_read_tsv_keeps_pairs_with_line_numbers_ignoring_blank_lines_extra_columns_crlf_and_bom(tmp_path):
    path = write(tmp_path, "p.tsv", ("\ufeff" + GOOD).encode())
    pairs, problems = read_tsv(path)
    assert pairs == [(1, "Go.", "Va !"), (2, "Hi.", "Salut !"), (4, "Run!", "Cours !")]
    assert problems == []


@pytest.mark.parametrize(
    "bad_line, reason",
    [
        (b"no tab on this line", "missing tab"),
        (b"\tonly a target", "empty source"),
        (b"only a source\t  ", "empty target"),
        (b"caf\xe9\tcoffee", "not valid utf-8"),
    ],
)
def test_malformed_line_is_a_clear_error_with_file_and_line(tmp_path, bad_line, reason):
    path = write(tmp_path, "train.tsv", b"a\tb\nc\td\n" + bad_line + b"\ne\tf\n")
    with pytest.raises(TsvFormatError, match=reason) as err:
        read_tsv(path)
    assert str(path) in str(err.value) and "line 3" in str(err.value) and "skip_malformed" in str(err.value)


def test_skip_malformed_skips_and_counts(tmp_path):
    path = write(tmp_path, "train.tsv", b"a\tb\nbroken\n\tx\nc\td\n\xff\xfe\tz\ne\tf\n")
    pairs, problems = read_tsv(path, skip_malformed=True)
    assert [p[0] for p in pairs] == [1, 4, 6]
    assert len(problems) == 3 and problems[0].startswith("line 2: missing tab")
    with pytest.warns(UserWarning, match="skipped 3 malformed"):
        dm = TsvTextDataModule(str(path), val_path=str(path), skip_malformed=True)
        dm.setup("fit")
    assert dm.skipped[str(path)] == 3
    assert len(dm.dataset("train")) == 3


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.tsv"):
        TsvTextDataModule(str(tmp_path / "nope.tsv")).vocab_data


def test_tsv_vocab_comes_from_train_only_and_travels_as_plain_data(tmp_path):
    train = write(tmp_path, "train.tsv", b"The cat sleeps.\tLe chat dort.\nA dog.\tUn chien.\n")
    val = write(tmp_path, "val.tsv", b"The bird.\tL'oiseau.\n")
    dm = TsvTextDataModule(str(train), val_path=str(val), batch_size=2)
    data = dm.vocab_data
    assert data["tokenizer"] == {"kind": "word", "lowercase": True}
    vocab = TextVocab.from_dict(data)
    assert "cat" in vocab.source and "chat" in vocab.target and "bird" not in vocab.source
    batch = next(iter(dm.val_dataloader()))
    assert batch["source"][0].tolist() == vocab.encode_source(["the", "bird", "."])  # bird -> <unk>
    assert vocab.source.unk_id in batch["source"][0].tolist()
    assert batch["references"] == ["l'oiseau."] and batch["source_text"] == ["The bird."]
    assert "alignments" not in batch
    rev = TsvTextDataModule(str(train), val_path=str(val), reverse=True)
    assert "chat" in TextVocab.from_dict(rev.vocab_data).source


def test_held_out_validation_split_and_long_pairs(tmp_path):
    lines = "".join(f"s{i} x\tt{i} y\n" for i in range(40)) + ("w " * 30 + "\tshort\n")
    path = write(tmp_path, "all.tsv", lines.encode())
    dm = TsvTextDataModule(str(path), val_fraction=0.1, max_train_length=10, seed=3)
    dm.setup("fit")
    train_ids = {it["id"] for it in dm.dataset("train").items}
    val_ids = {it["id"] for it in dm.dataset("val").items}
    assert len(val_ids) == 4 and not train_ids & val_ids
    assert dm.dropped_long == (0 if "all.tsv:41" in val_ids else 1)
    assert len(dm.dataset("test")) == len(val_ids)  # no test_path: test = validation pairs


def test_tokenizers_round_trip():
    word, char = TextTokenizer("word"), TextTokenizer("char", lowercase=False)
    assert word("Don't stop, café-crème!") == ["don't", "stop", ",", "café", "-", "crème", "!"]
    assert word.detokenize(word("2026-11-21, 1999-02-03.")) == "2026-11-21, 1999-02-03."
    assert char("Ab  c") == ["A", "b", "\u2581", "c"]
    assert char.detokenize(char("Ab  c")) == "Ab c"
    assert TextTokenizer.from_dict(char.to_dict()).kind == "char"
    with pytest.raises(ValueError, match="tokenizer"):
        TextTokenizer("bpe")


def test_synthetic_dates_alignment_points_at_the_source_token_it_comes_from():
    dm = SyntheticTextDataModule(task="dates", min_items=2, max_items=6, train_size=50)
    vocab, tok = dm.text_vocab, dm.text_vocab.tokenizer
    for index in range(50):
        ex = dm.example("train", index)
        src = vocab.source.decode(ex["source"])
        tgt = vocab.target.decode(ex["target"])
        assert tok(ex["source_text"]) == src and tok(ex["reference"]) == tgt  # text <-> tokens agree
        assert len(ex["alignment"]) == len(tgt) + 1 and ex["alignment"][-1] == -1  # + EOS
        assert 2 <= src.count(",") + 1 <= 6
        for t, s in enumerate(ex["alignment"][:-1]):
            if tgt[t] in ("-", ","):  # separators are not scored
                assert s == -1
            elif len(tgt[t]) == 4:  # year: copied
                assert src[s] == tgt[t]
            elif tgt[t + 1 : t + 2] == ["-"]:  # month: name -> number
                assert MONTHS.index(src[s]) + 1 == int(tgt[t])
            else:  # day: zero-padded copy, valid for its month and year
                assert int(src[s]) == int(tgt[t])
                assert int(tgt[t]) <= calendar.monthrange(int(tgt[t - 4]), int(tgt[t - 2]))[1]
    assert dm.example("train", 7) == SyntheticTextDataModule(
        task="dates", min_items=2, max_items=6, train_size=50
    ).example("train", 7)
    assert dm.example("train", 7) != dm.example("val", 7)


def test_synthetic_reverse_lengths_are_configurable_and_alignment_known():
    dm = SyntheticTextDataModule(
        task="reverse",
        min_items=40,
        max_items=60,
        eval_min_items=80,
        eval_max_items=80,
        num_symbols=10,
        train_size=5,
        val_size=3,
        batch_size=5,
    )
    batch = next(iter(dm.train_dataloader()))
    n = batch["source_lengths"] - 1
    assert bool(((n >= 40) & (n <= 60)).all())
    for i in range(5):
        src, tgt = batch["source"][i, : int(n[i])], batch["target"][i, 1 : int(n[i]) + 1]
        align = torch.tensor(batch["alignments"][i][:-1])
        assert torch.equal(src.flip(0), src[align])  # target t = source n-1-t
        assert [dm.text_vocab.target.itos[j] for j in tgt] == [dm.text_vocab.source.itos[j] for j in src.flip(0)]
    val = next(iter(dm.val_dataloader()))
    assert val["source_lengths"].tolist() == [81] * 3


def test_collate_pads_with_zero_and_keeps_text():
    dm = SyntheticTextDataModule(task="dates", max_items=3, train_size=6)
    items = dm.examples("train", range(6))
    batch = collate(items)
    for i, it in enumerate(items):
        s, t = len(it["source"]), len(it["target"])
        assert batch["source"][i, :s].tolist() == it["source"] and bool((batch["source"][i, s:] == 0).all())
        assert batch["target"][i, :t].tolist() == it["target"] and int(batch["target_lengths"][i]) == t
    assert batch["alignments"] == [it["alignment"] for it in items]


def test_bad_synthetic_settings_are_clear_errors():
    with pytest.raises(ValueError, match="task"):
        SyntheticTextDataModule(task="sorting")
    with pytest.raises(ValueError, match="min_items"):
        SyntheticTextDataModule(min_items=5, max_items=2)
    with pytest.raises(ValueError, match="num_symbols"):
        SyntheticTextDataModule(task="reverse", num_symbols=99)


def test_malformed_line_message_is_one_line_naming_file_and_line(tmp_path):
    path = write(tmp_path, "bad_notab.tsv", b"a\tb\nno tab here\n")
    with pytest.raises(ValueError) as err:  # TsvFormatError is a ValueError: the CLI prints it as one line
        TsvTextDataModule(str(path)).vocab_data
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}, line 2: missing tab")


def test_bpe_datamodule_learns_subwords_from_train_only_and_buckets_batches(tmp_path):
    pairs = [
        (f"je suis {w}{'s' * (i % 3)} {'très ' * (i % 5)}.", f"i am {w} {'very ' * (i % 5)}.")
        for i, w in enumerate(["fatigué", "content", "prêt", "grand", "petit"] * 12)
    ]
    train = write(tmp_path, "train.tsv", "".join(f"{s}\t{t}\n" for s, t in pairs).encode())
    val = write(tmp_path, "val.tsv", "Vous êtes fatigués !\tYou are tired!\nIls sont là.\tThey're here.\n".encode())
    dm = TsvTextDataModule(str(train), val_path=str(val), tokenizer="bpe", subword_vocab_size=60, batch_size=8)
    data = dm.vocab_data
    assert data["tokenizer"]["kind"] == "bpe" and "model" in data["tokenizer"]
    vocab = TextVocab.from_dict(data)
    assert vocab.tokenizer("Je suis prêt.") == dm.text_vocab.tokenizer("Je suis prêt.")
    assert "vous" not in data["source_words"] and "suis" in data["source_words"]  # train only
    assert dm.dataset("val").items[1]["reference"] == "they're here."  # normalised target text
    batches = list(dm.train_dataloader())
    assert sum(len(b["ids"]) for b in batches) == len(pairs)
    spread = [int(b["source_lengths"].max() - b["source_lengths"].min()) for b in batches]
    assert max(spread) <= 3  # similar lengths per batch (the pool sorts by source length)
    val_order = [i for b in dm.val_dataloader() for i in b["ids"]]
    assert sorted(val_order) == sorted(it["id"] for it in dm.dataset("val").items)
    assert [it["id"] for it in dm.dataset("val").items] == ["val.tsv:1", "val.tsv:2"]  # file order kept
    with pytest.raises(ValueError, match="tokenizer"):
        TsvTextDataModule(str(train), tokenizer="unigram")
