"""Compositional hard negatives: the negatives' strings, and known accuracies for oracle / constant / random."""
import random

import pytest

from kclip.eval.compositional import (GROUPS, NEGATIVE_TYPES, BigramLM, accuracy_from_scores, build_items,
                                      compositional_accuracy, make_negatives, scene_caption, synthetic_items,
                                      text_only_baseline)
from kclip.eval.synthetic_split import read_split
from kclip.synthetic import Scene
from test_eval_fakes import Constant, HashRandom, SceneOracle, small_synthetic

VOCAB = {"colors": ["red", "green", "blue", "yellow", "purple"], "shapes": ["circle", "square", "triangle", "cross"],
         "sizes": ["small", "large"], "relations": ["to the left of", "to the right of", "above", "below"]}
SCENE = dict(size_a="small", color_a="red", shape_a="circle", relation="to the left of", size_b="large",
             color_b="blue", shape_b="square")


def _diff(a: str, b: str):
    """Word positions where two equally long captions differ."""
    wa, wb = a.split(), b.split()
    assert len(wa) == len(wb), (a, b)
    return [(x, y) for x, y in zip(wa, wb) if x != y]


def test_negative_strings():
    true = scene_caption(SCENE)
    assert true == "a small red circle to the left of a large blue square"
    assert true == Scene(**SCENE).phrasings()[0]  # the generator's canonical phrasing
    for seed in range(20):
        neg = make_negatives(SCENE, VOCAB, random.Random(seed))
        assert set(neg) == set(NEGATIVE_TYPES)
        assert neg["attribute_swap"] == "a small blue circle to the left of a large red square"
        assert neg["relation_opposite"] == "a small red circle to the right of a large blue square"
        assert neg["relation_other"] in ("a small red circle above a large blue square",
                                         "a small red circle below a large blue square")
        (old, new), = _diff(true, neg["replace_color"])
        assert old in ("red", "blue") and new in VOCAB["colors"] and new != old
        (old, new), = _diff(true, neg["replace_shape"])
        assert old in ("circle", "square") and new in VOCAB["shapes"] and new != old
        (old, new), = _diff(true, neg["replace_size"])
        assert {old, new} == {"small", "large"}


def test_same_colour_has_no_swap_and_items_are_deterministic():
    same = {**SCENE, "color_b": "red"}
    assert make_negatives(same, VOCAB, random.Random(0))["attribute_swap"] is None
    scenes = [SCENE, same] * 10
    items = build_items(scenes, VOCAB, seed=0)
    assert items == build_items(scenes, VOCAB, seed=0)
    assert items != build_items(scenes, VOCAB, seed=1)
    assert all(it["true"] == scene_caption(sc) for it, sc in zip(items, scenes))


def test_accuracy_from_scores_counts_ties_as_failures():
    r = accuracy_from_scores([1.0, 1.0, 1.0], {"attribute_swap": [0.0, 1.0, None], "replace_color": [2.0, 0.5, 0.5],
                                              "replace_shape": [0.0, 0.0, 0.0], "replace_size": [0.0, 0.0, 0.0],
                                              "relation_opposite": [0.0, 0.0, 0.0], "relation_other": [1.0, 1.0, 1.0]})
    assert r["attribute_swap"] == 50.0 and r["n_attribute_swap"] == 2
    assert r["replace_color"] == pytest.approx(200 / 3)
    assert r["attribute_replace"] == pytest.approx(100 * 8 / 9)
    assert r["relation_replace"] == 50.0
    assert r["mean"] == pytest.approx((50 + 100 * 8 / 9 + 50) / 3)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return small_synthetic(tmp_path_factory.mktemp("syn"), n_train=40, n_val=120)


def test_oracle_constant_random(synth):
    images, items = synthetic_items(synth)
    assert len(images) == len(items) == 120
    oracle = compositional_accuracy(SceneOracle(read_split(synth, "val")), images, items, batch_size=50)
    for key in (*NEGATIVE_TYPES, *GROUPS, "mean"):
        assert oracle[key] == 100.0, key
    const = compositional_accuracy(Constant(), images, items)
    assert const["mean"] == 0.0
    rnd = compositional_accuracy(HashRandom(), images, items)
    assert 35.0 <= rnd["mean"] <= 65.0, rnd  # chance 50


def test_text_only_baseline(synth):
    train = read_split(synth, "train")
    _, items = synthetic_items(synth)
    lm = BigramLM(train.captions)
    # order matters to the bigram model: a scrambled caption is less likely
    cap = train.captions[0]
    assert lm.log_prob(cap) > lm.log_prob(" ".join(reversed(cap.split())))
    base = text_only_baseline(train.captions, items)
    assert set(GROUPS) <= set(base) and 0.0 <= base["mean"] <= 100.0
    # the held-out combos never occur in training captions, so the blind model cannot be reliably right
    assert base["mean"] < 75.0, base
