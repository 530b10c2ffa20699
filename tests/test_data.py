"""Data: the synthetic generator, CSV/TSV and webdataset indexing, and bad input (errors name file/row/key)."""
import csv
import io

import numpy as np
import pytest
from PIL import Image

from kclip.data import BadSampleError, build_index, open_image, rank_batches
from kclip.synthetic import generate


def _png_bytes(color=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def _write_csv(path, rows, columns=("image", "caption"), delimiter=","):
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(columns)
        w.writerows(rows)


@pytest.fixture
def pairs_dir(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(3):
        (tmp_path / "img" / f"{i}.png").write_bytes(_png_bytes((50 * i, 0, 0)))
    (tmp_path / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return tmp_path


def test_synthetic_is_deterministic_and_holds_out_combos(tmp_path):
    m1 = generate(tmp_path / "a", n_train_images=30, n_val_images=10, progress=False)
    generate(tmp_path / "b", n_train_images=30, n_val_images=10, progress=False)
    assert (tmp_path / "a" / "train.csv").read_text() == (tmp_path / "b" / "train.csv").read_text()
    assert (tmp_path / "a" / "images" / "000005.png").read_bytes() == (tmp_path / "b" / "images" / "000005.png").read_bytes()
    held = {tuple(c) for c in m1["heldout_combos"]}
    rows = {split: list(csv.DictReader(open(tmp_path / "a" / f"{split}.csv"))) for split in ("train", "val")}
    for r in rows["train"]:
        assert (r["color_a"], r["shape_a"]) not in held and (r["color_b"], r["shape_b"]) not in held
    for r in rows["val"]:
        assert (r["color_a"], r["shape_a"]) in held or (r["color_b"], r["shape_b"]) in held
    assert len(rows["train"]) == 60  # two phrasings per image


def test_csv_and_tsv_index_relative_paths(pairs_dir):
    _write_csv(pairs_dir / "p.csv", [("img/0.png", "a red thing"), ("img/1.png", "another")])
    _write_csv(pairs_dir / "p.tsv", [("img/0.png", "a red, thing")], delimiter="\t")
    idx = build_index("csv", str(pairs_dir / "p.csv"), progress=False)
    assert [p.caption for p in idx.pairs] == ["a red thing", "another"] and idx.skipped == {}
    assert idx.pairs[0].uid == "p:2"
    assert np.asarray(open_image(idx.pairs[1])).shape == (8, 8, 3)
    assert build_index("csv", str(pairs_dir / "p.tsv"), progress=False).pairs[0].caption == "a red, thing"


def test_missing_column_names_file_column_and_key(pairs_dir):
    _write_csv(pairs_dir / "p.csv", [("img/0.png", "x")], columns=("filepath", "caption"))
    with pytest.raises(BadSampleError) as e:
        build_index("csv", str(pairs_dir / "p.csv"), progress=False)
    msg = str(e.value)
    assert "p.csv" in msg and "'image'" in msg and "data.image_column" in msg and "filepath" in msg


@pytest.mark.parametrize("name, delimiter", [("p.csv", ","), ("p.tsv", "\t")])
def test_byte_order_mark_and_crlf_as_spreadsheets_save_them(pairs_dir, name, delimiter):
    """Excel's "CSV UTF-8" export: a UTF-8 byte-order mark before the header and CRLF line ends."""
    text = delimiter.join(["image", "caption", "uid"]) + "\r\n" + \
        delimiter.join(["img/0.png", '"a café, by night"', "u0"]) + "\r\n" + \
        delimiter.join(["img/1.png", '"a quoted ""word"""', "u1"]) + "\r\n"
    (pairs_dir / name).write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    idx = build_index("csv", str(pairs_dir / name), uid_column="uid", progress=False)
    assert [p.uid for p in idx.pairs] == ["u0", "u1"]
    assert idx.pairs[1].caption == 'a quoted "word"'
    assert idx.pairs[0].caption == "a café, by night"
    assert idx.pairs[0].image.endswith("0.png") and idx.skipped == {}


def test_missing_column_lists_the_columns_found_and_a_close_match(pairs_dir):
    (pairs_dir / "p.csv").write_bytes(b"\xef\xbb\xbfImage , caption\r\nimg/0.png,x\r\n")
    with pytest.raises(BadSampleError) as e:
        build_index("csv", str(pairs_dir / "p.csv"), progress=False)
    msg = str(e.value)
    assert "no column 'image'" in msg and "['Image', 'caption']" in msg and "did you mean 'Image'" in msg
    assert "data.image_column" in msg
    assert build_index("csv", str(pairs_dir / "p.csv"), image_column="Image", progress=False).captions == ["x"]


def test_not_utf8_and_empty_files_are_named(pairs_dir):
    (pairs_dir / "p.csv").write_bytes("image,caption\nimg/0.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(BadSampleError, match="p.csv: not UTF-8.*CSV UTF-8"):
        build_index("csv", str(pairs_dir / "p.csv"), progress=False)
    (pairs_dir / "e.csv").write_bytes(b"")
    with pytest.raises(BadSampleError, match="e.csv: the file is empty"):
        build_index("csv", str(pairs_dir / "e.csv"), progress=False)


@pytest.mark.parametrize("row, needle", [
    (("img/missing.png", "fine caption"), "missing image"),
    (("img/corrupt.png", "fine caption"), "corrupt image"),
    (("img/0.png", "   "), "empty caption"),
])
def test_bad_rows_raise_naming_file_and_row(pairs_dir, row, needle):
    _write_csv(pairs_dir / "p.csv", [("img/1.png", "ok"), row])
    with pytest.raises(BadSampleError) as e:
        build_index("csv", str(pairs_dir / "p.csv"), progress=False)
    assert "p.csv:3" in str(e.value) and needle in str(e.value) and "on_bad_sample=skip" in str(e.value)


def test_skip_counts_and_reports_every_bad_row(pairs_dir):
    _write_csv(pairs_dir / "p.csv", [("img/0.png", "ok"), ("img/missing.png", "a"), ("img/corrupt.png", "b"),
                                     ("img/1.png", ""), ("img/2.png", "ok too")])
    idx = build_index("csv", str(pairs_dir / "p.csv"), on_bad_sample="skip", progress=False)
    assert [p.caption for p in idx.pairs] == ["ok", "ok too"]
    assert idx.skipped == {"missing image": 1, "corrupt image": 1, "empty caption": 1}
    assert "skipped 3 bad samples" in idx.report()
    assert any("p.csv:4" in e for e in idx.skipped_examples)


def test_index_is_cached_and_invalidated_when_the_file_changes(pairs_dir):
    _write_csv(pairs_dir / "p.csv", [("img/0.png", "one")])
    cache = pairs_dir / "index.json"
    assert build_index("csv", str(pairs_dir / "p.csv"), cache_path=cache, progress=False).captions == ["one"]
    _write_csv(pairs_dir / "p.csv", [("img/0.png", "one"), ("img/1.png", "two, changed")])
    assert build_index("csv", str(pairs_dir / "p.csv"), cache_path=cache, progress=False).captions == ["one", "two, changed"]


def test_webdataset_shards(tmp_path):
    import webdataset as wds

    for s in range(2):
        with wds.TarWriter(str(tmp_path / f"train-{s:03d}.tar")) as sink:
            for k in range(3):
                sample = {"__key__": f"s{s}k{k}", "png": _png_bytes((10 * k, 0, 0)), "txt": f"caption {s} {k}"}
                if (s, k) == (1, 2):
                    sample["txt"] = ""
                sink.write(sample)
    pattern = str(tmp_path / "train-{000..001}.tar")
    with pytest.raises(BadSampleError, match="train-001.tar:s1k2"):
        build_index("wds", pattern, progress=False)
    idx = build_index("wds", pattern, on_bad_sample="skip", progress=False)
    assert len(idx.pairs) == 5 and idx.skipped == {"empty caption": 1}
    assert idx.pairs[4].uid == "train-001:s1k1" and idx.pairs[4].caption == "caption 1 1"
    assert np.asarray(open_image(idx.pairs[1]))[0, 0, 0] == 10
    with pytest.raises(FileNotFoundError, match="train-002.tar"):
        build_index("wds", str(tmp_path / "train-{000..002}.tar"), progress=False)


def test_rank_batches_partition_the_global_batch():
    one = rank_batches(50, 8, seed=3, epoch=1, rank=0, world_size=1)
    two = [rank_batches(50, 4, seed=3, epoch=1, rank=r, world_size=2) for r in range(2)]
    assert len(one) == 6 and all(len(b) == 8 for b in one)
    for i in range(6):
        assert np.array_equal(np.concatenate([two[0][i], two[1][i]]), one[i])
    assert not np.array_equal(rank_batches(50, 8, 3, 2, 0, 1)[0], one[0])  # a new order each epoch


def test_uint8_images_normalised_on_device_equal_the_open_clip_transform(tmp_path):
    """Workers ship uint8; DeviceNormalize finishes the transform: the same tensor as open_clip's, exactly."""
    import torch

    from kclip.data import PairDataset
    from kclip.model import build_clip

    generate(tmp_path, n_train_images=6, n_val_images=2, image_size=32, progress=False)
    idx = build_index("csv", str(tmp_path / "train.csv"), uid_column="uid", progress=False)
    _, preprocess_train, preprocess_val, tokenizer = build_clip("kclip-tiny", seed=0)
    for preprocess in (preprocess_train, preprocess_val):
        fast = PairDataset(idx, preprocess, tokenizer, seed=5)
        slow = PairDataset(idx, preprocess, tokenizer, seed=5, uint8_images=False)
        assert fast.normalize is not None and slow.normalize is None
        for i in (0, 3, len(idx.pairs) + 3):  # the last one: epoch 1, a different augmentation
            u8 = fast[i]["image"]
            assert u8.dtype == torch.uint8 and u8.shape == (3, 32, 32)
            torch.testing.assert_close(fast.normalize(u8[None])[0], slow[i]["image"], atol=0, rtol=0)
        n = len(idx.pairs)
        changed = [not torch.equal(fast[i]["image"], fast[n + i]["image"]) for i in range(n)]
        assert any(changed) == (preprocess is preprocess_train)  # augmentation differs by epoch; eval does not


def test_device_normalize_copies_its_statistics_once_per_device(monkeypatch):
    """No host-to-device copy per batch (a captured step cannot hold one), and workers get no device copies."""
    import pickle

    import torch

    from kclip.data import DeviceNormalize

    norm = DeviceNormalize((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    want = norm(x)
    copies = []
    real_to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: copies.append(self.shape) or real_to(self, *a, **k))
    for _ in range(3):
        assert torch.equal(norm(x), want)
    assert (1, 3, 1, 1) not in copies  # the statistics stayed where they were first moved
    monkeypatch.undo()
    assert list(norm._on) == [torch.device("cpu")]
    worker = pickle.loads(pickle.dumps(norm))
    assert worker._on == {} and torch.equal(worker(x), want)
