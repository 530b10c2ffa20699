"""kclip.teacher: pooling, length-bucketed batching, int8 (bitsandbytes on CPU), the default MiniLM, frozen.

A tiny Llama (hidden 64, 2 layers, 4 heads) with a tiny WordLevel tokenizer is built and saved locally, then
loaded through the real ``load_teacher(path)`` -> ``AutoModel.from_pretrained`` path.
"""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TOL
from kclip.teacher import (DEFAULT_TEACHER, Teacher, TeacherNotFoundError, count_quantized, default_teacher_path,
                           load_teacher, naive_batches, padding_efficiency, plan_batches, resolve_teacher)

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
    assert t.id == str(path.resolve())
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

    folder, name, rev = resolve_teacher(DEFAULT_TEACHER)
    assert folder == default_teacher_path() and (folder / "model.safetensors").is_file()
    assert resolve_teacher("sentence-transformers/all-MiniLM-L6-v2")[0] == folder
    t = load_teacher(precision="int8", device="cpu")  # the default name
    assert t.name == DEFAULT_TEACHER and t.dim == 384 and not t.is_decoder
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
    with pytest.raises(TeacherNotFoundError, match="no network: download meta-llama/Llama-2-7b-hf"):
        load_teacher("meta-llama/Llama-2-7b-hf", device="cpu")
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
