"""README performance table from ``bench/results/*.jsonl``.

For every bench file the newest record per (bench, device, config, impl) is kept (by its ``date``; a later line
wins a tie), and rendered as markdown: headline ratios first (train step vs open_clip-style and the online
teacher, MFU, DeepSpeed vs plain, whether the loader keeps up), then one table per bench with device,
torch/triton versions, date and git revision columns. Rows measured on a CPU are marked: their absolute times
are smoke-test numbers, not performance.

The table is written into README.md between ``<!-- perf-table:start -->`` and ``<!-- perf-table:end -->``
(atomically: a temporary file, then a rename). Without the markers nothing is written: the table is printed
with a note saying where the markers go.

    python -m bench.readme_table                          # bench/results -> README.md
    python -m bench.readme_table --results-dir /tmp/r --readme /tmp/README.md
    python -m bench.readme_table --print                  # only print
"""
from __future__ import annotations

import argparse
import datetime as _dt
from pathlib import Path

from bench.harness import RESULTS_DIR, load_results
from kclip.atomic import atomic_write_text

REPO_ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- perf-table:start -->", "<!-- perf-table:end -->"
CPU_MARK = "CPU†"

# Fields that say *what* was measured, per bench (anything else is provenance or a measurement).
CONFIG_KEYS = {
    "train_step": ("model", "image_size", "batch", "precision", "world_size", "compile", "grad_checkpointing"),
    "loader": ("model", "stored_image_size", "image_format", "batch", "num_workers"),
}
PROVENANCE = {"max_position_embeddings", "num_attention_heads", "num_key_value_heads", "max_tokens", "vocab_size",
              "intermediate_size", "hidden_size", "quick", "bias", "init", "device", "torch", "triton", "git", "date", "interpreter", "bench", "op", "impl", "error", "oom",
              "note", "kernel_path", "optimizer", "flop_count", "run_id", "seq", "series", "git_note", "triton_path",
              "skipped", "platform", "python", "cuda", "capability", "autotune_best", "bnb_int8_layer"}
# Rows that are not comparisons (the launch-configuration sweep of --tune) stay in the JSONL only.
HIDDEN_IMPLS = {"kclip-tune"}
METRIC_HINTS = ("ms", "bytes", "flops", "per_s", "_s", "steps", "pairs", "efficiency", "cos", "vs_", "ratio",
                "over", "mfu", "error", "iters", "inertia", "time", "speedup", "batches")


def config_of(bench: str, rec: dict) -> tuple:
    """The (key, value) pairs that identify the configuration of a record."""
    keys = CONFIG_KEYS.get(bench)
    if keys is None:
        keys = sorted(k for k, v in rec.items()
                      if k not in PROVENANCE and isinstance(v, (int, str, bool)) and not isinstance(v, float)
                      and not any(h in k.lower() for h in METRIC_HINTS))
    return tuple((k, rec.get(k)) for k in keys)


def latest(bench: str, records: list[dict]) -> list[dict]:
    """The newest record per (device, config, impl), in first-seen order."""
    keep: dict = {}
    for rec in records:
        key = (rec.get("device"), config_of(bench, rec), rec.get("impl"))
        if key not in keep or str(rec.get("date", "")) >= str(keep[key].get("date", "")):
            keep[key] = rec
    rows = list(keep.values())
    rows.sort(key=lambda r: (is_cpu(r), str(r.get("device"))))  # GPUs first; stable otherwise
    return rows


def is_cpu(rec: dict) -> bool:
    return str(rec.get("device", "")).lower().startswith("cpu")


def _device(rec: dict) -> str:
    dev = str(rec.get("device", "?"))
    return f"{CPU_MARK} {dev}" if is_cpu(rec) else dev


def _f(v, fmt: str = "{:.2f}") -> str:
    return fmt.format(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else "–"


def _ms(rec: dict) -> str:
    if rec.get("error"):
        return "error: " + str(rec["error"])[:60].replace("|", "/")
    if not isinstance(rec.get("ms_median"), (int, float)):
        return "–"
    return f"{rec['ms_median']:.2f} ({_f(rec.get('ms_p20'))}–{_f(rec.get('ms_p80'))})"


def _prov(rec: dict) -> list[str]:
    return [str(rec.get("torch", "?")), str(rec.get("triton") or "–"), str(rec.get("date", "?"))[:10],
            str(rec.get("git", "?"))]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in row) + " |" for row in rows]
    return lines


def headlines(benches: dict[str, list[dict]]) -> list[str]:
    """One bullet per (device, model) for the train step, plus the loader verdict."""
    out = []
    for rec in benches.get("train_step", []):
        if rec.get("impl") != "kclip-fused" or not rec.get("pairs_per_s"):
            continue
        parts = [f"**{rec['model']}**, batch {rec['batch']}, {rec['precision']} on {_device(rec)}: kclip-fused "
                 f"{rec['pairs_per_s']:.0f} pairs/s/GPU"]
        if rec.get("mfu"):
            parts.append(f"MFU {rec['mfu']:.0%}")
        if rec.get("vs_openclip_style"):
            parts.append(f"{rec['vs_openclip_style']:.2f}x the open_clip-style step")
        if rec.get("vs_online_teacher"):
            parts.append(f"{rec['vs_online_teacher']:.1f}x the online 8-bit-teacher step")
        out.append("- " + "; ".join(parts))
    loaders = [r for r in benches.get("loader", []) if r.get("impl") == "pairdataset" and r.get("pairs_per_s")]
    by_device: dict = {}
    for r in loaders:
        if r["device"] not in by_device or r["pairs_per_s"] > by_device[r["device"]]["pairs_per_s"]:
            by_device[r["device"]] = r
    for r in by_device.values():
        line = (f"- loader on {_device(r)}: {r['pairs_per_s']:.0f} pairs/s at best ({r['num_workers']} workers, "
                f"{r['image_format']} {r['stored_image_size']} px -> {r['image_size']} px)")
        if r.get("step_pairs_per_s"):
            line += (f"; the kclip-fused step needs {r['step_pairs_per_s']:.0f} pairs/s/GPU: "
                     f"{'keeps up' if r['pairs_per_s'] >= r['step_pairs_per_s'] else 'too slow'}")
        out.append(line)
    return out


def train_step_table(rows: list[dict]) -> list[str]:
    header = ["device", "model", "batch", "precision", "impl", "step ms median (p20–p80)", "pairs/s/GPU", "MFU",
              "peak GiB", "vs open_clip", "vs online teacher", "kernel path", "torch", "triton", "date", "git"]
    body = []
    for r in rows:
        peak = r["peak_bytes"] / 2**30 if isinstance(r.get("peak_bytes"), (int, float)) else None
        body.append([_device(r), str(r.get("model")), str(r.get("batch")), str(r.get("precision")),
                     str(r.get("impl")), _ms(r), _f(r.get("pairs_per_s"), "{:.0f}"),
                     _f(r["mfu"] * 100, "{:.1f}%") if r.get("mfu") else "–", _f(peak),
                     _f(r.get("vs_openclip_style"), "{:.2f}x"), _f(r.get("vs_online_teacher"), "{:.2f}x"),
                     str(r.get("kernel_path", "–")).split(" (")[0], *_prov(r)])
    return _table(header, body)


def loader_table(rows: list[dict]) -> list[str]:
    header = ["device", "model", "images", "batch", "workers", "impl", "pairs/s", "batch ms median (p20–p80)",
              "first batch s", "keeps up", "torch", "triton", "date", "git"]
    body = []
    for r in rows:
        keeps = r.get("keeps_up")
        body.append([_device(r), str(r.get("model")), f"{r.get('image_format')} {r.get('stored_image_size')} px",
                     str(r.get("batch")), str(r.get("num_workers")), str(r.get("impl")),
                     _f(r.get("pairs_per_s"), "{:.0f}"), _ms(r), _f(r.get("first_batch_s")),
                     "–" if keeps is None else ("yes" if keeps else "no"), *_prov(r)])
    return _table(header, body)


# Per bench, the measurements worth a column beside the time (field, label, format).
KEY_METRICS = {
    "env": [("matmul_tflops", "bf16 matmul TFLOP/s", "{:.0f}"), ("copy_tb_per_s", "copy TB/s", "{:.2f}"),
            ("bnb_int8_cos_min", "int8 Linear cos", "{:.4f}")],
    "kmeans": [("ms_per_iter", "ms / Lloyd iter", "{:.2f}"), ("steady_ms_per_iter", "steady ms / iter", "{:.2f}"),
               ("setup_s", "set-up s", "{:.2f}"), ("assign_ms", "assign ms", "{:.2f}"),
               ("update_ms", "update ms", "{:.2f}")],
    "teacher": [("tokens_per_s", "tokens/s", "{:.0f}"), ("tflops", "useful TFLOP/s", "{:.1f}"),
                ("weight_bytes", "weights GiB", "{:.2f}"), ("cos_min", "cos min", "{:.4f}"),
                ("bucketed_efficiency", "padding eff.", "{:.3f}")],
    "clip_contrastive_loss": [("tflops", "TFLOP/s (4-matmul)", "{:.0f}")],
    "projected_mse_loss": [("eager_over_kernel", "eager/kernel", "{:.2f}"), ("kernel_over_floor", "kernel/floor",
                                                                            "{:.2f}")],
}


def _metric(rec: dict, field: str, fmt: str) -> str:
    v = rec.get(field)
    if field == "weight_bytes" and isinstance(v, (int, float)):
        v = v / 2**30
    return _f(v, fmt) if isinstance(v, (int, float)) and not isinstance(v, bool) else "–"


def generic_table(bench: str, rows: list[dict], max_rows: int) -> list[str]:
    extra = KEY_METRICS.get(bench, [])
    extra = [m for m in extra if any(isinstance(r.get(m[0]), (int, float)) for r in rows)]
    header = ["device", "config", "impl", "ms median (p20–p80)", *[m[1] for m in extra], "torch", "triton", "date",
              "git"]
    body = [[_device(r), ", ".join(f"{k}={v}" for k, v in config_of(bench, r)), str(r.get("impl")), _ms(r),
             *[_metric(r, f, fmt) for f, _, fmt in extra], *_prov(r)]
            for r in rows[:max_rows]]
    lines = _table(header, body)
    if len(rows) > max_rows:
        lines.append(f"\n({len(rows) - max_rows} more rows in `bench/results/{bench}.jsonl`)")
    return lines


def render(benches: dict[str, list[dict]], max_rows: int = 16) -> str:
    """The markdown block (without the markers)."""
    newest = {name: latest(name, [r for r in recs if r.get("impl") not in HIDDEN_IMPLS])
              for name, recs in benches.items()}
    newest = {name: rows for name, rows in newest.items() if rows}
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    lines = [f"_Generated by `python -m bench.readme_table` from `bench/results/*.jsonl` on {stamp}; newest run per "
             "(bench, device, config, impl)._", ""]
    if not newest:
        return "\n".join(lines + ["No benchmark results yet: run `python -m bench.bench_train_step` on a GPU."])
    heads = headlines(newest)
    if heads:
        lines += ["**Headline**", ""] + heads + [""]
    order = [b for b in ("train_step", "loader") if b in newest] + sorted(b for b in newest
                                                                        if b not in ("train_step", "loader"))
    for name in order:
        rows = newest[name]
        lines.append(f"**{name}**")
        lines.append("")
        if name == "train_step":
            lines += train_step_table(rows)
        elif name == "loader":
            lines += loader_table(rows)
        else:
            lines += generic_table(name, rows, max_rows)
        lines.append("")
    if any(is_cpu(r) for rows in newest.values() for r in rows):
        lines.append(f"{CPU_MARK} measured on a CPU (`--quick` smoke runs): absolute times are not meaningful, and "
                     "the fused kernels there run the Triton interpreter or the PyTorch reference (see the kernel "
                     "path). Only GPU rows are performance numbers.")
    return "\n".join(lines).rstrip() + "\n"


def write_readme(readme: Path, table: str) -> bool:
    """Replace what lies between the markers (atomically). False (nothing written) when the markers are missing."""
    text = readme.read_text(encoding="utf-8")
    start, end = text.find(START), text.find(END)
    if start < 0 or end < 0 or end < start:
        return False
    new = text[:start + len(START)] + "\n" + table + text[end:]
    atomic_write_text(readme, new)
    return True


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results-dir", default=None, help=f"JSONL folder (default {RESULTS_DIR})")
    p.add_argument("--readme", default=None, help=f"the README to update (default {REPO_ROOT / 'README.md'})")
    p.add_argument("--benches", nargs="+", default=None, help="only these bench files (stems), e.g. train_step")
    p.add_argument("--max-rows", type=int, default=16, help="rows per generic (kernel) bench table")
    p.add_argument("--print", dest="print_only", action="store_true", help="print the table, write nothing")
    args = p.parse_args(argv)
    benches = load_results(Path(args.results_dir) if args.results_dir else RESULTS_DIR)
    if args.benches:
        benches = {k: v for k, v in benches.items() if k in args.benches}
    table = render(benches, args.max_rows)
    readme = Path(args.readme) if args.readme else REPO_ROOT / "README.md"
    if args.print_only:
        print(table)
    elif write_readme(readme, table):
        print(f"[readme_table] wrote the performance table into {readme}")
    else:
        print(table)
        print(f"[readme_table] {readme} has no '{START}' ... '{END}' markers: the table above was NOT written. "
              "Add the two markers (each on its own line) where the table belongs and rerun.")
    return table


if __name__ == "__main__":
    main()
