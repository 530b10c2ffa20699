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
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

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


INVERSE_RELATION = {"to the left of": "to the right of", "to the right of": "to the left of",
                    "above": "below", "below": "above"}
# the slots a caption states
SLOTS = ATTRIBUTE_COLUMNS


def swapped(scene: Scene) -> Scene:
    """The same scene stated the other way round: objects swapped, relation inverted."""
    return Scene(scene.size_b, scene.color_b, scene.shape_b, INVERSE_RELATION[scene.relation],
                 scene.size_a, scene.color_a, scene.shape_a)


_OBJECT = "({}) ({}) ({})".format(*("|".join(map(re.escape, v)) for v in (SIZES, COLORS, SHAPES)))
_RELATION = "({})".format("|".join(map(re.escape, RELATIONS)))
# the phrasings of Scene.phrasings as patterns, each with where a, relation and b sit among its groups
_PHRASINGS = [
    (re.compile(rf"^a {_OBJECT} {_RELATION} a {_OBJECT}$"), (0, 3, 4)),
    (re.compile(rf"^a picture of a {_OBJECT} that is {_RELATION} a {_OBJECT}$"), (0, 3, 4)),
    (re.compile(rf"^there is a {_OBJECT}, and a {_OBJECT} is {_RELATION} it$"), (3, 6, 0)),
]


def parse_caption(caption: str) -> Scene:
    """The scene a caption of any of :meth:`Scene.phrasings` states, as stated (x <relation> y: x is object a).

    Raises:
        ValueError: the caption is not one of the grammar's phrasings.
    """
    text = caption.strip()
    for pattern, (a, rel, b) in _PHRASINGS:
        m = pattern.match(text)
        if m:
            g = m.groups()
            return Scene(*g[a:a + 3], g[rel], *g[b:b + 3])
    raise ValueError(f"caption {caption!r} is not a sentence of the synthetic grammar (kclip.synthetic.Scene."
                     "phrasings)")


def _words_to_caption(words: Sequence[str]) -> str:
    return " ".join(words).replace(" ,", ",")  # the words of kclip.eval.text_em.tokenize, joined back


def slot_hits(pred_words: Sequence[str], ref_words: Sequence[str]) -> tuple[int, int]:
    """(slots right, slots in all) of a decoded caption against its reference, phrasing ignored: both (word lists of
    ``kclip.eval.text_em.tokenize``) are parsed
    (:func:`parse_caption`) and compared on the 7 slots (the 3 attributes of each object and the relation) in
    the better of the prediction's two statements (as parsed, and :func:`swapped`), so "a X above a Y" scores
    the same against "a Y below a X" as against itself. A prediction that follows no phrasing gets no slot right."""
    ref = parse_caption(_words_to_caption(ref_words))
    try:
        pred = parse_caption(_words_to_caption(pred_words))
    except ValueError:
        return 0, len(SLOTS)
    r = asdict(ref)
    hits = max(sum(p[s] == r[s] for s in SLOTS) for p in (asdict(pred), asdict(swapped(pred))))
    return hits, len(SLOTS)


def fresh_captions(meta: dict, exclude: Iterable[str], n: int, seed: int) -> list[str]:
    """``n`` distinct captions of the training distribution described by ``meta`` (a set's meta.json: its
    held-out combinations and captions per image) that are not in ``exclude`` (the captions trained on): new
    scenes of seen colour-shape combinations, each with the set's phrasings.

    Raises:
        ValueError: the grammar cannot give ``n`` such captions.
    """
    held = {tuple(c) for c in meta["heldout_combos"]}
    per_image = int(meta["params"]["captions_per_image"])
    seen, out = set(exclude), []
    combos = len(COLORS) * len(SHAPES) - len(held)
    if n > combos * (combos - 1) * len(SIZES) ** 2 * len(RELATIONS) * per_image:  # more than the grammar holds
        raise ValueError(f"fresh_captions: {n} captions asked for, more than the grammar can phrase; ask for fewer")
    rng = np.random.default_rng([seed, 104729])
    for _ in range(50 * n + 1000):
        scene = _sample_scene(rng, lambda a, b: a not in held and b not in held)
        for caption in scene.phrasings()[:per_image]:
            if caption not in seen:
                seen.add(caption)
                out.append(caption)
        if len(out) >= n:
            return out[:n]
    raise ValueError(f"fresh_captions: only {len(out)} of the {n} fresh captions asked for exist outside the "
                     "training captions; ask for fewer")


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


def generate_from_config(out_dir: str | Path, section, progress: bool = True) -> dict:
    """:func:`generate` with the options of a ``data.synthetic`` config section (``kclip.config.SyntheticConfig``)."""
    return generate(out_dir, section.n_train_images, section.n_val_images, section.captions_per_image,
                    section.image_size, section.heldout_combos, section.seed, progress=progress,
                    heldout_seed=section.heldout_seed)
