"""Attribute zero-shot: CUB / AWA2 fixture folders in the released layouts, and the synthetic protocol."""
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from kclip.eval.zeroshot import (ZeroShotSet, cub_attribute_phrase, cub_class_name, load_awa2, load_cub,
                                 synthetic_zeroshot_set, topk_accuracy, zeroshot_accuracy)
from test_eval_fakes import Constant, HashRandom, SceneOracle, small_synthetic

RGB = {"red": (230, 20, 20), "green": (20, 200, 30), "blue": (20, 30, 230)}


class ColourEncoder:
    """Image -> one-hot of its dominant RGB channel; text -> one-hot of the class keyword it contains.

    ``shift`` moves every text to the next class's slot, so the right class always loses.
    """

    def __init__(self, keywords, shift=0):
        self.name, self.keywords, self.shift = "colour", keywords, shift

    def encode_images(self, images):
        means = torch.stack([torch.tensor(list(im.resize((4, 4)).getdata()), dtype=torch.float).mean(0) for im in images])
        return F.one_hot(means.argmax(dim=1), 3).float()

    def encode_texts(self, texts):
        idx = []
        for t in texts:
            hits = [i for i, k in enumerate(self.keywords) if k in t]
            assert len(hits) == 1, t
            idx.append((hits[0] + self.shift) % 3)
        return F.one_hot(torch.tensor(idx), 3).float()


def _img(path, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), RGB[colour]).save(path)


@pytest.fixture(scope="module")
def cub_root(tmp_path_factory):
    top = tmp_path_factory.mktemp("cub")
    base = top / "CUB_200_2011"
    base.mkdir()
    classes = ["001.Red_bird", "002.Green_bird", "003.Blue_bird"]
    (base / "classes.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(classes)))
    images, labels, split = [], [], []
    for i in range(6):
        c = i // 2
        name = f"{classes[c]}/{classes[c][4:]}_{i:04d}.jpg"
        _img(base / "images" / name, ["red", "green", "blue"][c])
        images.append(f"{i + 1} {name}\n")
        labels.append(f"{i + 1} {c + 1}\n")
        split.append(f"{i + 1} {1 if i % 2 == 0 else 0}\n")
    (base / "images.txt").write_text("".join(images))
    (base / "image_class_labels.txt").write_text("".join(labels))
    (base / "train_test_split.txt").write_text("".join(split))
    # the release keeps attributes.txt next to CUB_200_2011/
    (top / "attributes.txt").write_text("1 has_bill_shape::dagger\n2 has_wing_color::red\n"
                                        "3 has_wing_color::green\n4 has_bill_shape::curved_(up_or_down)\n")
    present = {1: {1, 2}, 2: {2}, 3: {3, 4}, 4: {3}, 5: {4}, 6: {4}}  # image -> present attributes
    lines = []
    for img in range(1, 7):
        for a in range(1, 5):
            extra = " 0 extra" if (img, a) == (3, 2) else ""  # a few released lines carry extra fields
            lines.append(f"{img} {a} {int(a in present[img])} 3 12.5{extra}\n")
    (base / "attributes").mkdir()
    (base / "attributes" / "image_attribute_labels.txt").write_text("".join(lines))
    return top


@pytest.fixture(scope="module")
def awa2_root(tmp_path_factory):
    base = tmp_path_factory.mktemp("awa") / "Animals_with_Attributes2"
    base.mkdir()
    (base / "classes.txt").write_text("1\tred+fox\n2\tgreen+frog\n3\tblue+whale\n")
    (base / "predicates.txt").write_text("1\tred\n2\tgreen\n3\tblue\n4\tfurry\n")
    (base / "predicate-matrix-binary.txt").write_text("1 0 0 1\n0 1 0 0\n0 0 1 0\n")
    (base / "testclasses.txt").write_text("green+frog\nblue+whale\n")
    for name, colour in (("red+fox", "red"), ("green+frog", "green"), ("blue+whale", "blue")):
        for k in range(2):
            _img(base / "JPEGImages" / name / f"{name}_{10001 + k}.jpg", colour)
    return base.parent


def test_cub_names_and_prompts(cub_root):
    assert cub_class_name("001.Black_footed_Albatross") == "Black footed Albatross"
    assert cub_attribute_phrase("has_bill_shape::curved_(up_or_down)") == ("has bill shape", "curved (up or down)")
    ds = load_cub(cub_root, split="test", n_attributes=2)
    assert ds.class_names == ["Red bird", "Green bird", "Blue bird"]
    # class 1: images 1, 2 -> dagger 1/2, red 2/2: red first; ties (class 2: green 2/2, then dagger/red/curved 0
    # or 1/2) -> curved 1/2 beats the zeros; class 3: curved 2/2, then the zeros in attribute-id order
    assert ds.class_prompts[0] == ["a photo of a Red bird that has wing color red.",
                                   "a photo of a Red bird that has bill shape dagger."]
    assert ds.class_prompts[1] == ["a photo of a Green bird that has wing color green.",
                                   "a photo of a Green bird that has bill shape curved (up or down)."]
    assert ds.class_prompts[2] == ["a photo of a Blue bird that has bill shape curved (up or down).",
                                   "a photo of a Blue bird that has bill shape dagger."]
    assert [p.name for p in ds.images] == ["Red_bird_0001.jpg", "Green_bird_0003.jpg", "Blue_bird_0005.jpg"]
    assert ds.labels == [(0,), (1,), (2,)]
    assert len(load_cub(cub_root, split="all").images) == 6
    assert len(load_cub(cub_root, split="all", max_per_class=1, seed=3).images) == 3
    # the CUB_200_2011 folder itself works as the root too
    assert load_cub(cub_root / "CUB_200_2011", n_attributes=1).class_prompts[0] == [
        "a photo of a Red bird that has wing color red."]


def test_cub_accuracy_win_and_lose(cub_root):
    ds = load_cub(cub_root, split="all", n_attributes=2)
    keys = ["Red bird", "Green bird", "Blue bird"]
    win = zeroshot_accuracy(ColourEncoder(keys), ds, batch_size=4, ks=(1, 2, 3))
    assert win["top1"] == 100.0 and win["n_images"] == 6 and win["n_classes"] == 3
    # shifted texts: the previous class scores 1, the true class ties the third at 0 -> rank 2 (ties count against)
    lose = zeroshot_accuracy(ColourEncoder(keys, shift=1), ds, batch_size=4, ks=(1, 2, 3))
    assert lose["top1"] == 0.0 and lose["top2"] == 0.0 and lose["top3"] == 100.0


def test_cub_continuous_table_is_preferred(cub_root, tmp_path):
    import shutil

    root = tmp_path / "cub2"
    shutil.copytree(cub_root, root)
    # class 1 now prefers attribute 4 then 3
    (root / "CUB_200_2011" / "attributes" / "class_attribute_labels_continuous.txt").write_text(
        "0 10 20 90\n0 100 0 0\n50 0 0 0\n")
    ds = load_cub(root, n_attributes=2)
    assert ds.class_prompts[0] == ["a photo of a Red bird that has bill shape curved (up or down).",
                                   "a photo of a Red bird that has wing color green."]
    with pytest.raises(FileNotFoundError, match="not a CUB_200_2011 folder"):
        load_cub(tmp_path / "nowhere")


def test_awa2_loader_prompts_and_accuracy(awa2_root):
    ds = load_awa2(awa2_root)
    assert ds.class_names == ["red fox", "green frog", "blue whale"]
    assert ds.class_prompts[0] == ["a photo of a red fox, with attribute red, furry"]
    assert ds.class_prompts[2] == ["a photo of a blue whale, with attribute blue"]
    assert len(ds.images) == 6 and ds.labels[:2] == [(0,), (0,)]
    keys = ["fox", "frog", "whale"]
    assert zeroshot_accuracy(ColourEncoder(keys), ds)["top1"] == 100.0
    lose = zeroshot_accuracy(ColourEncoder(keys, shift=2), ds, ks=(1, 5))
    assert lose["top1"] == 0.0 and lose["top5"] == 100.0
    test_only = load_awa2(awa2_root, classes="test", max_per_class=1)
    assert test_only.class_names == ["green frog", "blue whale"] and test_only.labels == [(0,), (1,)]
    assert load_awa2(awa2_root, max_attributes=1).class_prompts[0] == ["a photo of a red fox, with attribute red"]


def test_topk_with_several_true_labels():
    scores = torch.tensor([[0.9, 0.5, 0.1, 0.0], [0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.1, 0.0]])
    r = topk_accuracy(scores, [(1, 2), (0, 1), (1,)], ks=(1, 2, 3))
    # row 0: best true (1) is second -> top2; row 1: best true (1) fourth... 3 wrong? classes 2, 3 above -> rank 2
    # row 2: class 1 ties class 0 -> rank 1 (pessimistic)
    assert r["top1"] == 0.0 and r["top2"] == pytest.approx(200 / 3) and r["top3"] == 100.0
    with pytest.raises(ValueError, match="outside 0..3"):
        topk_accuracy(scores, [(4,), (0,), (0,)])


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return small_synthetic(tmp_path_factory.mktemp("syn"), n_train=20, n_val=150)


def test_synthetic_set_protocol(synth):
    ds = synthetic_zeroshot_set(synth)
    assert len(ds.class_names) == 20 and ds.class_prompts[0] == ["a photo of a circle that has colour red."]
    assert "a photo of a cross that has colour purple." in [p[0] for p in ds.class_prompts]
    assert len(ds.images) == 150 and all(1 <= len(l) <= 2 for l in ds.labels)
    assert sorted(ds.class_names[i] for i in ds.heldout_classes) == ["blue cross", "green triangle", "red square",
                                                                     "yellow circle"]
    # every val image contains a held-out combo
    assert all(set(l) & set(ds.heldout_classes) for l in ds.labels)


def test_synthetic_oracle_random_constant(synth):
    from kclip.eval.synthetic_split import read_split

    ds = synthetic_zeroshot_set(synth)
    oracle = zeroshot_accuracy(SceneOracle(read_split(synth, "val")), ds, batch_size=64)
    assert oracle["top1"] == 100.0 and oracle["heldout_top1"] == 100.0 and oracle["heldout_n_images"] == 150
    rnd = zeroshot_accuracy(HashRandom(), ds, batch_size=64)
    assert 3.0 <= rnd["top1"] <= 20.0, rnd  # chance 10%
    assert 30.0 <= rnd["top5"] <= 60.0, rnd  # chance 44.7%
    assert rnd["heldout_top1"] <= 15.0, rnd  # chance ~5%
    const = zeroshot_accuracy(Constant(), ds)
    assert const["top1"] == 0.0 and const["top5"] == 0.0


def test_zeroshot_set_validates():
    with pytest.raises(ValueError, match="at least one prompt"):
        ZeroShotSet("x", ["a"], [[]], [], [])


def test_topk_ignore_leaves_classes_out_of_the_ranking():
    scores = torch.tensor([[0.7, 0.7, 0.1]])
    assert topk_accuracy(scores, [(1,)], ks=(1,))["top1"] == 0.0  # class 0 ties -> counts against
    assert topk_accuracy(scores, [(1,)], ks=(1,), ignore=[(0, 1)])["top1"] == 100.0
