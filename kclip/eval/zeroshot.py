"""Attribute zero-shot classification (the paper's Table 2, §4.3): CUB-200-2011, AWA2 and the synthetic set.

Each class gets one or more text prompts built from its attributes. Two scoring protocols:

- ``protocol="paper"`` (default, §4.3): the image is scored (cosine) against *every prompt of every
  class*; a class's score is the score of its best prompt, so the top-1 prediction is the class of the
  highest-scoring prompt, and top-k ranks the classes by their best prompt.
- ``protocol="ensemble"``: a class's text embedding is the normalised mean of its normalised prompt
  embeddings (a CLIP-style prompt ensemble); the image is scored against those. Not the paper's
  protocol; kept to compare with, and the result says which one ran.

Top-k accuracy counts an image correct if one of its true classes is among the k best classes; ties
count against the image (a class scoring *equal* to the true one ranks above it), so a constant encoder
scores 0 and results never depend on sort order.

Prompts:

- **CUB-200-2011**: an attribute name ``has_bill_shape::curved_(up_or_down)`` is a *description*
  (``has_bill_shape``, the part before ``::``; 28 in the release) and an *expression*
  (``curved (up or down)``). For each class and each description the prompt uses the ONE expression
  with the highest class probability: the released
  ``attributes/class_attribute_labels_continuous.txt`` (percent of the class's images showing the
  attribute) when present, otherwise the mean ``is_present`` over the class's images in
  ``attributes/image_attribute_labels.txt`` (the same quantity, recomputed). Ties go to the lower
  attribute id. A description where the class's probability is 0 for every expression gets no prompt
  (no annotator ever saw it on that class, so any expression would be made up); a class with no
  prompt at all is an error. Template (:data:`CUB_TEMPLATES`, the paper's §4.3 by default):
  ``"a photo of a <class> that <attribute> <expression>."`` where ``<attribute>`` is the description with
  underscores read as spaces (``has bill shape``), and the class name ``001.Black_footed_Albatross`` reads
  ``Black footed Albatross``; ``template="type-of-bird"`` keeps kclip's earlier
  ``"a photo of a <class>, a type of bird, which has <part> <expression>."``. About 28 prompts per class;
  descriptions in attribute-id order. Images: the official test split by default
  (``train_test_split.txt`` = 0), ``split="all"`` for all.
- **AWA2**: one prompt per class (so both protocols agree), :data:`AWA2_TEMPLATES` (the paper's by default)
  ``"a photo of a <class>, with attribute <a1>, <a2>, ..."`` (``template="which-is"``: kclip's earlier
  ``"a photo of a <class>, which is <a1>, <a2>, ...."``) listing the class's positive predicates
  (``predicate-matrix-binary.txt``) in ``predicates.txt`` order, ``+`` in names read as a space
  (``grizzly+bear`` -> ``grizzly bear``). ``max_attributes`` caps the list (CLIP's tokenizer truncates
  at 77 tokens anyway, which keeps roughly the first 25-35 predicates). All 50 classes by default;
  ``classes="test"`` uses the 10 ``testclasses.txt`` classes of the proposed zero-shot split.
- **Synthetic** (kclip.synthetic): the 20 classes are the (colour, shape) combos (5 colours x 4 shapes,
  meta.json order). The prompts use the caption grammar's own words: every caption phrasing names an
  object as ``a <size> <colour> <shape>`` (e.g. ``a small red circle to the left of a ...``), so a
  class's prompts are :data:`SYNTHETIC_PROMPT` ``"a <size> <colour> <shape>"``, one per size. Size is
  the object's one attribute description besides the class-defining colour and shape; it is not a
  property of the class (every combo is drawn in both sizes with equal probability), so rather than
  pick one expression by a coin flip the class keeps one prompt per size expression and, as on CUB,
  the best prompt decides (``protocol="paper"``). Each image has two objects, so two true classes; it
  is correct at top-k if either combo is in the top k (chance top-1 = 10%, top-5 ~ 44.7%).
  ``heldout_top1/5`` is the same accuracy over the images containing a held-out combo (meta.json
  ``heldout_combos``), with only the *held-out* combos counted as true and the image's other combo
  left out of the ranking (neither hit nor competitor): does the model recognise combinations it
  never saw in training? (chance top-1 ~ 5.3% = 1/19.)

Optional ``max_per_class`` samples that many images per class with a seeded RNG (deterministic).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from kclip.errors import MissingFileError

from .encoders import encode_images, encode_texts

PROTOCOLS = ("paper", "ensemble")
# The prompt templates by name. "paper" (the default) is the paper's §4.3 word for word; the others are the
# phrasings kclip used before, kept to compare with. CUB: {attr} is the description with its "has", {part} the
# same without it.
CUB_TEMPLATES = {"paper": "a photo of a {cls} that {attr} {expr}.",
                 "type-of-bird": "a photo of a {cls}, a type of bird, which has {part} {expr}."}
AWA2_TEMPLATES = {"paper": "a photo of a {cls}, with attribute {attrs}",
                  "which-is": "a photo of a {cls}, which is {attrs}."}
CUB_PROMPT, AWA2_PROMPT = CUB_TEMPLATES["paper"], AWA2_TEMPLATES["paper"]
SYNTHETIC_PROMPT = "a {size} {colour} {shape}"


@dataclass
class ZeroShotSet:
    """A zero-shot classification set.

    Attributes:
        name: "cub", "awa2", "synthetic", ...
        class_names: (C,) human-readable class names.
        class_prompts: (C,) per class its list of prompts (protocol "paper": the best one scores the
            class; "ensemble": their embeddings are averaged).
        images: (N,) image paths (or PIL images).
        labels: (N,) per image the tuple of its true class ids.
        heldout_classes: class ids for the held-out report (empty = none).
        template: the prompt template, for the record (copied into the results).
    """
    name: str
    class_names: list[str]
    class_prompts: list[list[str]]
    images: list
    labels: list[tuple[int, ...]]
    heldout_classes: list[int] = field(default_factory=list)
    template: str = ""

    def __post_init__(self):
        if len(self.class_names) != len(self.class_prompts):
            raise ValueError(f"{self.name}: {len(self.class_names)} classes but {len(self.class_prompts)} prompt lists")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{self.name}: {len(self.images)} images but {len(self.labels)} label tuples")
        if any(not p for p in self.class_prompts):
            raise ValueError(f"{self.name}: every class needs at least one prompt")

    def prompt_counts(self) -> dict:
        """{"n_prompts", "n_prompts_per_class_min/_mean/_max"} (``n_`` keys stay out of the metric table)."""
        per = [len(p) for p in self.class_prompts]
        return {"n_prompts": sum(per), "n_prompts_per_class_min": min(per),
                "n_prompts_per_class_mean": sum(per) / len(per), "n_prompts_per_class_max": max(per)}


def topk_ranks(scores: torch.Tensor, labels: Sequence[Sequence[int]],
               ignore: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """Per row, the wrong classes scoring at or above its best true class (0 = a top-1 hit; ties count
    against); -1 for a row with no label. ``ignore``: see :func:`topk_accuracy`.

    Shapes: scores (N, C) -> (N,) int64.
    """
    n, c = scores.shape
    if len(labels) != n:
        raise ValueError(f"{n} score rows but {len(labels)} label entries")
    true = torch.zeros(n, c, dtype=torch.bool)  # (N, C)
    for i, ls in enumerate(labels):
        for l in ls:
            if not 0 <= int(l) < c:
                raise ValueError(f"label {l} of row {i} is outside 0..{c - 1}")
            true[i, int(l)] = True
    skip = torch.zeros(n, c, dtype=torch.bool)  # (N, C)
    for i, ls in enumerate(ignore or []):
        for l in ls:
            skip[i, int(l)] = True
    skip &= ~true
    scores = scores.float()
    best_true = scores.masked_fill(~true, float("-inf")).amax(dim=1, keepdim=True)  # (N, 1)
    rank = ((scores >= best_true) & ~true & ~skip).sum(dim=1)  # (N,) wrong classes at or above the best true one
    return rank.masked_fill(~true.any(dim=1), -1)


def topk_accuracy(scores: torch.Tensor, labels: Sequence[Sequence[int]], ks: Sequence[int] = (1, 5),
                  ignore: Sequence[Sequence[int]] | None = None) -> dict:
    """Top-k accuracy (percent) where each row may have several true classes (any one suffices).

    Args:
        ignore: per row, classes that are neither true nor competitors (they are left out of the
            ranking), e.g. an image's *other* true classes when only its held-out ones count.

    Shapes:
        scores (N, C); labels, ignore: N sequences of class ids (a row with no label is skipped).

    Returns:
        {"top1": ..., "top5": ..., "n_images": number of rows with a label}.
    """
    rank = topk_ranks(scores, labels, ignore)
    rank = rank[rank >= 0]  # (n,) the rows with a label
    out = {f"top{k}": (100.0 * (rank < k).float().mean().item() if rank.numel() else float("nan")) for k in ks}
    out["n_images"] = int(rank.numel())
    return out


def _prompt_embeddings(encoder, class_prompts: Sequence[Sequence[str]], batch_size: int):
    """(P, D) normalised embeddings of every prompt and (P,) the class that owns each."""
    flat = [p for ps in class_prompts for p in ps]
    emb = encode_texts(encoder, flat, batch_size)  # (P, D)
    owner = torch.tensor([c for c, ps in enumerate(class_prompts) for _ in ps])  # (P,)
    return emb, owner


def class_embeddings(encoder, class_prompts: Sequence[Sequence[str]], batch_size: int = 256) -> torch.Tensor:
    """(C, D) normalised mean of each class's normalised prompt embeddings (the "ensemble" protocol)."""
    emb, owner = _prompt_embeddings(encoder, class_prompts, batch_size)  # (P, D), (P,)
    summed = torch.zeros(len(class_prompts), emb.shape[1]).index_add_(0, owner, emb)  # (C, D)
    return F.normalize(summed, dim=-1)


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol is {protocol!r}; use one of {PROTOCOLS} ('paper' = class of the best prompt, "
                         "'ensemble' = mean of the class's prompt embeddings)")


def class_scores(encoder, dataset: ZeroShotSet, batch_size: int = 256, image_emb: torch.Tensor | None = None,
                 protocol: str = "paper") -> torch.Tensor:
    """Per image and class, the class's score under ``protocol`` (see the module docstring).

    Args:
        image_emb: (N, D) precomputed normalised image embeddings of ``dataset.images`` (skips encoding).
        protocol: "paper" (score of the class's best prompt) or "ensemble" (cosine to the class's mean
            prompt embedding).

    Shapes:
        returns (N, C) float32; ``argmax(dim=1)`` is the predicted class (for "paper": the class of the
        highest-scoring prompt).
    """
    _check_protocol(protocol)
    if image_emb is None:
        image_emb = encode_images(encoder, dataset.images, batch_size)  # (N, D)
    if image_emb.shape[0] != len(dataset.images):
        raise ValueError(f"image_emb has {image_emb.shape[0]} rows but {dataset.name} has {len(dataset.images)} images")
    image_emb = image_emb.float()
    c = len(dataset.class_prompts)
    if protocol == "ensemble":
        return image_emb @ class_embeddings(encoder, dataset.class_prompts, batch_size).T  # (N, C)
    emb, owner = _prompt_embeddings(encoder, dataset.class_prompts, batch_size)  # (P, D), (P,)
    n, p = image_emb.shape[0], emb.shape[0]
    rows = max(1, (1 << 24) // p)  # bound the (rows, P) prompt-score block to ~64 MB (CUB: ~5.6k prompts)
    out = torch.empty(n, c)  # (N, C)
    for s in range(0, n, rows):
        ps = image_emb[s:s + rows] @ emb.T  # (n', P)
        init = torch.full((ps.shape[0], c), float("-inf"))  # (n', C)
        out[s:s + rows] = init.scatter_reduce_(1, owner.expand(ps.shape[0], -1), ps, reduce="amax")
    return out


def zeroshot_accuracy(encoder, dataset: ZeroShotSet, batch_size: int = 256, ks: Sequence[int] = (1, 5),
                      image_emb: torch.Tensor | None = None, protocol: str = "paper") -> dict:
    """Top-k zero-shot accuracy of ``encoder`` on ``dataset`` (percent).

    Args:
        image_emb: (N, D) precomputed normalised image embeddings of ``dataset.images`` (skips encoding).
        protocol: "paper" (default; the class of the best prompt) or "ensemble" (mean prompt embedding).

    Returns:
        {"top1", "top5", "n_images", "n_classes", "protocol", "n_prompts", "n_prompts_per_class_min",
        "n_prompts_per_class_mean", "n_prompts_per_class_max"} (+ "prompt_template" when the set records
        one) plus, when the set has held-out classes, {"heldout_top1", "heldout_top5", "heldout_n_images"}.
    """
    return zeroshot_metrics(class_scores(encoder, dataset, batch_size, image_emb, protocol), dataset, ks, protocol)


def heldout_labels(dataset: ZeroShotSet) -> list[tuple]:
    """Per image, its held-out classes only (the held-out metrics' labels; the image's other classes are
    passed as ``ignore``: a model that sees both objects equally well must not be penalised for them)."""
    held = set(dataset.heldout_classes)
    return [tuple(l for l in ls if l in held) for ls in dataset.labels]


def zeroshot_metrics(scores: torch.Tensor, dataset: ZeroShotSet, ks: Sequence[int] = (1, 5),
                     protocol: str = "paper") -> dict:
    """The result of :func:`zeroshot_accuracy` from the class scores of :func:`class_scores` (N, C)."""
    out = topk_accuracy(scores, dataset.labels, ks)
    out["n_classes"] = len(dataset.class_names)
    out["protocol"] = protocol
    out.update(dataset.prompt_counts())
    if dataset.template:
        out["prompt_template"] = dataset.template
    if dataset.heldout_classes:
        sub = topk_accuracy(scores, heldout_labels(dataset), ks, ignore=dataset.labels)
        out.update({f"heldout_{k}": v for k, v in sub.items() if k != "n_images"})
        out["heldout_n_images"] = sub["n_images"]
    return out


# ----------------------------------------------------------------------------- synthetic

def synthetic_zeroshot_set(data_dir: str | Path, split: str = "val") -> ZeroShotSet:
    """The synthetic set as 20-way (colour, shape) classification; see the module docstring."""
    from .synthetic_split import read_split

    return synthetic_zeroshot_from_split(read_split(data_dir, split))


def synthetic_zeroshot_from_split(data) -> ZeroShotSet:
    """:func:`synthetic_zeroshot_set` from an already-read :class:`~kclip.eval.synthetic_split.SyntheticSplit`.

    Prompts: per (colour, shape) class one ``"a <size> <colour> <shape>"`` per size in meta.json order.
    """
    missing = [k for k in ("colors", "shapes", "sizes") if not data.meta.get(k)]
    if missing:
        raise ValueError(f"the synthetic meta.json lacks {missing}; regenerate the set with kclip.synthetic.generate")
    colours, shapes, sizes = data.meta["colors"], data.meta["shapes"], data.meta["sizes"]
    combos = [(c, s) for c in colours for s in shapes]
    index = {combo: i for i, combo in enumerate(combos)}
    labels = []
    for sc in data.scenes:
        ids = {index[(sc["color_a"], sc["shape_a"])], index[(sc["color_b"], sc["shape_b"])]}
        labels.append(tuple(sorted(ids)))
    held = [index[tuple(c)] for c in data.meta.get("heldout_combos", [])]
    return ZeroShotSet(
        name="synthetic",
        class_names=[f"{c} {s}" for c, s in combos],
        class_prompts=[[SYNTHETIC_PROMPT.format(size=z, colour=c, shape=s) for z in sizes] for c, s in combos],
        images=list(data.image_paths),
        labels=labels,
        heldout_classes=held,
        template=SYNTHETIC_PROMPT,
    )


# ----------------------------------------------------------------------------- CUB-200-2011

def _find_root(root: str | Path, folder: str, marker: str) -> Path:
    root = Path(root)
    for cand in (root, root / folder):
        if (cand / marker).is_file():
            return cand
    raise MissingFileError(f"{root} is not a {folder} folder: neither {root / marker} nor "
                            f"{root / folder / marker} exists. Point the root at the extracted release.")


def _read_id_table(path: Path) -> dict[int, str]:
    """'<id> <value...>' lines -> {id: value} (the value may contain spaces)."""
    out = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split(maxsplit=1)
            if len(parts) != 2:
                raise ValueError(f"{path}:{lineno}: expected '<id> <value>', got {line!r}")
            out[int(parts[0])] = parts[1].strip()
    return out


def cub_class_name(raw: str) -> str:
    """'001.Black_footed_Albatross' -> 'Black footed Albatross'."""
    return re.sub(r"^\d+\.", "", raw).replace("_", " ").strip()


def cub_attribute_phrase(raw: str) -> tuple[str, str]:
    """'has_bill_shape::curved_(up_or_down)' -> ('has bill shape', 'curved (up or down)')."""
    if "::" not in raw:
        raise ValueError(f"CUB attribute {raw!r} is not of the form 'has_part::value'")
    attr, expr = raw.split("::", 1)
    return attr.replace("_", " ").strip(), expr.replace("_", " ").strip()


def _template(templates: dict, name: str) -> str:
    if name not in templates:
        raise ValueError(f"prompt template {name!r} is not one of {sorted(templates)} ('paper' is the paper's §4.3)")
    return templates[name]


def cub_prompt(class_name: str, attribute: str, template: str = "paper") -> str:
    """The CUB prompt (:data:`CUB_TEMPLATES` by name) for one class and one attribute name ('has_bill_shape::dagger'):
    ``paper`` gives 'a photo of a <class> that has bill shape dagger.'."""
    attr, expr = cub_attribute_phrase(attribute)
    part = attr[len("has "):] if attr.startswith("has ") else attr
    return _template(CUB_TEMPLATES, template).format(cls=class_name, attr=attr, part=part, expr=expr)


def cub_paper_attributes(freq: torch.Tensor, attribute_names: Sequence[str]) -> list[list[int]]:
    """Per class, the paper's attribute choice: for each description the most probable expression.

    Args:
        freq: per class and attribute the class probability (any scale: percent or 0..1).
        attribute_names: (A,) names ``<description>::<expression>`` in column order.

    Shapes:
        freq (C, A).

    Returns:
        per class the chosen attribute columns, one per description (descriptions in order of their
        first column); ties go to the lower column; a description whose probabilities are all 0 for
        the class is skipped.
    """
    if freq.dim() != 2 or freq.shape[1] != len(attribute_names):
        raise ValueError(f"freq is {tuple(freq.shape)}; expected (classes, {len(attribute_names)}) attributes")
    groups: dict[str, list[int]] = {}
    for a, name in enumerate(attribute_names):
        if "::" not in name:
            raise ValueError(f"CUB attribute {a + 1} {name!r} is not of the form 'has_part::value'")
        groups.setdefault(name.split("::", 1)[0], []).append(a)
    chosen = []
    for ci in range(freq.shape[0]):
        row = []
        for cols in groups.values():
            best = max(cols, key=lambda a: (float(freq[ci, a]), -a))  # highest probability, then lowest column
            if float(freq[ci, best]) > 0:
                row.append(best)
        chosen.append(row)
    return chosen


def _cub_attribute_names(base: Path) -> dict[int, str]:
    for cand in (base / "attributes.txt", base / "attributes" / "attributes.txt", base.parent / "attributes.txt"):
        if cand.is_file():
            return _read_id_table(cand)
    raise MissingFileError(f"CUB attributes.txt not found in {base}, {base / 'attributes'} or {base.parent} "
                            "(the release tarball puts it next to CUB_200_2011/)")


def _cub_class_attribute_freq(base: Path, image_class: dict[int, int], n_classes: int, n_attrs: int) -> torch.Tensor:
    """(C, A) attribute frequency per class (0..1): the released continuous table, else from image labels."""
    cont = base / "attributes" / "class_attribute_labels_continuous.txt"
    if cont.is_file():
        rows = [list(map(float, l.split())) for l in cont.read_text().splitlines() if l.strip()]
        if len({len(r) for r in rows}) > 1:
            raise ValueError(f"{cont}: rows have different lengths; expected {n_attrs} numbers per class row")
        freq = torch.tensor(rows, dtype=torch.float64) / 100.0  # (C, A)
        if freq.shape != (n_classes, n_attrs):
            raise ValueError(f"{cont} is {tuple(freq.shape)}; expected ({n_classes}, {n_attrs}) classes x attributes")
        return freq
    path = base / "attributes" / "image_attribute_labels.txt"
    if not path.is_file():
        raise MissingFileError(f"need {cont} or {path} to rank each class's attributes")
    present = torch.zeros(n_classes, n_attrs, dtype=torch.float64)
    seen = torch.zeros(n_classes, n_attrs, dtype=torch.float64)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()  # a few released lines carry extra fields: only the first three matter
            if not parts:
                continue
            if len(parts) < 3:
                raise ValueError(f"{path}:{lineno}: expected '<image_id> <attribute_id> <is_present> ...'")
            img, att, is_present = int(parts[0]), int(parts[1]), int(parts[2])
            c = image_class.get(img)
            if c is None or not 1 <= att <= n_attrs:
                continue
            present[c, att - 1] += is_present
            seen[c, att - 1] += 1
    return present / seen.clamp_min(1)


def load_cub(root: str | Path, split: str = "test", max_per_class: int | None = None, seed: int = 0,
             template: str = "paper") -> ZeroShotSet:
    """CUB-200-2011 from its released layout (``CUB_200_2011/`` or its parent as ``root``), paper prompts.

    Args:
        split: "test" (official test images), "train" or "all".
        max_per_class: at most this many images per class (seeded sample).
        template: a :data:`CUB_TEMPLATES` name ("paper", the default, or "type-of-bird").

    Returns:
        a :class:`ZeroShotSet` with per class one prompt per attribute description (see the module
        docstring; about 28 per class on the release).
    """
    if split not in ("test", "train", "all"):
        raise ValueError(f"split is {split!r}; use 'test', 'train' or 'all'")
    base = _find_root(root, "CUB_200_2011", "images.txt")
    images = _read_id_table(base / "images.txt")
    classes = _read_id_table(base / "classes.txt")
    class_ids = sorted(classes)
    cls_index = {cid: i for i, cid in enumerate(class_ids)}
    image_class = {img: cls_index[int(c)] for img, c in _read_id_table(base / "image_class_labels.txt").items()}
    is_train = {img: v == "1" for img, v in _read_id_table(base / "train_test_split.txt").items()}
    attr_names = _cub_attribute_names(base)
    attr_ids = sorted(attr_names)
    freq = _cub_class_attribute_freq(base, image_class, len(class_ids), len(attr_ids))  # (C, A)
    names = [cub_class_name(classes[c]) for c in class_ids]
    chosen = cub_paper_attributes(freq, [attr_names[a] for a in attr_ids])
    prompts = []
    for ci, cols in enumerate(chosen):
        if not cols:
            raise ValueError(f"CUB class {class_ids[ci]} ({classes[class_ids[ci]]}) has probability 0 for every "
                             "attribute: no prompt can describe it; check its row of the attribute table")
        prompts.append([cub_prompt(names[ci], attr_names[attr_ids[a]], template) for a in cols])
    per_class: dict[int, list[int]] = {}
    for img in sorted(images):
        if img not in image_class:
            raise ValueError(f"{base / 'image_class_labels.txt'} has no class for image {img}")
        if split != "all" and is_train.get(img, False) != (split == "train"):
            continue
        per_class.setdefault(image_class[img], []).append(img)
    paths, labels = [], []
    rng = random.Random(seed)
    for ci in sorted(per_class):
        ids = per_class[ci]
        if max_per_class is not None and len(ids) > max_per_class:
            ids = sorted(rng.sample(ids, max_per_class))
        for img in ids:
            paths.append(base / "images" / images[img])
            labels.append((ci,))
    return ZeroShotSet("cub", names, prompts, paths, labels, template=CUB_TEMPLATES[template])


# ----------------------------------------------------------------------------- AWA2

def awa2_name(raw: str) -> str:
    """'grizzly+bear' -> 'grizzly bear'."""
    return raw.replace("+", " ").strip()


def awa2_prompt(class_name: str, attributes: Sequence[str], template: str = "paper") -> str:
    """The AWA2 prompt (:data:`AWA2_TEMPLATES` by name): the class name with its attributes as a comma list."""
    if not attributes:
        raise ValueError(f"AWA2 class {class_name!r} has no attribute to list")
    return _template(AWA2_TEMPLATES, template).format(cls=class_name, attrs=", ".join(attributes))


_IMAGE_EXT = (".jpg", ".jpeg", ".png")


def load_awa2(root: str | Path, classes: str = "all", max_attributes: int | None = None,
              max_per_class: int | None = None, seed: int = 0, template: str = "paper") -> ZeroShotSet:
    """AWA2 from its released layout (``Animals_with_Attributes2/`` or its parent as ``root``).

    Args:
        classes: "all" (50 classes) or "test" (the ``testclasses.txt`` classes only).
        max_attributes: cap on the positive predicates listed per prompt (default: all of them).
        max_per_class: at most this many images per class (seeded sample).
        template: a :data:`AWA2_TEMPLATES` name ("paper", the default, or "which-is").
    """
    base = _find_root(root, "Animals_with_Attributes2", "classes.txt")
    raw_classes = _read_id_table(base / "classes.txt")
    predicates = _read_id_table(base / "predicates.txt")
    class_ids, pred_ids = sorted(raw_classes), sorted(predicates)
    matrix_path = base / "predicate-matrix-binary.txt"
    matrix = [l.split() for l in matrix_path.read_text().splitlines() if l.strip()]
    if len(matrix) != len(class_ids) or any(len(r) != len(pred_ids) for r in matrix):
        raise ValueError(f"{matrix_path} must be {len(class_ids)} rows x {len(pred_ids)} columns "
                         "(classes.txt x predicates.txt)")
    for r, row in enumerate(matrix, 1):
        if any(v not in ("0", "1") for v in row):
            raise ValueError(f"{matrix_path}:{r}: expected only 0/1 entries, got {row}")
    if classes == "all":
        keep = list(range(len(class_ids)))
    elif classes == "test":
        path = base / "testclasses.txt"
        if not path.is_file():
            raise MissingFileError(f"{path} is missing; use classes='all'")
        wanted = [l.strip() for l in path.read_text().splitlines() if l.strip()]
        lookup = {raw_classes[c]: i for i, c in enumerate(class_ids)}
        unknown = [w for w in wanted if w not in lookup]
        if unknown:
            raise ValueError(f"{path} names classes not in classes.txt: {unknown}")
        keep = sorted(lookup[w] for w in wanted)
    else:
        raise ValueError(f"classes is {classes!r}; use 'all' or 'test'")
    names, prompts, paths, labels, empty = [], [], [], [], []
    rng = random.Random(seed)
    for new_id, ci in enumerate(keep):
        raw = raw_classes[class_ids[ci]]
        name = awa2_name(raw)
        attrs = [awa2_name(predicates[p]) for j, p in enumerate(pred_ids) if matrix[ci][j] == "1"]
        if not attrs:
            raise ValueError(f"{matrix_path}:{ci + 1}: class {raw!r} has no positive predicate to describe it")
        if max_attributes is not None:
            attrs = attrs[:max_attributes]
        names.append(name)
        prompts.append([awa2_prompt(name, attrs, template)])
        folder = base / "JPEGImages" / raw
        files = sorted(p for p in folder.glob("*") if p.suffix.lower() in _IMAGE_EXT) if folder.is_dir() else []
        if not files:
            empty.append(str(folder))
        if max_per_class is not None and len(files) > max_per_class:
            files = sorted(rng.sample(files, max_per_class))
        paths.extend(files)
        labels.extend([(new_id,)] * len(files))
    if empty:
        raise MissingFileError(f"no images (.jpg/.jpeg/.png) in {empty}: the AWA2 extraction is incomplete "
                                "(every chosen class needs JPEGImages/<class>/)")
    return ZeroShotSet("awa2", names, prompts, paths, labels, template=AWA2_TEMPLATES[template])
