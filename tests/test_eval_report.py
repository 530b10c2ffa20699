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
    return report, out


def test_report_files_and_keys(evaluated):
    report, out = evaluated
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md", "report.png"]  # no temp files left
    on_disk = json.loads((out / "report.json").read_text())  # strict JSON (no NaN)
    assert set(on_disk) == {"models", "teacher", "baselines", "chance", "concepts", "provenance"}
    for name in ("before", "after"):
        m = on_disk["models"][name]
        for key in ("text_em", "text_token_acc", "attribute_top1", "attribute_top5", "attribute_heldout_top1",
                    "retrieval", "compositional", "caption_retrieval", "awa2"):
            assert key in m, (name, key)
        assert {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"} <= set(m["retrieval"])
        assert {"attribute_swap", "attribute_replace", "relation_replace", "mean"} <= set(m["compositional"])
    assert on_disk["teacher"]["name"] == "fake-teacher" and "text_em" in on_disk["teacher"]
    assert on_disk["provenance"]["text_em_steps"] == 20 and on_disk["provenance"]["n_val_images"] == 40
    assert on_disk["concepts"]["split"] == "train" and on_disk["concepts"]["nmi"]["color_a"] == pytest.approx(1.0)
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_oracle_beats_random(evaluated):
    report, _ = evaluated
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
    report, out = evaluated
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
    report, _ = evaluated
    data = report["provenance"]["data_dir"]
    with pytest.raises(ValueError, match="align with train.csv"):
        run_eval({"m": HashRandom()}, data, tmp_path, concept_labels=np.zeros(7, dtype=int), text_em_steps=1,
                 progress=False)
