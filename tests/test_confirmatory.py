"""The confirmatory machinery of the comparison: the declared primaries and their analysis (paired t, Holm, MDE),
8 seeds with their own data draws, the knowledge-free control teacher, and PCA-whitened targets."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from kclip.config import ConfigError, load_config
from kclip.control_teacher import (BUCKETS, DIM, HashedNgramTeacher, bucket, is_control, load_control, ngrams,
                                   projection)
from kclip.experiments.comparison import RunResult, RunSpec, confirmatory, plan_runs, protocol
from kclip.experiments.comparison_report import render_markdown
from kclip.experiments.design import (ARMS, CONFIRMATORY_TEACHERS, DEFAULTS, METRICS, POST_HOC, PRIMARIES,
                                      SENSITIVITY, TEACHER_ARMS, TEACHERS, distinct_heldout_seeds,
                                      seed_data_overrides)
from kclip.experiments.stats import holm, minimum_detectable_effect, paired_t_pvalue
from kclip.synthetic import Scene, heldout_combos
from kclip.targets import WHITEN_K, TeacherTargets, whiten_k, whitening_fit

# ------------------------------------------------------------------------------------------------ statistics


def test_holm_by_hand():
    # sorted: 0.01 x 3 = 0.03; 0.03 x 2 = 0.06; 0.04 x 1 = 0.04 -> max(0.06, 0.04) = 0.06 (step-down monotone)
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    # an endpoint not run (None) is not counted: m = 2
    assert holm([0.02, None, 0.5]) == [pytest.approx(0.04), None, pytest.approx(0.5)]
    assert holm([0.6, 0.7]) == [1.0, 1.0]  # capped at 1
    assert holm([]) == [] and holm([None]) == [None]


def test_paired_t_pvalue_by_hand():
    # d = 1, 2, 3: mean 2, sd 1, t = 2 sqrt(3); df = 2 has the closed form F(t) = 1/2 + t / (2 sqrt(2 + t^2))
    t = 2 * math.sqrt(3)
    assert paired_t_pvalue([1.0, 2.0, 3.0]) == pytest.approx(2 * (0.5 - t / (2 * math.sqrt(2 + t * t))), rel=1e-9)
    assert paired_t_pvalue([-1.0, -2.0, -3.0]) == pytest.approx(paired_t_pvalue([1.0, 2.0, 3.0]))  # two-sided
    assert paired_t_pvalue([1.0]) is None
    assert paired_t_pvalue([0.0, 0.0]) == 1.0 and paired_t_pvalue([2.0, 2.0]) == 0.0


def test_minimum_detectable_effect_by_hand():
    # n = 8, sd = 2: (t_{0.975,7} + t_{0.80,7}) * 2 / sqrt(8), table values 2.364624 and 0.896029
    assert minimum_detectable_effect(2.0, 8) == pytest.approx((2.364624 + 0.896029) * 2 / math.sqrt(8), abs=1e-5)
    # it shrinks with seeds and grows with the SD; the review's example: s = 3.3 at n = 3 is ~ 12 points
    assert minimum_detectable_effect(2.0, 16) < minimum_detectable_effect(2.0, 8)
    assert minimum_detectable_effect(4.0, 8) == pytest.approx(2 * minimum_detectable_effect(2.0, 8))
    assert minimum_detectable_effect(None, 8) is None and minimum_detectable_effect(1.0, 1) is None


# ------------------------------------------------------------------------------------------ the declared design


def test_primaries_are_declared_and_well_formed():
    assert 1 <= len(PRIMARIES) <= 3 and len({p.name for p in PRIMARIES}) == len(PRIMARIES)
    metrics = dict(METRICS)
    for p in PRIMARIES:
        assert p.metric in metrics and p.rationale
        for arm, teacher in (p.x, p.y):
            assert arm in ARMS
            assert (teacher is None) == (not ARMS[arm].per_teacher)
            assert teacher is None or teacher in CONFIRMATORY_TEACHERS
    assert not set(POST_HOC) & set(CONFIRMATORY_TEACHERS)
    assert set(SENSITIVITY) <= set(CONFIRMATORY_TEACHERS) and all(TEACHER_ARMS[t] == ("kclip",) for t in SENSITIVITY)


def test_teacher_variants_resolve():
    eol = load_config(None, TEACHERS["smollm2-eol-whiten"])
    assert eol.teacher.prompt == 'This sentence : "{}" means in one word:"' and eol.teacher.pooling == "last"
    assert eol.loss.target_norm == "whiten" and eol.loss.alpha == pytest.approx(1 / WHITEN_K)
    assert load_config(None, TEACHERS["oracle-a10"]).loss.alpha == 10
    assert load_config(None, TEACHERS["oracle-a100"]).loss.alpha == 100
    assert load_config(None, TEACHERS["oracle-b1"]).loss.beta == 1
    assert load_config(None, TEACHERS["hashed-ngrams"]).teacher.name == "hashed-ngrams"


def _fake_result(arm, teacher, seed, metrics):
    spec = RunSpec(f"seed{seed}/{teacher}/{arm}", arm, teacher, seed, None, [], Path("/nonexistent"))
    return RunResult(spec, {"models": {"after": metrics}}, True, 0.0, 0.0)


def test_confirmatory_analysis_and_report_order():
    """Per primary: the paired differences over seeds, the t-test, Holm over the primaries, the MDE; in the
    Markdown the protocol comes before the results and every other table is labelled exploratory."""
    seeds = [0, 1, 2, 3]
    rng = np.random.default_rng(0)
    results = []
    for s in seeds:
        base = float(rng.normal(50, 2))
        results.append(_fake_result("contrastive", None, s, {"attribute_heldout_top1": base,
                                                             "text_token_acc_heldout": 40.0}))
        for t, shift in (("smollm2-eol-whiten", 5.0), ("hashed-ngrams", 0.0)):
            results.append(_fake_result("kclip", t, s, {"attribute_heldout_top1": base + shift + 0.1 * s,
                                                        "text_token_acc_heldout": 40.0 + shift + s}))
            results.append(_fake_result("shuffled", t, s, {"text_token_acc_heldout": 40.0 + 0.5 * s}))
    rows = confirmatory(results, seeds)
    assert [r["name"] for r in rows] == [p.name for p in PRIMARIES]
    ps = []
    for p, r in zip(PRIMARIES, rows):
        def val(arm, teacher, s):
            res = next(x for x in results if (x.spec.arm, x.spec.teacher, x.spec.seed) ==
                       (arm, teacher if ARMS[arm].per_teacher else None, s))
            return res.report["models"]["after"][p.metric]
        d = [val(*p.x, s) - val(*p.y, s) for s in seeds]
        assert r["per_seed"] == pytest.approx(d) and r["n"] == 4
        assert r["p"] == pytest.approx(paired_t_pvalue(d))
        assert r["mde"] == pytest.approx(minimum_detectable_effect(float(np.std(d, ddof=1)), 4))
        ps.append(r["p"])
    assert [r["p_holm"] for r in rows] == pytest.approx(holm(ps))
    assert all(r["rejected"] == (r["p_holm"] < 0.05) for r in rows)

    over = {s: seed_data_overrides(s) for s in seeds}
    result = {"command": "python -m kclip.experiments.comparison --out x", "git_rev": "abc",
              "protocol": protocol(seeds, over, ["smollm2-eol-whiten", "hashed-ngrams", "smollm2-std"]),
              "versions": {}, "machine": {"cpu": "c", "cpus": 2, "platform": "p", "load_average_at_end": None},
              "wall_seconds": 1.0, "cpu_seconds": 1.0, "runs_seconds": 1.0, "n_runs_reused": 0, "seeds": seeds,
              "n_val_images": 16, "epochs": 1, "pretrain_epochs": 1, "pretrain_images": 48, "text_em_steps": 10,
              "arms": list(ARMS), "teacher_overrides": {"smollm2-std": TEACHERS["smollm2-std"]},
              "pretrain": {"0": {"student": "/p/student.safetensors", "run_dir": "/p"}},
              "confirmatory": rows, "runs": [],
              "teachers": {"smollm2-std": {"arms": {}, "differences": {}}}}
    md = render_markdown(result)
    first_result = md.index("## Confirmatory result")
    assert md.index("## Declared protocol") < md.index("## Provenance") < first_result
    for p in PRIMARIES:
        assert md.index(p.rationale) < first_result
    assert md.index("## Exploratory") > first_result
    assert "## Exploratory — Teacher: smollm2-std" in md and "added post hoc, after the first results were seen" in md
    assert "Teacher: smollm2-std" not in md[:md.index("## Exploratory")]
    assert "Holm" in md and "MDE" in md


# --------------------------------------------------------------------------------------- seeds and their data


def test_seeds_vary_the_data_draw_and_the_heldout_combos(tmp_path):
    assert tuple(DEFAULTS["seeds"]) == tuple(range(8))
    seeds = list(DEFAULTS["seeds"])
    over = {s: seed_data_overrides(s) for s in seeds}
    specs = plan_runs(tmp_path, None, {"minilm": TEACHERS["minilm"]}, seeds,
                      {s: tmp_path / f"pre{s}" / "student.safetensors" for s in seeds}, {s: f"k{s}" for s in seeds},
                      ["contrastive", "kclip"], ["train.epochs=1"], seed_overrides=over)
    held_by_seed, caches = {}, {}
    for spec in specs:
        cfg = load_config(None, spec.overrides)
        assert cfg.data.synthetic.seed == spec.seed and cfg.seed == spec.seed
        assert cfg.model.pretrained == str(tmp_path / f"pre{spec.seed}" / "student.safetensors")
        held_by_seed.setdefault(spec.seed, set()).add(
            tuple(heldout_combos(cfg.data.synthetic.heldout_combos, cfg.data.synthetic.heldout_seed)))
        caches.setdefault(spec.seed, set()).add(cfg.teacher.cache_dir)
    assert all(len(h) == 1 for h in held_by_seed.values())  # the arms of a seed share its held-out combos
    sets = [next(iter(held_by_seed[s])) for s in seeds]
    # the grammar's heldout_combos has 4 distinct sets (one diagonal offset); 8 seeds use each twice
    assert len(distinct_heldout_seeds()) == 4 and len(set(sets)) == 4
    assert all(sets.count(x) == 2 for x in set(sets))
    assert sets[0] != sets[1]  # neighbouring seeds differ
    # every seed has its own teacher caches (its own captions)
    assert len(set().union(*caches.values())) == 2 * len(seeds)


def test_sensitivity_variants_run_only_arm_b(tmp_path):
    teachers = {t: TEACHERS[t] for t in ("minilm", "oracle-a10")}
    specs = plan_runs(tmp_path, None, teachers, [0], tmp_path / "s", "k", list(ARMS), ["train.epochs=1"])
    names = sorted(s.name for s in specs)
    assert names == sorted(["seed0/contrastive", "seed0/oracle", "seed0/minilm/kclip", "seed0/minilm/shuffled",
                            "seed0/oracle-a10/kclip"])
    a10 = next(s for s in specs if s.teacher == "oracle-a10")
    d = next(s for s in specs if s.arm == "oracle")
    cfg, cfg_d = load_config(None, a10.overrides), load_config(None, d.overrides)
    assert cfg.loss.alpha == 10 and cfg.loss.beta == 0.01 and cfg_d.loss.alpha == 1
    assert cfg.teacher.cache_dir == cfg_d.teacher.cache_dir  # one oracle cache per data draw


# --------------------------------------------------------------------------------------- the control teacher


def test_control_teacher_is_deterministic_caption_specific_and_knows_only_words():
    t = load_control("hashed-ngrams")
    assert is_control("Hashed-Ngrams ") and t.dim == DIM
    caps = ["a small red circle above a large blue square", "a large blue square below a small red circle",
            "a small green circle above a large blue square"]
    v = t.encode(caps)
    assert v.shape == (3, DIM) and v.dtype == torch.float32
    assert torch.equal(v, HashedNgramTeacher().encode(caps))  # deterministic across instances
    assert torch.equal(t.encode(caps[:1])[0], v[0])
    assert not torch.allclose(v[0], v[1]) and not torch.allclose(v[0], v[2])  # caption-specific
    assert np.array_equal(projection(), projection()) and projection().shape == (BUCKETS, DIM)
    # the same words in another order differ only through the bigrams
    a, b = "a red circle above a blue square", "a blue square above a red circle"
    assert sorted(ngrams(a)[:7]) == sorted(ngrams(b)[:7])
    ca, cb = t.counts(t.tokenize([a, b]))
    uni = t.counts([[bucket(w) for w in ngrams(a)[:7]]])[0]
    np.testing.assert_array_equal(uni, t.counts([[bucket(w) for w in ngrams(b)[:7]]])[0])
    bi_a = t.counts([[bucket(g) for g in ngrams(a)[7:]]])[0]
    bi_b = t.counts([[bucket(g) for g in ngrams(b)[7:]]])[0]
    np.testing.assert_array_equal(ca - cb, bi_a - bi_b)
    np.testing.assert_allclose(t.encode([a])[0] - t.encode([b])[0],
                               torch.from_numpy((bi_a - bi_b) @ t.projection), atol=1e-5)
    # no knowledge: an unseen word is just another bucket; a scene's two phrasings share no canonical form
    p = Scene("small", "red", "circle", "above", "large", "blue", "square").phrasings()
    e = t.encode(p[:2])
    assert not torch.allclose(e[0], e[1])
    with pytest.raises(ValueError, match="teacher.prompt"):
        load_control("hashed-ngrams", prompt='"{}"')


def test_control_teacher_cache_and_pipeline_dispatch(tmp_path):
    from kclip.cache import build_cache, open_cache
    from kclip.pipeline.stages import _load_teacher

    teacher = _load_teacher(load_config(None, ["teacher.name=hashed-ngrams"]), "cpu")
    assert isinstance(teacher, HashedNgramTeacher)
    caps = Scene("small", "red", "circle", "above", "large", "blue", "square").phrasings()
    build_cache(teacher, caps, tmp_path / "c", progress=False)
    cache = open_cache(tmp_path / "c")
    assert cache.manifest.dim == DIM and cache.manifest.teacher_describe["name"] == "hashed-ngrams"
    assert cache.manifest.teacher_describe["fingerprint"] == teacher.fingerprint
    np.testing.assert_allclose(cache.get(np.arange(4), dtype=np.float32), teacher.encode(caps).numpy(),
                               rtol=2e-3, atol=2e-3)  # the cache stores fp16


# --------------------------------------------------------------------------------------------- whitening


class _Mem:
    """A stand-in cache over an in-memory (N, d) array."""

    def __init__(self, x):
        self.x = np.asarray(x, dtype=np.float32)
        self.dim = self.x.shape[1]

    def __len__(self):
        return len(self.x)

    def get(self, rows, dtype=np.float32):
        return self.x[np.asarray(rows)].astype(dtype)


def _correlated(n, d, seed):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) * np.linspace(3, 0.1, d)[:, None]
    return rng.normal(size=(n, d)) @ mix + 5.0


def test_whitening_identity_covariance_and_val_uses_the_train_fit():
    train, val = _Mem(_correlated(500, 20, 0)), _Mem(_correlated(100, 20, 1) * 2.0)
    t = TeacherTargets(train, "whiten-8")
    w = np.asarray(t)                                                             # (500, 8)
    assert t.dim == 8 and w.shape == (500, 8) and t.shape == (500, 8)
    np.testing.assert_allclose(w.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(np.cov(w, rowvar=False, ddof=0), np.eye(8), atol=1e-3)
    v = TeacherTargets(val, "whiten-8", fit=train)
    np.testing.assert_allclose(np.asarray(v), (val.x - t.mean) @ t.whitener, rtol=1e-5, atol=1e-4)
    own = TeacherTargets(val, "whiten-8")  # fitted on itself: another map
    assert not np.allclose(np.asarray(own), np.asarray(v), atol=1e-2)
    assert np.asarray(t.batch([3, 1])).dtype == np.float16 and np.allclose(t.batch([3, 1]), w[[3, 1]], atol=1e-2)
    # rank-deficient targets keep only the components with variance; "whiten" is 64 components
    low = _Mem(np.repeat(_correlated(300, 3, 2), 4, axis=1))                    # (300, 12) of rank 3
    assert TeacherTargets(low, "whiten").dim == 3
    assert whiten_k("whiten") == WHITEN_K == 64 and whiten_k("whiten-5") == 5 and whiten_k("whiten-0") is None
    assert whiten_k("l2") is None
    # deterministic (sign-fixed eigenvectors)
    np.testing.assert_array_equal(whitening_fit(train, 8)[1], whitening_fit(train, 8)[1])


def test_whitening_of_the_val_cache_fits_on_its_train_sibling(tmp_path):
    from kclip.cache import build_cache, open_cache

    teacher = HashedNgramTeacher()
    scenes = [Scene(sa, ca, ha, r, sb, cb, hb) for sa, ca, ha, r, sb, cb, hb in
              [("small", "red", "circle", "above", "large", "blue", "square"),
               ("large", "green", "cross", "to the left of", "small", "yellow", "triangle"),
               ("small", "purple", "square", "below", "small", "red", "cross"),
               ("large", "blue", "triangle", "to the right of", "large", "green", "circle")]]
    train_caps = [c for s in scenes for c in s.phrasings()]
    build_cache(teacher, train_caps, tmp_path / "c" / "train", progress=False)
    build_cache(teacher, train_caps[::-2], tmp_path / "c" / "val", progress=False)
    tr, va = open_cache(tmp_path / "c" / "train"), open_cache(tmp_path / "c" / "val")
    t_val = TeacherTargets(va, "whiten-4")
    assert t_val.fit_source == str(tmp_path / "c" / "train")
    t_train = TeacherTargets(tr, "whiten-4")
    np.testing.assert_array_equal(t_val.whitener, t_train.whitener)
    np.testing.assert_array_equal(t_val.mean, t_train.mean)


def test_whiten_config_values():
    assert load_config(None, ["loss.target_norm=whiten"]).loss.target_norm == "whiten"
    assert load_config(None, ["loss.target_norm=whiten-16"]).loss.target_norm == "whiten-16"
    for bad in ("whiten-0", "whitened", "pca"):
        with pytest.raises(ConfigError, match="loss.target_norm"):
            load_config(None, [f"loss.target_norm={bad}"])


def test_whitened_control_teacher_through_the_pipeline(tmp_path):
    """teach -> concepts -> train with the control teacher and whitened targets: W_e's width is k, the concepts
    and L_emb see the whitened rows, the held-out R^2 is scored against val targets under the train fit."""
    from kclip.pipeline import run
    from test_comparison import SMALL  # tests/ is on sys.path (pytest's rootdir-relative import)

    cfg = load_config(None, [f"run_dir={tmp_path}", "teacher.name=hashed-ngrams", "loss.target_norm=whiten-8",
                             "data.synthetic.n_val_images=8", "train.epochs=1", "eval.text_em_steps=10", *SMALL])
    report = run(cfg, progress=False)
    from kclip.concepts import load_concepts
    c = load_concepts(tmp_path / "concepts")
    assert c["centroids"].shape[1] == 8 and c["classifier.weight"].shape[1] == 8
    done = json.loads((tmp_path / "train_done.json").read_text())
    assert done.get("distill_r2") is not None and math.isfinite(done["distill_r2"])
    assert (tmp_path / "eval" / "report.json").is_file() and report is not None
