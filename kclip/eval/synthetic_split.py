"""Reading one split of the synthetic set (``kclip.synthetic``) for evaluation.

A split is a CSV of caption rows (several rows per image) plus ``meta.json``. :func:`read_split` groups
the rows by image: unique images in first-seen order, the caption list, and ``text_to_image`` mapping
each caption to its image's index, which is what the retrieval metrics need.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from kclip.errors import MissingFileError


@dataclass
class SyntheticSplit:
    """One split of the synthetic set, grouped by image.

    Attributes:
        image_paths: (Ni,) absolute paths of the unique images, first-seen order.
        captions: (Nt,) every caption row, file order.
        text_to_image: (Nt,) index into ``image_paths`` of each caption's image.
        scenes: (Ni,) per image a dict of the attribute columns (size_a, color_a, ...).
        rows: the raw CSV rows (dicts), file order.
        meta: the parsed meta.json.
    """
    image_paths: list[Path]
    captions: list[str]
    text_to_image: list[int]
    scenes: list[dict]
    rows: list[dict] = field(repr=False)
    meta: dict = field(repr=False)


def read_meta(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise MissingFileError(f"{path} is missing: data_dir must be a synthetic set written by "
                                "kclip.synthetic.generate (images/, train.csv, val.csv, meta.json)")
    return json.loads(path.read_text())


def read_split(data_dir: str | Path, split: str = "val") -> SyntheticSplit:
    """Read ``<data_dir>/<split>.csv`` and ``meta.json`` into a :class:`SyntheticSplit`."""
    data_dir = Path(data_dir)
    meta = read_meta(data_dir)
    path = data_dir / f"{split}.csv"
    if not path.is_file():
        raise MissingFileError(f"{path} is missing (expected the synthetic set's {split}.csv)")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path} has no rows")
    columns = meta.get("attribute_columns") or ["size_a", "color_a", "shape_a", "relation", "size_b", "color_b", "shape_b"]
    missing = [c for c in ("image", "caption", *columns) if c not in rows[0]]
    if missing:
        raise ValueError(f"{path} lacks the column(s) {missing}; is it a kclip.synthetic CSV?")
    index: dict[str, int] = {}
    image_paths, scenes, text_to_image = [], [], []
    for row in rows:
        key = row.get("image_id") or row["image"]
        if key not in index:
            index[key] = len(image_paths)
            image_paths.append((path.parent / row["image"]).resolve())
            scenes.append({c: row[c] for c in columns})
        text_to_image.append(index[key])
    return SyntheticSplit(image_paths, [r["caption"] for r in rows], text_to_image, scenes, rows, meta)
