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
