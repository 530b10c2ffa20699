"""The end-to-end benches cannot rot: train step, loader and the README table run at --quick sizes on CPU.

One module-scoped run of each bench (they are the slow part: the train step with four DeepSpeed engines and
four torch-engine steps, a few seconds for the loader), then checks on what they wrote.
"""
import json

import pytest

from bench import bench_loader, bench_train_step, readme_table

TRAIN_FIELDS = {"device", "torch", "triton", "git", "date", "model", "batch", "precision", "impl", "kernel_path",
                "ms_median", "ms_p20", "ms_p80", "pairs_per_s", "mfu", "peak_bytes", "flops_per_step"}
LOADER_FIELDS = {"device", "torch", "git", "date", "model", "batch", "impl", "num_workers", "pairs_per_s",
                 "ms_median", "ms_p20", "ms_p80", "first_batch_s"}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_results")
    data = tmp_path_factory.mktemp("loader_data")
    train = bench_train_step.main(["--quick", "--results-dir", str(out)])
    loader = bench_loader.main(["--quick", "--results-dir", str(out), "--data-dir", str(data)])
    return out, train, loader


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_train_step_every_impl_ran_with_required_fields(results):
    out, records, _ = results
    on_disk = _jsonl(out / "train_step.jsonl")
    assert on_disk == records
    assert [r["impl"] for r in records] == [i for i in bench_train_step.IMPLS if i not in bench_train_step.GPU_ONLY]
    for r in records:
        assert "error" not in r, f"{r['impl']} failed: {r['error']}"
        assert TRAIN_FIELDS <= set(r), f"{r['impl']} lacks {TRAIN_FIELDS - set(r)}"
        assert r["model"] == "kclip-tiny" and r["batch"] == 16 and r["precision"] == "fp32"
        assert 0 < r["ms_p20"] <= r["ms_median"] <= r["ms_p80"]
        assert r["pairs_per_s"] == pytest.approx(16 / (r["ms_median"] / 1e3))
        assert r["mfu"] is None and r["peak_bytes"] is None  # CPU: no peak FLOP/s, no device memory counter
        assert r["flops_per_step"] > 0
    by_impl = {r["impl"]: r for r in records}
    assert by_impl["kclip-reference"]["kernel_path"] == "reference"
    assert by_impl["kclip-fused"]["kernel_path"] in ("triton-interpreter", "triton") or \
        by_impl["kclip-fused"]["kernel_path"].startswith("reference (CPU fallback")
    assert "open_clip" in by_impl["openclip-style"]["kernel_path"]
    assert "int8" in by_impl["online-teacher"]["note"]
    for impl, stage in (("kclip-zero0", 0), ("kclip-zero1", 1), ("kclip-zero2", 2), ("kclip-zero3", 3)):
        assert by_impl[impl]["optimizer"].startswith(f"DeepSpeed ZeRO-{stage}")  # the product's Trainer step
        assert by_impl[impl]["engine"] == f"deepspeed-zero{stage}"
    assert by_impl["openclip-style"]["optimizer"] == "torch AdamW"
    # the product's step on the torch engine, and what train.engine=auto picks on CPU: the torch engine too
    for impl in ("kclip-torch", "kclip-fused", "kclip-reference", "online-teacher"):
        assert by_impl[impl]["engine"] == "torch" and by_impl[impl]["optimizer"].startswith("torch engine")
    assert by_impl["kclip-torch"]["kernel_path"] == by_impl["kclip-fused"]["kernel_path"]
    assert by_impl["kclip-fused"]["vs_openclip_style"] == pytest.approx(
        by_impl["openclip-style"]["ms_median"] / by_impl["kclip-fused"]["ms_median"])
    assert by_impl["kclip-fused"]["vs_online_teacher"] == pytest.approx(
        by_impl["online-teacher"]["ms_median"] / by_impl["kclip-fused"]["ms_median"])
    assert (out / "train_step.png").is_file()


def test_flop_count_matches_the_analytic_linear_layers():
    """The counted forward FLOPs include at least every Linear/projection GEMM of both towers (2*m*n*k each)."""
    import torch

    from kclip.model import KnowledgeClip, build_clip

    clip, _, _, _ = build_clip("kclip-tiny", seed=0)
    model = KnowledgeClip(clip, 24, 5)  # distill_impl "triton": the counter switches it to the reference
    inputs = bench_train_step.make_inputs(clip, 3, 24, 5, 64, torch.float32, torch.device("cpu"))
    flops = bench_train_step.count_forward_flops(model, inputs, "fp32", torch.device("cpu"))
    v, t = clip.visual, clip.transformer
    tokens_img = (v.image_size[0] // v.patch_size[0]) ** 2 + 1
    width_v, width_t = v.transformer.width, t.width
    per_layer = lambda w, n: 2 * n * (4 * w * w + 8 * w * w)  # noqa: E731 - qkv+out (4w^2) + MLP (8w^2)
    linear = 3 * (per_layer(width_v, tokens_img) * len(v.transformer.resblocks)
                  + per_layer(width_t, clip.context_length) * len(t.resblocks))
    assert linear < flops < 2 * linear


def test_loader_records_and_step_comparison(results):
    out, _, records = results
    assert _jsonl(out / "loader.jsonl") == records
    assert {(r["impl"], r["num_workers"]) for r in records} == {
        (impl, w) for impl in ("pairdataset", "in-memory") for w in (0, 2)}
    for r in records:
        assert "error" not in r, r["error"]
        assert LOADER_FIELDS <= set(r), LOADER_FIELDS - set(r)
        assert r["pairs_per_s"] > 0 and r["timed_pairs"] == 4 * 16
    # The train-step JSONL from the same device is there, so every real-data record carries the comparison.
    assert all("keeps_up" in r and r["step_pairs_per_s"] > 0 for r in records if r["impl"] == "pairdataset")


def test_readme_table_between_markers(results, tmp_path, capsys):
    out, train, _ = results
    readme = tmp_path / "README.md"
    readme.write_text("# kclip\n\nintro\n\n<!-- perf-table:start -->\nstale\n<!-- perf-table:end -->\n\ntail\n")
    table = readme_table.main(["--results-dir", str(out), "--readme", str(readme)])
    text = readme.read_text()
    assert text.startswith("# kclip\n\nintro\n\n<!-- perf-table:start -->\n") and text.endswith(
        "<!-- perf-table:end -->\n\ntail\n")
    assert "stale" not in text and table in text
    for impl in bench_train_step.IMPLS:
        assert (f"| {impl} |" in table) == (impl not in bench_train_step.GPU_ONLY)
    assert "| pairdataset |" in table and "| in-memory |" in table
    assert "CPU†" in table and "not meaningful" in table  # CPU results are flagged
    assert "x the open_clip-style step" in table          # headline ratio
    assert str(train[0]["git"]) in table
    assert not list(tmp_path.glob("*.tmp"))

    # Without markers nothing is written and the table is printed with a note.
    bare = tmp_path / "BARE.md"
    bare.write_text("# no markers\n")
    capsys.readouterr()
    readme_table.main(["--results-dir", str(out), "--readme", str(bare)])
    assert bare.read_text() == "# no markers\n"
    printed = capsys.readouterr().out
    assert "| kclip-fused |" in printed and "markers" in printed and "NOT written" in printed


def test_readme_table_keeps_the_newest_run_per_config(tmp_path):
    base = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.x", "triton": "3.x", "git": "abc", "model": "ViT-B-32",
            "image_size": 224, "batch": 256, "precision": "bf16", "world_size": 1, "compile": False,
            "grad_checkpointing": False, "impl": "kclip-fused", "ms_p20": 1.0, "ms_p80": 1.0}
    old = {**base, "date": "2026-01-01T00:00:00+00:00", "ms_median": 99.0, "pairs_per_s": 2586.0}
    new = {**base, "date": "2026-02-01T00:00:00+00:00", "ms_median": 50.0, "pairs_per_s": 5120.0, "git": "def"}
    other = {**old, "batch": 128}  # another config: kept too
    (tmp_path / "train_step.jsonl").write_text("\n".join(json.dumps(r) for r in (new, old, other)) + "\n")
    table = readme_table.main(["--results-dir", str(tmp_path), "--print"])
    rows = [line for line in table.splitlines() if line.startswith("| NVIDIA")]
    assert len(rows) == 2
    assert any("| 256 |" in r and "50.00" in r and "| def |" in r for r in rows)
    assert not any("| 256 |" in r and "99.00" in r for r in rows)
    assert "CPU†" not in table
