"""Writing the evaluation report: ``report.json``, ``report.md`` (models as columns), ``report.png``.

All three files are written atomically (a temporary file in the same folder, then ``os.replace``), so a
crash never leaves half a report. JSON is strict: NaN becomes ``null``.

The markdown table has one row per metric and one column per model, then (where it applies) the
teacher (text-only metrics), the text-only bigram baseline (compositional rows), the chance level, and
``after - before`` when models named "before" and "after" are both present. An "Evaluations" section
lists every evaluation with what it ran on, or why it did not run (``report["evaluations"]``).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

from kclip.atomic import atomic_write_text

# (key path, label) of the rows of the main table, in order
MAIN_ROWS: list[tuple[str, str]] = [
    # synthetic: captions the student trained on; real data: the val captions
    ("text_em", "text reconstruction EM (trained captions; real data: val)"),
    ("text_token_acc", "text reconstruction token acc. (trained captions; real data: val)"),
    ("text_slot_acc", "text reconstruction slot acc. (trained captions)"),
    ("text_em_fresh", "text reconstruction EM (fresh captions, seen combos)"),
    ("text_token_acc_fresh", "text reconstruction token acc. (fresh captions, seen combos)"),
    ("text_slot_acc_fresh", "text reconstruction slot acc. (fresh captions, seen combos)"),
    ("text_em_heldout", "text reconstruction EM (held-out combos)"),
    ("text_token_acc_heldout", "text reconstruction token acc. (held-out combos)"),
    ("text_slot_acc_heldout", "text reconstruction slot acc. (held-out combos)"),
    ("attribute_top1", "attribute zero-shot top-1"),
    ("attribute_top5", "attribute zero-shot top-5"),
    ("attribute_heldout_top1", "held-out combos top-1"),
    ("attribute_heldout_top5", "held-out combos top-5"),
    ("cub.top1", "CUB zero-shot top-1"),
    ("cub.top5", "CUB zero-shot top-5"),
    ("awa2.top1", "AWA2 zero-shot top-1"),
    ("awa2.top5", "AWA2 zero-shot top-5"),
    ("retrieval.i2t_r1", "image->text R@1"),
    ("retrieval.i2t_r5", "image->text R@5"),
    ("retrieval.i2t_r10", "image->text R@10"),
    ("retrieval.t2i_r1", "text->image R@1"),
    ("retrieval.t2i_r5", "text->image R@5"),
    ("retrieval.t2i_r10", "text->image R@10"),
    ("compositional.attribute_swap", "hard neg.: attribute swap"),
    ("compositional.attribute_replace", "hard neg.: attribute replace"),
    ("compositional.relation_replace", "hard neg.: relation replace"),
    ("compositional.mean", "hard neg.: mean"),
    ("caption_retrieval.r1", "caption->caption R@1"),
    ("caption_retrieval.r5", "caption->caption R@5"),
]
# the short list for the terminal table and the plot
HEADLINE = ["text_em", "text_em_heldout", "attribute_top1", "attribute_heldout_top1", "retrieval.i2t_r1", "retrieval.t2i_r1",
            "compositional.mean", "caption_retrieval.r1"]
_SKIP_KEYS = ("detail", "examples", "seconds", "decoder")


def lookup(entry: Mapping | None, path: str) -> Any:
    """``entry["a"]["b"]`` for path "a.b"; None when any part is missing."""
    cur: Any = entry
    for part in path.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return None
        cur = cur[part]
    return cur


def flatten_metrics(entry: Mapping, prefix: str = "") -> dict[str, float]:
    """Numeric metrics of one model entry as {"a.b": value}; counts (n_*), timings and details left out."""
    out: dict[str, float] = {}
    for k, v in entry.items():
        if k.startswith("n_") or any(s in k for s in _SKIP_KEYS):
            continue
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten_metrics(v, key + "."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None:
            out[key] = float(v)
    return out


def json_safe(obj):
    """JSON-safe copy: NaN/inf -> None, tuples -> lists, Paths -> str."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.1f}"


def _delta(after, before) -> str:
    if after is None or before is None:
        return "–"
    return f"{after - before:+.1f}"


def _table_columns(report: Mapping) -> tuple[list[str], list[str]]:
    models = list(report.get("models", {}))
    extra = []
    if report.get("teacher"):
        extra.append("teacher")
    if lookup(report, "baselines.compositional_text_only"):
        extra.append("text-only")
    if report.get("chance"):
        extra.append("chance")
    return models, extra


def _cell(report: Mapping, column: str, key: str):
    if column == "teacher":
        return lookup(report.get("teacher"), key)
    if column == "text-only":
        if key.startswith("compositional."):
            return lookup(report["baselines"]["compositional_text_only"], key.split(".", 1)[1])
        return None
    if column == "chance":
        return lookup(report.get("chance"), key)
    return lookup(report["models"][column], key)


def render_markdown(report: Mapping) -> str:
    """The report as markdown: the main metric table, the concept statistics, provenance."""
    models, extra = _table_columns(report)
    has_delta = "before" in models and "after" in models
    cols = models + extra + (["after − before"] if has_delta else [])
    rows = [(k, label) for k, label in MAIN_ROWS
            if any(_cell(report, c, k) is not None for c in models + ["teacher"])]
    lines = ["# kclip evaluation report", ""]
    prov = report.get("provenance", {})
    lines.append(f"Data: {prov.get('data') or prov.get('data_dir') or '?'} ({prov.get('n_val_images', '?')} val images, "
                 f"{prov.get('n_val_captions', '?')} val captions, {prov.get('n_train_captions', '?')} train captions); "
                 f"seed {prov.get('seed', '?')}; text-EM probe {prov.get('text_em_steps', '?')} steps. "
                 "All numbers are percentages.")
    lines += ["", "| metric | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for key, label in rows:
        cells = [_fmt(_cell(report, c, key)) for c in models + extra]
        if has_delta:
            cells.append(_delta(lookup(report["models"]["after"], key), lookup(report["models"]["before"], key)))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Columns: *teacher* = the LLM teacher's caption embeddings (text-only metrics); *text-only* = a "
              "bigram language model fit on the training captions that never sees the image (hard-negative rows: "
              "if a model is not clearly above it, it is not using the image); *chance* = a random ranking.", ""]
    lines += render_evaluations(report)
    lines += render_probe_and_distillation(report)
    concepts = report.get("concepts")
    if concepts:
        lines += ["## Concepts (k-means labels" + (" vs true attributes)" if concepts.get("nmi") else ")"), "",
                  f"{concepts['n']} {concepts.get('split', '')} captions, k = {concepts['k']}, "
                  f"{concepts['n_empty']} empty clusters, sizes {concepts['size_min']}–{concepts['size_max']} "
                  f"(mean {concepts['size_mean']:.1f}, std {concepts['size_std']:.1f}), largest cluster "
                  f"{100 * concepts['largest_fraction']:.1f}% of captions, size entropy / log k = "
                  f"{concepts['size_entropy_ratio']:.2f}.", ""]
        if concepts.get("nmi"):  # only data with ground truth (the synthetic set) has attributes to compare with
            lines += ["| attribute | NMI |", "|---|---:|"]
            lines += [f"| {k} | {v:.3f} |" for k, v in concepts["nmi"].items()] + [""]
    if prov:
        lines += ["## Provenance", "", "```json", json.dumps(json_safe(prov), indent=2), "```", ""]
    return "\n".join(lines)


def render_probe_and_distillation(report: Mapping) -> list[str]:
    """Markdown lines: the text probe's proof-of-concept row, and whether the student distils (held-out R^2)."""
    lines = []
    probe = report.get("text_em_probe")
    if probe:
        ae = probe["autoencoder"]
        held = "".join(f", {label} {ae[key]:.1f}" for key, label in (("text_em_fresh", "fresh captions"),
                                                                       ("text_em_heldout", "held-out combos"))
                       if key in ae)
        lines += ["## Text reconstruction probe (Kamath et al.)", "",
                  f"Proof of concept: the probe's own autoencoder (its encoder trained with the decoder, vocabulary "
                  f"{ae['vocab_size']} words, {probe['n_fit_captions']} captions) reconstructs EM "
                  f"{ae['text_em']:.1f} on {next(iter(probe['splits']), 'its first split')} captions{held}. The decoder is then frozen and each encoder above gets "
                  f"only a linear map + LayerNorm; splits: "
                  + ", ".join(f"{k} {n} captions" for k, n in probe["splits"].items()) + ".", ""]
    dist = report.get("distillation")
    if dist and dist.get("r2") is not None:
        r2 = dist["r2"]
        lines += ["## Distillation", "",
                  f"R^2 of W_e(E_T(x)) against the teacher on {dist.get('captions', '?')} held-out captions: "
                  f"**{r2:.3f}** (1 - SSE/SST; 0 = no better than predicting the mean teacher vector). "
                  + ("The projection fits the teacher: the student distils." if r2 >= 0.1 else
                     "The projection does NOT fit the teacher: this run did not distil."), ""]
    return lines


def render_evaluations(report: Mapping) -> list[str]:
    """Markdown lines: which evaluations ran (on what) and which did not (why)."""
    evaluations = report.get("evaluations")
    if not evaluations:
        return []
    lines = ["## Evaluations", "", "| evaluation | ran | on / why not |", "|---|---|---|"]
    for name, e in evaluations.items():
        lines.append(f"| {name} | {'yes' if e.get('ran') else 'no'} | {e.get('on') if e.get('ran') else e.get('why')} |")
    return lines + [""]


def format_table(report: Mapping, keys: list[str] | None = None) -> str:
    """A compact terminal table of the headline metrics: before / after / delta when both exist, else all models."""
    models = list(report.get("models", {}))
    if "before" in models and "after" in models:
        cols, delta = ["before", "after"], True
    else:
        cols, delta = models, False
    keys = keys or HEADLINE
    label = dict(MAIN_ROWS)
    width = max(len(label.get(k, k)) for k in keys)
    head = f"{'metric':<{width}}  " + "  ".join(f"{c[:10]:>10}" for c in cols) + (f"  {'delta':>7}" if delta else "")
    lines = [head, "-" * len(head)]
    for k in keys:
        vals = [lookup(report["models"][c], k) for c in cols]
        if all(v is None for v in vals):
            continue
        line = f"{label.get(k, k):<{width}}  " + "  ".join(f"{_fmt(v):>10}" for v in vals)
        if delta:
            line += f"  {_delta(vals[1], vals[0]):>7}"
        lines.append(line)
    return "\n".join(lines)


def plot_report(report: Mapping, out_png: str | Path, keys: list[str] | None = None) -> None:
    """Grouped bar chart of the headline metrics, one bar per model (written atomically)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    models = list(report.get("models", {}))
    keys = [k for k in (keys or HEADLINE) if any(lookup(report["models"][m], k) is not None for m in models)]
    label = dict(MAIN_ROWS)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(keys)), 4.0))
    width = 0.8 / max(len(models), 1)
    for i, m in enumerate(models):
        vals = [lookup(report["models"][m], k) for k in keys]
        xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(keys))]
        ax.bar(xs, [v if v is not None else 0.0 for v in vals], width, label=m)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([label.get(k, k) for k in keys], rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.set_title("kclip evaluation")
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    from kclip.atomic import atomic_path

    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def write_report(report: Mapping, out_dir: str | Path) -> dict[str, Path]:
    """Write report.json, report.md and report.png into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "report.json", "md": out_dir / "report.md", "png": out_dir / "report.png"}
    atomic_write_text(paths["json"], json.dumps(json_safe(report), indent=2, allow_nan=False))
    atomic_write_text(paths["md"], render_markdown(report))
    plot_report(report, paths["png"])
    return paths
