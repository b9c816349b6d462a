"""The README's main job at full size (about 3.5 minutes on 2 cores): `-m slow` runs it.

Trains configs/shapes.yaml exactly as the quickstart does, then checks the scores the README
reports are reached (with a margin for run-to-run noise) and that captioning a test image
writes an overlay whose attention follows the objects it names.
"""

from __future__ import annotations

import json

import pytest

from captioning.commands.main import main

from support import ROOT


@pytest.mark.slow
def test_quickstart_reaches_the_scores_the_readme_reports(tmp_path):
    run = tmp_path / "runs"
    main(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / "shapes.yaml"),
            "--trainer.default_root_dir",
            str(run),
            "--trainer.logger.init_args.save_dir",
            str(run),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    rows = next(run.rglob("metrics.csv")).read_text().splitlines()
    header, last = rows[0].split(","), rows[-1].split(",")
    test = {k: float(v) for k, v in zip(header, last) if k.startswith("test/") and v}
    assert test["test/bleu4"] > 0.85 and test["test/cider"] > 4.5
    assert test["test/localisation"] > test["test/localisation_chance"] + 0.5  # it looks at what it names,
    assert test["test/localisation_nouns"] > test["test/localisation_nouns_chance"] + 0.5  # nouns too

    from captioning.data.shapes import ShapesDataModule

    images = ShapesDataModule().export_images("test", [0, 1], tmp_path / "samples")
    assert main(["caption", "--ckpt_path", str(run), "--output", str(tmp_path / "overlays"), *map(str, images)]) == 0
    for image in images:
        meta = json.loads((tmp_path / "overlays" / f"{image.stem}.json").read_text())
        assert len(meta["words"]) >= 3 and len(meta["attention"]) == len(meta["words"])
