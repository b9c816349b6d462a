"""Does the model look at what it names? The pointing game over named boxes, for any data.

A datamodule that knows where things are gives each evaluation image a list of **named
boxes** (batch key ``"boxes"``)::

    {"box": [x0, y0, x1, y1],        # fractions of the image width / height, in [0, 1]
     "nouns": ["dog", "puppy"],       # words that name the thing (head nouns)
     "attributes": ["brown"]}         # optional: words that describe it ("small", "red")

The built-in dataset gives one box per object (nouns: its shape; attributes: its size and
colour); COCO-format data gets them from an instances file or a boxes JSON
(:mod:`captioning.data.boxes`). Only words that name a thing boxed in *that* image are scored.

Definition, per image and generated caption:

1. A noun at position t is a word in the nouns of some box; its *referred* boxes are those
   boxes. Its phrase is the words since the previous such noun; words of the phrase that are
   attributes of a box in the image are the noun's attributes ("large red circle"), and
   narrow the referred boxes (nearest first) when some referred box has them.
2. The peak of a word is the cell with the largest attention weight (first on ties); its
   centre ``((col + 0.5) / W, (row + 0.5) / H)``.
3. A word hits when its peak centre lies in a referred box widened by half a cell on every
   side (so boxes smaller than a cell can still be hit by the nearest cell).
4. Chance for a word: the share of grid cells whose centres lie in the (widened) referred
   boxes, i.e. the hit rate of a peak placed uniformly at random.

``localisation`` is the hit rate over nouns and their attributes, ``localisation_nouns`` over
nouns alone; ``*_chance`` are the matching chance levels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor


def check_boxes(boxes: Sequence[Mapping], where: str) -> None:
    """Raise ValueError naming ``where`` unless every named box is well formed."""
    for k, b in enumerate(boxes):
        box = b.get("box") if isinstance(b, Mapping) else None
        if (
            not isinstance(box, (list, tuple))
            or len(box) != 4
            or not all(isinstance(v, (int, float)) and 0.0 <= float(v) <= 1.0 for v in box)
            or box[0] > box[2]
            or box[1] > box[3]
        ):
            raise ValueError(
                f"{where}, box {k}: must be [x0, y0, x1, y1] as fractions of the image in [0, 1] "
                f"with x0 <= x1 and y0 <= y1, got {box!r}"
            )
        nouns = b.get("nouns")
        if not isinstance(nouns, (list, tuple)) or not nouns or not all(isinstance(n, str) for n in nouns):
            raise ValueError(f"{where}, box {k}: 'nouns' must be a non-empty list of words, got {nouns!r}")


def _grid(alpha: Tensor, where: str) -> Tensor:
    alpha = alpha.detach().float().cpu()
    if alpha.dim() == 2:
        side = int(round(alpha.shape[1] ** 0.5))
        if side * side != alpha.shape[1]:
            raise ValueError(f"{where}: alpha of shape {tuple(alpha.shape)} is not (T, H, W) and S is not square")
        alpha = alpha.view(alpha.shape[0], side, side)
    if alpha.dim() != 3:
        raise ValueError(f"{where}: alpha must be (T, H, W), got shape {tuple(alpha.shape)}")
    return alpha


def _inside(box: Sequence[float], xs: Tensor, ys: Tensor, tol_x: float, tol_y: float) -> Tensor:
    return (xs >= box[0] - tol_x) & (xs <= box[2] + tol_x) & (ys >= box[1] - tol_y) & (ys <= box[3] + tol_y)


def pointing_game(
    words: Sequence[Sequence[str] | str], alphas: Sequence[Tensor], boxes: Sequence[Sequence[Mapping]]
) -> dict[str, float | int]:
    """Pointing-game scores of generated captions (module docstring).

    Args:
        words: per image its T_i generated words (a string is split on spaces).
        alphas: per image (T_i, H, W) attention (or (T_i, H*W) for a square grid).
        boxes: per image its named boxes.

    Returns:
        ``localisation``, ``localisation_chance``, ``localisation_hits``, ``localisation_total``
        and the same with ``localisation_nouns``; rates are 0.0 when nothing was scored.
    """
    if not (len(words) == len(alphas) == len(boxes)):
        raise ValueError(
            f"pointing_game: got {len(words)} captions, {len(alphas)} alphas and {len(boxes)} box "
            "lists; they must match"
        )
    hits = total = noun_hits = noun_total = 0
    chance = noun_chance = 0.0
    for i, (ws, alpha, named) in enumerate(zip(words, alphas, boxes)):
        where = f"pointing_game: image {i}"
        ws = ws.split() if isinstance(ws, str) else list(ws)
        check_boxes(named, where)
        grid = _grid(alpha, where)
        t_steps, h, w = grid.shape
        if t_steps != len(ws):
            raise ValueError(f"{where}: {len(ws)} words but {t_steps} attention maps (drop eos)")
        flat = grid.reshape(t_steps, h * w).argmax(dim=1)
        peak_x, peak_y = (flat % w).double().add(0.5).div(w), (flat // w).double().add(0.5).div(h)
        cell_y, cell_x = torch.meshgrid(
            (torch.arange(h).double() + 0.5) / h, (torch.arange(w).double() + 0.5) / w, indexing="ij"
        )
        tol_x, tol_y = 0.5 / w, 0.5 / h
        nouns = {n for b in named for n in b["nouns"]}
        attributes = {a for b in named for a in b.get("attributes") or ()}

        def score(
            t: int,
            referred: list[Mapping],
            peak_x=peak_x,
            peak_y=peak_y,
            cell_x=cell_x,
            cell_y=cell_y,
            tol_x=tol_x,
            tol_y=tol_y,
        ) -> tuple[bool, float]:
            x, y = peak_x[t : t + 1], peak_y[t : t + 1]
            hit = any(bool(_inside(b["box"], x, y, tol_x, tol_y)[0]) for b in referred)
            covered = torch.zeros(cell_x.shape, dtype=torch.bool)
            for b in referred:
                covered |= _inside(b["box"], cell_x, cell_y, tol_x, tol_y)
            return hit, float(covered.float().mean())

        phrase_start = 0
        for t, word in enumerate(ws):
            if word not in nouns:
                continue
            referred = [b for b in named if word in b["nouns"]]
            phrase = [j for j in range(phrase_start, t) if ws[j] in attributes]
            phrase_start = t + 1
            for j in reversed(phrase):  # "red circle": the nearest describing word narrows first
                narrowed = [b for b in referred if ws[j] in (b.get("attributes") or ())]
                referred = narrowed or referred
            hit, share = score(t, referred)
            noun_hits, noun_total, noun_chance = noun_hits + hit, noun_total + 1, noun_chance + share
            hits, total, chance = hits + hit, total + 1, chance + share
            for j in phrase:
                hit, share = score(j, referred)
                hits, total, chance = hits + hit, total + 1, chance + share
    return {
        "localisation": hits / total if total else 0.0,
        "localisation_chance": chance / total if total else 0.0,
        "localisation_hits": hits,
        "localisation_total": total,
        "localisation_nouns": noun_hits / noun_total if noun_total else 0.0,
        "localisation_nouns_chance": noun_chance / noun_total if noun_total else 0.0,
        "localisation_nouns_hits": noun_hits,
        "localisation_nouns_total": noun_total,
    }
