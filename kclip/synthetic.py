"""The embedded dataset: deterministic compositional image-caption pairs, written in the real on-disk format.

Each image holds two objects, each with a size, a colour and a shape, in a spatial relation (left of,
right of, above, below). Each image gets several caption phrasings (one pair per phrasing). A few
(colour, shape) combinations are *held out*: no training image contains them and every validation image
contains at least one, so the validation split measures compositional generalisation.

Output (``out_dir``): ``images/*.png``, ``train.csv`` and ``val.csv`` with columns
``uid, image, caption, image_id, size_a, color_a, shape_a, relation, size_b, color_b, shape_b``
(image paths relative to the CSV, as real CSV data has them), and ``meta.json`` with the vocabulary, the
held-out combinations and the generator parameters. The same seed and parameters give identical files.
"""
from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from kclip.atomic import atomic_path, atomic_write_text

GENERATOR_VERSION = 1
SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230),
          "yellow": (230, 210, 40), "purple": (150, 60, 200)}
SIZES = {"small": 0.22, "large": 0.36}          # object extent as a fraction of the image side
RELATIONS = ("to the left of", "to the right of", "above", "below")
ATTRIBUTE_COLUMNS = ("size_a", "color_a", "shape_a", "relation", "size_b", "color_b", "shape_b")
CSV_COLUMNS = ("uid", "image", "caption", "image_id") + ATTRIBUTE_COLUMNS


@dataclass(frozen=True)
class Scene:
    size_a: str
    color_a: str
    shape_a: str
    relation: str
    size_b: str
    color_b: str
    shape_b: str

    def phrasings(self) -> list[str]:
        a = f"{self.size_a} {self.color_a} {self.shape_a}"
        b = f"{self.size_b} {self.color_b} {self.shape_b}"
        inverse = {"to the left of": "to the right of", "to the right of": "to the left of",
                   "above": "below", "below": "above"}[self.relation]
        return [
            f"a {a} {self.relation} a {b}",
            f"a {b} {inverse} a {a}",
            f"a picture of a {a} that is {self.relation} a {b}",
            f"there is a {b}, and a {a} is {self.relation} it",
        ]


def heldout_combos(n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` (colour, shape) pairs never seen in training, chosen so every colour and shape still appears."""
    rng = np.random.default_rng(seed + 7919)
    colors, shapes = list(COLORS), list(SHAPES)
    offset = int(rng.integers(len(shapes)))
    # a diagonal pattern: distinct colours and shapes, so each still occurs in training with other partners
    return [(colors[i % len(colors)], shapes[(i + offset) % len(shapes)]) for i in range(min(n, len(shapes)))]


def _sample_scene(rng: np.random.Generator, allowed) -> Scene:
    while True:
        ca, sa = str(rng.choice(list(COLORS))), str(rng.choice(SHAPES))
        cb, sb = str(rng.choice(list(COLORS))), str(rng.choice(SHAPES))
        if (ca, sa) == (cb, sb):
            continue  # two identical-looking objects make the relation ambiguous
        if allowed((ca, sa), (cb, sb)):
            return Scene(str(rng.choice(list(SIZES))), ca, sa, str(rng.choice(RELATIONS)),
                         str(rng.choice(list(SIZES))), cb, sb)


def _draw(draw, shape: str, cx: float, cy: float, r: float, rgb) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=rgb)
    elif shape == "cross":
        w = r * 0.4
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=rgb)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=rgb)


def render(scene: Scene, size: int, rng: np.random.Generator):
    """Draw the scene: object a and b placed according to the relation, with a little jitter."""
    from PIL import Image, ImageDraw

    bg = tuple(int(v) for v in rng.integers(0, 40, size=3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    ra, rb = SIZES[scene.size_a] * size / 2, SIZES[scene.size_b] * size / 2
    near, far = 0.27 * size, 0.73 * size
    j = lambda: float(rng.uniform(-0.05, 0.05) * size)  # noqa: E731 - tiny jitter helper
    mid = size / 2
    pos = {"to the left of": ((near, mid), (far, mid)), "to the right of": ((far, mid), (near, mid)),
           "above": ((mid, near), (mid, far)), "below": ((mid, far), (mid, near))}[scene.relation]
    (ax, ay), (bx, by) = pos
    _draw(draw, scene.shape_a, ax + j(), ay + j(), ra, COLORS[scene.color_a])
    _draw(draw, scene.shape_b, bx + j(), by + j(), rb, COLORS[scene.color_b])
    return img


def generate(out_dir: str | Path, n_train_images: int = 1200, n_val_images: int = 200, captions_per_image: int = 2,
             image_size: int = 32, heldout: int = 4, seed: int = 0, progress: bool = True,
             heldout_seed: int | None = None) -> dict:
    """Write the dataset to ``out_dir`` unless an identical one is already there; return its meta dict.

    Args:
        captions_per_image: phrasings per image, 1..4 (each is one pair/row).
        heldout: number of (colour, shape) combinations kept out of training.
        seed: draws the scenes and renders the images.
        heldout_seed: chooses the held-out combinations (None: ``seed``). Two sets with different ``seed`` and
            the same ``heldout_seed`` hold different images but keep the same combinations out of training.
    """
    from tqdm.auto import tqdm

    if not 1 <= captions_per_image <= 4:
        raise ValueError(f"captions_per_image is {captions_per_image}; the generator has 1 to 4 phrasings")
    out_dir = Path(out_dir)
    held_seed = seed if heldout_seed is None else int(heldout_seed)
    params = dict(version=GENERATOR_VERSION, n_train_images=n_train_images, n_val_images=n_val_images,
                  captions_per_image=captions_per_image, image_size=image_size, heldout=heldout, seed=seed)
    if held_seed != seed:  # recorded only when it differs: sets made before the key existed keep their identity
        params["heldout_seed"] = held_seed
    meta_path = out_dir / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("params") == params:
            return meta
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    held = heldout_combos(heldout, held_seed)
    held_set = set(held)
    rng = np.random.default_rng(seed)
    splits = {
        "train": (n_train_images, lambda a, b: a not in held_set and b not in held_set),
        "val": (n_val_images, (lambda a, b: a in held_set or b in held_set) if held_set else (lambda a, b: True)),
    }
    image_id = 0
    for split, (n_images, allowed) in splits.items():
        rows = []
        for _ in tqdm(range(n_images), desc=f"synthetic {split}", disable=not progress, leave=False):
            scene = _sample_scene(rng, allowed)
            name = f"images/{image_id:06d}.png"
            render(scene, image_size, rng).save(out_dir / name)
            for p, caption in enumerate(scene.phrasings()[:captions_per_image]):
                rows.append({"uid": f"{split}-{image_id:06d}-{p}", "image": name, "caption": caption,
                             "image_id": image_id, **asdict(scene)})
            image_id += 1
        with atomic_path(out_dir / f"{split}.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    meta = {"params": params, "shapes": list(SHAPES), "colors": list(COLORS), "sizes": list(SIZES),
            "relations": list(RELATIONS), "heldout_combos": [list(c) for c in held],
            "attribute_columns": list(ATTRIBUTE_COLUMNS)}
    atomic_write_text(meta_path, json.dumps(meta, indent=2))
    return meta
