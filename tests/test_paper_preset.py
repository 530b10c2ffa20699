"""configs/paper.yaml through every stage (teach, concepts, train, eval) on a tiny real-image CSV, as a user runs it.

Everything the preset sets stays, except what cannot run here, given as overrides (as a user would):
- Llama-2-7b-hf -> a tiny random Llama saved with save_pretrained (2 layers, hidden 64; WordLevel
  tokenizer), still loaded in 8-bit through bitsandbytes, still mean-pooled, max_length 77;
- ViT-B-32 from OpenAI weights -> kclip-tiny, random init (`model.name=kclip-tiny model.pretrained=''`);
- the schedule (2 steps, batch 8, k = 4, a 10-step EM probe) and loader workers (2 cores);
- the fused losses -> their PyTorch references (the Triton interpreter is slow on CPU; kernels on/off
  agreement is tested in test_pipeline.py).

The pairs are a spreadsheet-style CSV (UTF-8 byte-order mark, CRLF) of JPEG and PNG files. After `teach`
the teacher's weights folder is renamed: concepts, train and eval must run from the cache alone. Then a
changed teacher setting must stop the run, naming the key and `--rebuild teach`.
"""
import csv
import io
import json

import pytest
from PIL import Image, ImageDraw

from kclip import cli
from test_teacher import CORPUS, make_tiny_llama

COLOURS = [(220, 40, 40), (40, 180, 60), (50, 80, 230), (230, 210, 40)]


def _write_pairs(root, n_train=24, n_val=8):
    """images/*.jpg|png (32x32, a coloured square on a grey ground) and train/val CSVs as Excel saves them."""
    (root / "images").mkdir()
    for split, n, offset in (("train", n_train, 0), ("val", n_val, n_train)):
        rows = [("image", "caption")]
        for i in range(offset, offset + n):
            img = Image.new("RGB", (32, 32), (128, 128, 128))
            x = 2 + (i * 5) % 16
            ImageDraw.Draw(img).rectangle([x, x, x + 12, x + 12], fill=COLOURS[i % len(COLOURS)])
            name = f"images/{i:03d}.{'jpg' if i % 2 else 'png'}"
            img.save(root / name)
            rows.append((name, f"{CORPUS[i % len(CORPUS)]}, {CORPUS[(3 * i + 1) % len(CORPUS)]}"))
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\r\n").writerows(rows)
        (root / f"{split}.csv").write_bytes(b"\xef\xbb\xbf" + buf.getvalue().encode("utf-8"))
    return root / "train.csv", root / "val.csv"


def test_paper_preset_every_stage_on_a_real_image_csv(tmp_path, capsys):
    train_csv, val_csv = _write_pairs(tmp_path)
    llama = tmp_path / "llama-2-stand-in"
    make_tiny_llama(llama)
    run_dir = tmp_path / "run"
    overrides = [
        f"run_dir={run_dir}", f"data.train={train_csv}", f"data.val={val_csv}", "data.num_workers=0",
        f"teacher.name={llama}", "model.name=kclip-tiny", "model.pretrained=",
        "concepts.k=4", "concepts.classifier_epochs=3", "train.max_steps=2", "train.batch_size=8",
        "train.warmup_steps=1", "train.log_every=1", "train.checkpoint_every=1000",
        "loss.contrastive_impl=reference", "loss.distill_impl=reference", "eval.batch_size=64", "eval.text_em_steps=10",
    ]
    args = ["--config", "paper", "--no-progress", *overrides]

    assert cli.main(["teach", *args]) == 0
    manifest = json.loads((run_dir / "teacher/train/manifest.json").read_text())
    assert manifest["precision"] == "int8" and manifest["pooling"] == "mean" and manifest["max_length"] == 77
    assert manifest["teacher_describe"]["quantized_linears"]["int8"] > 0 and manifest["count"] == 24

    llama.rename(tmp_path / "weights-moved-away")  # training from a finished cache needs no teacher weights
    assert cli.main(["run", *args]) == 0
    out = capsys.readouterr().out
    assert "teach: cache complete, skipped" in out

    report = json.loads((run_dir / "eval/report.json").read_text())
    for model in ("before", "after"):
        assert set(report["models"][model]["retrieval"]) >= {"i2t_r1", "t2i_r1", "t2i_r10"}
        assert "text_em" in report["models"][model] and "attribute_top1" not in report["models"][model]
    assert report["teacher"]["text_em"] is not None
    ev = report["evaluations"]
    assert ev["retrieval"]["ran"] and ev["text_em"]["ran"] and ev["concepts"]["ran"]
    assert not ev["attribute_zeroshot"]["ran"] and not ev["compositional"]["ran"]
    assert "eval.cub_root not set" in ev["cub"]["why"] and "eval.awa2_root not set" in ev["awa2"]["why"]
    assert report["provenance"]["n_val_images"] == 8 and report["provenance"]["n_train_captions"] == 24
    md = (run_dir / "eval/report.md").read_text()
    assert "## Evaluations" in md and "| cub | no | eval.cub_root not set" in md
    assert json.loads((run_dir / "train_done.json").read_text())["steps"] == 2
    for stamp in ("concepts/stamp.json", "train_stamp.json", "eval/stamp.json"):
        s = json.loads((run_dir / stamp).read_text())
        assert s["complete"] and s["inputs"]["teacher.precision"] == "int8" and s["config"]["teacher"]["name"] == str(llama)
    assert [json.loads(l)["stages"] for l in (run_dir / "runs.jsonl").read_text().splitlines()] == \
        [["teach"], ["teach", "concepts", "train", "eval"]]

    # a changed teacher setting stops the run before anything changes, naming the key and the flag
    with pytest.raises(SystemExit) as e:
        cli.main(["run", *args, "teacher.pooling=last"])
    err = capsys.readouterr().err
    assert e.value.code == 3
    assert "teacher.pooling: 'mean' -> 'last'" in err and "--rebuild teach" in err
    assert json.loads((run_dir / "teacher/train/manifest.json").read_text()) == manifest
