"""Caption tokenisation: English exactly as before, other scripts and emoji kept whole."""

from __future__ import annotations

import random
import re

import pytest

from captioning.data.vocab import tokenize

# The tokenizer before Unicode support: the reference for plain ASCII captions.
_OLD_RE = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")


def _old_tokenize(text: str, keep_punctuation: bool = False) -> list[str]:
    tokens = _OLD_RE.findall(text.lower())
    return tokens if keep_punctuation else [t for t in tokens if any(ch.isalnum() for ch in t)]


ENGLISH = [
    "A man in a red t-shirt is riding a bike down the street.",
    "Two dogs playing with a frisbee in the park; it's sunny!",
    "A woman's hand holding a 3.5-inch floppy disk.",
    "The 1990's-style kitchen has a stainless steel fridge (and an oven).",
    "rock'n'roll band on stage, 5 people",
    '"A cat" -- sitting on a chair?!',
    "dogs' bowls on the floor",
    "an e-mail @ 10:30am, $5 & 50% off #sale",
    "A_B testing ~ [brackets] {braces} <angles> | pipes \\ slashes / back`ticks` ^caret",
    "  leading and trailing spaces\tand\ttabs\nnewlines  ",
    "",
    "'quoted' words and don't.",
    "UPPER CASE CAPTION WITH NUMBERS 123 AND 4TH",
]


@pytest.mark.parametrize("keep_punctuation", [False, True])
def test_ascii_captions_tokenise_exactly_as_before(keep_punctuation):
    for caption in ENGLISH:
        assert tokenize(caption, keep_punctuation=keep_punctuation) == _old_tokenize(caption, keep_punctuation)
    rng = random.Random(0)  # every printable and control ASCII character, in random strings
    for _ in range(3000):
        text = "".join(chr(rng.randrange(128)) for _ in range(rng.randint(0, 30)))
        assert tokenize(text, keep_punctuation=keep_punctuation) == _old_tokenize(text, keep_punctuation), text


def test_ascii_hyphens_numbers_and_contractions_split_as_documented():
    assert tokenize("A man in a t-shirt.") == ["a", "man", "in", "a", "t", "shirt"]
    assert tokenize("it's 3.5 m") == ["it's", "3", "5", "m"]
    assert tokenize("rock'n'roll", keep_punctuation=True) == ["rock'n", "'", "roll"]


@pytest.mark.parametrize(
    ("caption", "tokens"),
    [
        ("carré", ["carré"]),
        ("Café au lait", ["café", "au", "lait"]),
        ("Ein Mädchen isst Äpfel", ["ein", "mädchen", "isst", "äpfel"]),
        ("Собака бежит", ["собака", "бежит"]),
        ("ΟΔΟΣ", ["οδος"]),  # str.lower(), final sigma included
        ("बिल्ली सो रही है", ["बिल्ली", "सो", "रही", "है"]),  # Devanagari vowel signs stay in words
        ("می\u200cخواهم", ["می\u200cخواهم"]),  # Persian word with a ZWNJ inside
        ("aujourd'hui l'été", ["aujourd'hui", "l'été"]),
    ],
)
def test_accented_and_non_latin_words_stay_whole(caption, tokens):
    assert tokenize(caption) == tokens


def test_unicode_forms_of_one_word_give_one_token():
    # NFKC: decomposed accents, full-width letters and ligatures become the plain word,
    # so one word has one vocabulary entry whatever keyboard typed it.
    assert tokenize("cafe\u0301") == tokenize("café") == ["café"]
    assert tokenize("ＤＯＧ") == ["dog"]
    assert tokenize("ﬁsh") == ["fish"]
    assert tokenize("İstanbul") == ["i\u0307stanbul"]  # lowercase dotted I keeps its dot mark


@pytest.mark.parametrize(
    ("caption", "tokens"),
    [
        ("日本の猫", ["日本の猫"]),
        ("猫が、ソファで寝ている。", ["猫が", "ソファで寝ている"]),
        ("一只猫 在 睡觉", ["一只猫", "在", "睡觉"]),
        ("แมวกินปลา", ["แมวกินปลา"]),
    ],
)
def test_scripts_without_spaces_give_one_token_per_run_of_letters(caption, tokens):
    assert tokenize(caption) == tokens


def test_typographic_apostrophe_makes_the_same_contraction():
    assert tokenize("It’s a dog’s life") == tokenize("It's a dog's life") == ["it's", "a", "dog's", "life"]


def test_emoji_are_kept_as_their_own_tokens():
    assert tokenize("a 🐶 on the beach🏖️") == ["a", "🐶", "on", "the", "beach", "🏖\ufe0f"]
    assert tokenize("thumbs 👍🏽 family 👨\u200d👩\u200d👧 flag 🇫🇷🇯🇵 ❤️") == [
        "thumbs",
        "👍🏽",
        "family",
        "👨\u200d👩\u200d👧",
        "flag",
        "🇫🇷",
        "🇯🇵",
        "❤\ufe0f",
    ]
    assert tokenize("20° ©") == ["20"]  # symbols that are not emoji count as punctuation


def test_punctuation_of_any_script_dropped_unless_kept():
    assert tokenize("猫、犬。«chat»") == ["猫", "犬", "chat"]
    assert tokenize("猫、犬。«chat» 20°", keep_punctuation=True) == [
        "猫",
        "、",
        "犬",
        "。",
        "«",
        "chat",
        "»",
        "20",
        "°",
    ]


def test_invisible_characters_do_not_split_or_join_words_wrongly():
    assert tokenize("co\u00adoperate \ufeffdog") == ["cooperate", "dog"]
    assert tokenize("cat\u200bdog") == ["cat", "dog"]  # zero-width space is a word break


def test_lowercase_false_keeps_case_but_splits_punctuation_the_same_way():
    # Before, lowercase=False only split on whitespace: "Dog," and "t-shirt." were tokens.
    assert tokenize("A Dog, in a T-shirt.", lowercase=False) == ["A", "Dog", "in", "a", "T", "shirt"]
    assert tokenize("Café ÉTÉ", lowercase=False) == ["Café", "ÉTÉ"]
