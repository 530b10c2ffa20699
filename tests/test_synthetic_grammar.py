"""The synthetic grammar read back: captions parsed into slots, slot accuracy, fresh captions of seen combos."""
import itertools

import numpy as np
import pytest

from kclip.eval.text_em import slot_accuracy, tokenize
from kclip.synthetic import (COLORS, RELATIONS, SHAPES, SIZES, Scene, fresh_captions, heldout_combos, parse_caption,
                             slot_hits, swapped)


def _scenes(n, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield Scene(str(rng.choice(list(SIZES))), str(rng.choice(list(COLORS))), str(rng.choice(SHAPES)),
                    str(rng.choice(RELATIONS)), str(rng.choice(list(SIZES))), str(rng.choice(list(COLORS))),
                    str(rng.choice(SHAPES)))


def test_every_phrasing_parses_back_to_its_scene():
    for scene in _scenes(200):
        for phrasing in scene.phrasings():
            parsed = parse_caption(phrasing)
            assert parsed in (scene, swapped(scene)), phrasing
            assert slot_hits(tokenize(phrasing), tokenize(scene.phrasings()[0])) == (7, 7)


@pytest.mark.parametrize("words", ["", "a small red", "a small red circle above", "a huge red circle above a small "
                                   "blue square", "there is a small red circle and a small blue square",
                                   "a picture of a small red circle that is near a large blue cross"])
def test_what_follows_no_phrasing_is_refused_and_scores_no_slot(words):
    with pytest.raises(ValueError, match="synthetic grammar"):
        parse_caption(words)
    assert slot_hits(tokenize(words), tokenize("a small red circle above a large blue square")) == (0, 7)


def test_slot_hits_count_each_wrong_slot_once_whatever_the_phrasing():
    ref = Scene("small", "red", "circle", "to the right of", "large", "blue", "square")
    wrong_relation = Scene("small", "red", "circle", "above", "large", "blue", "square")
    wrong_colour_and_size = Scene("large", "green", "circle", "to the right of", "large", "blue", "square")
    for ref_text, pred_text in itertools.product(ref.phrasings(), wrong_relation.phrasings()):
        assert slot_hits(tokenize(pred_text), tokenize(ref_text)) == (6, 7)
    for ref_text, pred_text in itertools.product(ref.phrasings(), wrong_colour_and_size.phrasings()):
        assert slot_hits(tokenize(pred_text), tokenize(ref_text)) == (5, 7)
    with pytest.raises(ValueError, match="synthetic grammar"):
        slot_hits(tokenize(ref.phrasings()[0]), tokenize("a cat on a mat"))


def test_slot_accuracy_is_the_share_of_slots():
    ref = [tokenize(s.phrasings()[0]) for s in _scenes(4, seed=1)]
    preds = [ref[0], ref[1], [], ref[3]]
    assert slot_accuracy(preds, ref, slot_hits) == pytest.approx(100 * 21 / 28)


def test_fresh_captions_are_new_distinct_and_of_seen_combinations():
    held = heldout_combos(4, 3)
    meta = {"heldout_combos": [list(c) for c in held], "params": {"captions_per_image": 2}}
    trained = fresh_captions(meta, [], 300, seed=0)
    fresh = fresh_captions(meta, trained, 200, seed=1)
    assert len(fresh) == len(set(fresh)) == 200 and not set(fresh) & set(trained)
    for caption in fresh:
        s = parse_caption(caption)
        assert not {(s.color_a, s.shape_a), (s.color_b, s.shape_b)} & set(held)
    assert fresh == fresh_captions(meta, trained, 200, seed=1)  # seeded
    with pytest.raises(ValueError, match="ask for fewer"):
        fresh_captions(meta, [], 10 ** 6, seed=0)
