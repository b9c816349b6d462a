"""benchmarks/real_photos.py: its caption statistics and the table it writes into docs."""

import importlib.util

from support import ROOT


def _module():
    spec = importlib.util.spec_from_file_location("real_photos", ROOT / "benchmarks" / "real_photos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_caption_statistics_count_repeats_words_and_distinct_captions():
    rp = _module()
    preds = {1: "a man in a man in a", 2: "a dog runs", 3: "a dog runs"}
    refs = {1: ["a man in a red shirt"], 2: ["a dog runs on grass"], 3: ["a brown dog runs"]}
    q = rp.caption_quality(preds, refs)
    assert q["distinct_captions"] == 2 and q["words_used"] == 5 and q["images"] == 3
    assert abs(q["repeated_trigram_share"] - 1 / 3) < 1e-9


def test_the_table_replaces_its_own_block_and_keeps_the_rest(tmp_path):
    rp = _module()
    doc = tmp_path / "results.md"
    doc.write_text("# Results\n\nkept above\n")
    rp.write_results_md(doc, f"{rp.BEGIN}\nfirst\n{rp.END}")
    doc.write_text(doc.read_text() + "\nkept below\n")
    rp.write_results_md(doc, f"{rp.BEGIN}\nsecond\n{rp.END}")
    text = doc.read_text()
    assert "second" in text and "first" not in text and "kept above" in text and "kept below" in text
    assert text.count(rp.BEGIN) == 1


def test_decoding_is_the_best_one_whose_captions_do_not_loop():
    rp = _module()

    def row(n, cider, repeats):
        return {"no_repeat_ngram": n, "length_penalty": 0.0, "cider": cider, "repeated_trigram_share": repeats}

    grid = [row(0, 0.389, 0.104), row(2, 0.375, 0.048), row(3, 0.387, 0.0), row(4, 0.386, 0.112)]
    assert rp.pick_decoding(grid)["no_repeat_ngram"] == 3
    assert rp.pick_decoding([row(0, 0.3, 0.2), row(2, 0.2, 0.1)])["no_repeat_ngram"] == 0  # none is clean


def test_the_change_over_the_start_is_paired_and_its_interval_shrinks_with_the_photos():
    rp = _module()
    refs = {i: [f"a dog {w} on the grass" for w in ("runs", "jumps", "sits")] for i in range(40)}
    refs.update({i: [f"a man {w} a red bike" for w in ("rides", "pushes", "fixes")] for i in range(40, 80)})
    old = {i: ("a dog on the grass" if i < 40 else "a man on a bike") for i in refs}
    new = dict(old)
    for i in range(0, 80, 2):  # every other photo gets a better caption
        new[i] = refs[i][0]
    better = rp.paired_cider_change(new, old, refs)
    assert better["change"] > 0 and 0 < better["low"] <= better["change"] <= better["high"]
    same = rp.paired_cider_change(old, old, refs)
    assert same == {"change": 0.0, "low": 0.0, "high": 0.0}
    worse = rp.paired_cider_change(old, new, refs)
    assert worse["high"] < 0
    few = {i: refs[i] for i in list(range(0, 6)) + list(range(40, 46))}
    fewer = rp.paired_cider_change(new, old, few)
    assert fewer["high"] - fewer["low"] > better["high"] - better["low"]  # fewer photos, less certainty


def test_the_table_shows_each_scst_change_and_when_a_run_kept_its_start():
    rp = _module()
    q = {"bleu4": 0.1, "meteor": 0.2, "cider": 0.4, "distinct_captions": 9, "words_used": 30}
    q["repeated_trigram_share"] = 0.0

    def row(name, change=None):
        r = {"variant": name, "plain": q, "blocked": q, "val_blocked": q, "test_blocked_every_repeat": q}
        r["decoding"] = {"no_repeat_ngram": 3, "length_penalty": 0.0}
        return r | ({"change_over_start": change} if change else {})

    rows = [
        row("xe_previous"),
        row("scst_mean", {"change": 0.0, "low": 0.0, "high": 0.0}),
        row("scst_greedy", {"change": 0.02, "low": -0.06, "high": 0.11}),
    ]
    args = type("Args", (), {"extractor": "x", "grid": 2, "channels": 4, "minutes": 1, "scst_minutes": 1})
    lines = rp.table(rows, q | {"images": 9}, args, "a machine").splitlines()
    blocked = {line.split(" | ")[0][2:]: line for line in lines if "| blocked |" in line}
    assert blocked["scst_mean"].endswith("its start kept (no SCST validation beat it) |")
    assert blocked["scst_greedy"].endswith("+2% (-6% to +11%) |")
    assert blocked["xe_previous"].endswith("| |")
    assert len({line.count("|") for line in lines if line.startswith("|")}) == 1  # every row has every column
