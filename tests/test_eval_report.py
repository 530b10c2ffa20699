"""run_eval end to end on a tiny synthetic set with fake encoders; report files, table and plot."""
import json

import numpy as np
import pytest

from kclip.eval import zeroshot
from kclip.eval.report import flatten_metrics, format_table, render_markdown
from kclip.eval.run import run_eval
from kclip.eval.synthetic_split import read_split
from test_eval_fakes import HashRandom, SceneOracle, small_synthetic


class TextOnly:
    """A teacher stand-in: text embeddings only."""
    name = "fake-teacher"

    def encode_texts(self, texts):
        return HashRandom(dim=24).encode_texts(texts) * 7.0  # raw, not normalised


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    data = small_synthetic(tmp_path_factory.mktemp("syn"), n_train=60, n_val=40)
    out = tmp_path_factory.mktemp("report")
    val = read_split(data, "val")
    train = read_split(data, "train")
    colours = val.meta["colors"]
    labels = np.array([colours.index(r["color_a"]) for r in train.rows])
    oracle = SceneOracle(val, name="oracle")
    # a stand-in "AWA2": the synthetic val images with prompts the oracle understands (tests the plumbing)
    zs = zeroshot.synthetic_zeroshot_from_split(val)
    fake_awa2 = zeroshot.ZeroShotSet("awa2", zs.class_names, zs.class_prompts, zs.images, zs.labels)
    mp = pytest.MonkeyPatch()
    mp.setattr(zeroshot, "load_awa2", lambda root, **kw: fake_awa2)
    try:
        report = run_eval({"before": HashRandom(name="rand"), "after": oracle}, data, out, teacher=TextOnly(),
                          concept_labels=labels, concept_k=6, awa2_root="unused", batch_size=16, seed=0,
                          text_em_steps=20, progress=False)
    finally:
        mp.undo()
    return report, out, data


def test_report_files_and_keys(evaluated):
    report, out, _ = evaluated
    assert sorted(p.name for p in out.iterdir()) == ["per_image_after.npz", "per_image_before.npz", "report.json",
                                                     "report.md", "report.png"]  # no temp files left
    on_disk = json.loads((out / "report.json").read_text())  # strict JSON (no NaN)
    assert set(on_disk) == {"models", "teacher", "baselines", "chance", "concepts", "evaluations", "provenance",
                            "text_em_probe", "distillation"}
    probe = on_disk["text_em_probe"]  # Table 1: the proof-of-concept row and the three synthetic EM splits
    assert {"text_em", "text_em_fresh", "text_em_heldout", "text_slot_acc_heldout"} <= set(probe["autoencoder"])
    assert probe["splits"] == {"trained": probe["splits"]["trained"], "fresh": probe["splits"]["trained"],
                               "heldout": on_disk["provenance"]["n_val_captions"]}
    assert 0 <= probe["autoencoder"]["text_slot_acc_heldout"] <= 100
    assert "Proof of concept" in (out / "report.md").read_text()
    assert all(e["ran"] for name, e in on_disk["evaluations"].items() if name != "cub")
    assert on_disk["evaluations"]["cub"] == {"ran": False, "why": on_disk["evaluations"]["cub"]["why"]}
    assert "eval.cub_root not set" in on_disk["evaluations"]["cub"]["why"]
    for name in ("before", "after"):
        m = on_disk["models"][name]
        for key in ("text_em", "text_token_acc", "text_em_heldout", "text_em_fresh", "text_slot_acc",
                    "text_slot_acc_fresh", "text_slot_acc_heldout", "attribute_top1", "attribute_top5", "attribute_heldout_top1",
                    "retrieval", "compositional", "caption_retrieval", "awa2"):
            assert key in m, (name, key)
        assert {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"} <= set(m["retrieval"])
        assert {"attribute_swap", "attribute_replace", "relation_replace", "mean"} <= set(m["compositional"])
    assert on_disk["teacher"]["name"] == "fake-teacher" and "text_em" in on_disk["teacher"]
    assert on_disk["provenance"]["text_em_steps"] == 20 and on_disk["provenance"]["n_val_images"] == 40
    assert on_disk["concepts"]["split"] == "train" and on_disk["concepts"]["nmi"]["color_a"] == pytest.approx(1.0)
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_oracle_beats_random(evaluated):
    report, _, _ = evaluated
    after, before = report["models"]["after"], report["models"]["before"]
    assert after["attribute_top1"] == 100.0 and after["attribute_heldout_top1"] == 100.0
    assert after["awa2"]["top1"] == 100.0
    assert after["compositional"]["mean"] == 100.0
    assert after["retrieval"]["t2i_r5"] > before["retrieval"]["t2i_r5"]
    assert after["caption_retrieval"]["r1"] > before["caption_retrieval"]["r1"]
    # the blind baseline sits beside the models, and chance levels are exact for this data
    assert 0.0 <= report["baselines"]["compositional_text_only"]["mean"] <= 100.0
    assert report["chance"]["attribute_top1"] == pytest.approx(10.0)  # two distinct combos of 20 per image
    assert report["chance"]["retrieval"]["t2i_r1"] == pytest.approx(100 / 40)


def test_markdown_and_terminal_table(evaluated):
    report, out, _ = evaluated
    md = (out / "report.md").read_text()
    header = next(l for l in md.splitlines() if l.startswith("| metric"))
    assert header == "| metric | before | after | teacher | text-only | chance | after − before |"
    row = next(l for l in md.splitlines() if l.startswith("| attribute zero-shot top-1 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    delta = report["models"]["after"]["attribute_top1"] - report["models"]["before"]["attribute_top1"]
    assert cells[1:3] == [f"{report['models']['before']['attribute_top1']:.1f}", "100.0"]
    assert cells[3] == "–" and cells[-1] == f"{delta:+.1f}"
    assert "| color_a | 1.000 |" in md
    table = format_table(report)
    assert table.splitlines()[0].split() == ["metric", "before", "after", "delta"]
    assert any(l.startswith("hard neg.: mean") and l.split()[-2] == "100.0" for l in table.splitlines())


def test_table_without_before_after_lists_all_models():
    report = {"models": {"a": {"text_em": 10.0, "retrieval": {"i2t_r1": 5.0}},
                         "b": {"text_em": 20.0, "retrieval": {"i2t_r1": float("nan")}}}}
    table = format_table(report)
    assert table.splitlines()[0].split() == ["metric", "a", "b"]
    assert "delta" not in table and "after − before" not in render_markdown(report)
    assert flatten_metrics({"text_em": 1.0, "n_test": 5, "text_em_detail": {"em": 1.0},
                            "retrieval": {"i2t_r1": 2.0, "n_images": 3}}) == {"text_em": 1.0, "retrieval.i2t_r1": 2.0}


def test_concept_labels_must_align(evaluated, tmp_path):
    _, _, data = evaluated
    with pytest.raises(ValueError, match="align with train.csv"):
        run_eval({"m": HashRandom()}, data, tmp_path, concept_labels=np.zeros(7, dtype=int), text_em_steps=1,
                 progress=False)


def _pairs_like_a_user(data, tmp_path):
    """The synthetic val/train images as user data: a CSV (BOM, CRLF) and webdataset shards; no meta.json."""
    import csv
    import io
    import webdataset as wds

    from kclip.data import build_index

    val, train = read_split(data, "val"), read_split(data, "train")
    out = {}
    for name, split in (("val", val), ("train", train)):
        rows = [("image", "caption")] + [(str(split.image_paths[j]), c) for c, j in zip(split.captions, split.text_to_image)]
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\r\n").writerows(rows)
        (tmp_path / f"{name}.csv").write_bytes(b"\xef\xbb\xbf" + buf.getvalue().encode())
        out[name] = build_index("csv", str(tmp_path / f"{name}.csv"), progress=False)
    with wds.TarWriter(str(tmp_path / "val-000.tar")) as sink:  # one sample per image, its first caption
        for j, path in enumerate(val.image_paths):
            sink.write({"__key__": f"k{j:04d}", "png": path.read_bytes(), "txt": val.captions[val.text_to_image.index(j)]})
    out["val_wds"] = build_index("wds", str(tmp_path / "val-000.tar"), progress=False)
    return out, val


def test_any_source_gets_retrieval_and_text_em_and_says_what_did_not_run(evaluated, tmp_path):
    """CSV or webdataset pairs (no synthetic ground truth): retrieval, caption retrieval, the EM probe and the
    concept sizes run; attribute zero-shot, hard negatives and NMI do not, and the report says why."""
    from kclip.eval.run import index_eval_data

    report_synth, _, data = evaluated
    idx, val = _pairs_like_a_user(data, tmp_path)
    for val_index in (idx["val"], idx["val_wds"]):
        wds = val_index is idx["val_wds"]
        eval_data = index_eval_data(val_index, idx["train"], description="user pairs")
        assert len(eval_data.val.images) == len(val.image_paths)
        assert eval_data.val.text_to_image == (list(range(len(val.image_paths))) if wds else val.text_to_image)
        labels = np.arange(len(idx["train"].pairs)) % 5
        report = run_eval({"before": HashRandom(name="rand"), "after": SceneOracle(val)}, eval_data, tmp_path / "r",
                          teacher=TextOnly(), concept_labels=labels, concept_k=5, batch_size=16, text_em_steps=20,
                          progress=False)
        after, before = report["models"]["after"], report["models"]["before"]
        if not wds:  # the same pairs, grouped the same way: the synthetic report's numbers
            assert after["retrieval"] == report_synth["models"]["after"]["retrieval"]
            assert after["caption_retrieval"] == report_synth["models"]["after"]["caption_retrieval"]
            assert report["chance"]["retrieval"] == report_synth["chance"]["retrieval"]
        else:  # images read from the shard by byte range; one caption per image: no caption retrieval
            assert after["retrieval"]["t2i_r5"] > before["retrieval"]["t2i_r5"]
            assert "caption_retrieval" not in after and "two or more" in report["evaluations"]["caption_retrieval"]["why"]
        assert "text_em" in after and "text_em" in report["teacher"]
        for key in ("attribute_top1", "compositional", "cub", "awa2"):
            assert key not in after
        ev = report["evaluations"]
        assert ev["retrieval"]["ran"] and ev["text_em"]["ran"] and ev["caption_retrieval"]["ran"] != wds
        for name in ("attribute_zeroshot", "compositional"):
            assert not ev[name]["ran"] and "synthetic" in ev[name]["why"]
        assert "eval.cub_root not set" in ev["cub"]["why"] and "eval.awa2_root not set" in ev["awa2"]["why"]
        assert report["concepts"]["nmi"] == {} and report["concepts"]["k"] == 5
        md = (tmp_path / "r" / "report.md").read_text()
        assert "| attribute_zeroshot | no | needs the built-in synthetic set's ground truth" in md
        assert "| cub | no | eval.cub_root not set" in md and "Data: user pairs" in md
        assert "hard neg." not in md and "| attribute | NMI |" not in md


def test_text_em_splits_mean_what_they_say(tmp_path):
    """trained: captions the student trained on (none used to fit the probe); fresh: seen combinations, captions
    the student never saw; heldout: the val captions, each naming a held-out combination."""
    from kclip.eval.run import _em_train_captions, synthetic_eval_data, text_em_splits
    from kclip.synthetic import parse_caption

    data = synthetic_eval_data(small_synthetic(tmp_path, n_train=60, n_val=40))
    train = data.synthetic[0]
    fit, splits = text_em_splits(data, _em_train_captions(data.train_captions, 0), seed=0)
    assert list(splits) == ["trained", "fresh", "heldout"]
    student = set(train.captions)
    assert set(splits["trained"]) <= student and not set(splits["trained"]) & set(fit)
    assert not set(splits["fresh"]) & student and len(set(splits["fresh"])) == len(splits["fresh"]) == len(
        splits["trained"])
    held = {tuple(c) for c in train.meta["heldout_combos"]}

    def combos(caption):
        s = parse_caption(caption)
        return {(s.color_a, s.shape_a), (s.color_b, s.shape_b)}

    assert all(not combos(c) & held for c in splits["fresh"])
    assert all(combos(c) & held for c in splits["heldout"])


def test_per_image_hits_reproduce_every_image_level_metric(evaluated):
    """The evaluators' per-item results, written beside the report, give back the report's numbers exactly: a
    driver that resamples images (the comparison's bootstrap) reads them instead of scoring again."""
    from kclip.eval.hits import load_hits
    from kclip.experiments.stats import ratio_metric

    report, out, _ = evaluated
    for name in ("before", "after"):
        per_image = load_hits(out / f"per_image_{name}.npz")
        flat = flatten_metrics(report["models"][name])
        assert {"retrieval.i2t_r1", "retrieval.t2i_r5", "attribute_top1", "attribute_heldout_top1",
                "compositional.mean"} <= set(per_image)
        for key, (num, den) in per_image.items():
            assert num.shape == den.shape and num.shape[0] == report["provenance"]["n_val_images"]
            assert float(ratio_metric(num, den)) == pytest.approx(flat[key], rel=1e-6, abs=1e-6), (name, key)  # float32
