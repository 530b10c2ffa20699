"""Text-reconstruction probe (Kamath et al.): autoencoder first, frozen decoder, then Linear + LayerNorm maps.

The captions are the synthetic set's (closed vocabulary of ~25 words). Two colour-shape pairs never occur
in the probe's training captions; the "heldout" split holds exactly the captions that contain one.
"""
import random

import pytest
import torch

from kclip.eval.text_em import (ProbeConfig, TextProbe, WordVocab, match_metrics, split_captions, text_em_probe,
                                text_em_table, tokenize)
from kclip.synthetic import COLORS, RELATIONS, SHAPES, SIZES, Scene

HELD = {("red", "circle"), ("blue", "square")}


def _pool(seed):
    """Distinct captions: (allowed, held-out) lists, each sorted."""
    rng = random.Random(seed)
    allowed, held = set(), set()
    while len(allowed) < 760 or len(held) < 60:
        s = Scene(rng.choice(list(SIZES)), rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(RELATIONS),
                  rng.choice(list(SIZES)), rng.choice(list(COLORS)), rng.choice(SHAPES))
        caption = s.phrasings()[rng.randrange(2)]
        if {(s.color_a, s.shape_a), (s.color_b, s.shape_b)} & HELD:
            if len(held) < 60:
                held.add(caption)
        elif len(allowed) < 760:
            allowed.add(caption)
    return sorted(allowed), sorted(held)


ALLOWED, HELDOUT = _pool(0)
FIT, IN_DIST = split_captions(ALLOWED, 100, seed=0)
SPLITS = {"in_distribution": IN_DIST, "heldout": HELDOUT}
CFG = ProbeConfig(ae_steps=300, map_steps=150, batch_size=32, seed=0)


class Linear:
    """An invertible linear function of the autoencoder's own single-vector embedding."""
    name = "linear"

    def __init__(self, probe, seed=1):
        g = torch.Generator().manual_seed(seed)
        d = probe.config.d_model
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
        self.a = q * torch.exp(torch.randn(d, generator=g) * 0.5)  # (d, d): rotation and per-axis scales
        self.probe = probe

    def encode_texts(self, texts):
        return self.probe.autoencoder_embeddings(texts) @ self.a  # (n, d)


class Constant:
    name = "constant"

    def encode_texts(self, texts):
        return torch.ones(len(texts), 16)


class Random:
    """Fresh noise on every call: carries nothing about the caption."""
    name = "random"

    def __init__(self):
        self.g = torch.Generator().manual_seed(2)

    def encode_texts(self, texts):
        return torch.randn(len(texts), 32, generator=self.g)


class Code:
    """A fixed random linear code of (position, word) one-hots: deterministic and informative."""
    name = "code"
    WORDS = sorted({w for c in ALLOWED + HELDOUT for w in tokenize(c)})
    TABLE = torch.randn(14 * len(WORDS), 48, generator=torch.Generator().manual_seed(0))

    def encode_texts(self, texts):
        onehot = torch.zeros(len(texts), 14 * len(self.WORDS))
        for i, t in enumerate(texts):
            for j, w in enumerate(tokenize(t)):
                onehot[i, j * len(self.WORDS) + self.WORDS.index(w)] = 1.0
        return onehot @ self.TABLE  # (n, 48)


class Counting(Constant):
    def __init__(self):
        self.calls = []

    def encode_texts(self, texts):
        self.calls.append(len(texts))
        return torch.randn(len(texts), 8)


@pytest.fixture(scope="module")
def fitted():
    probe = TextProbe(CFG)
    poc = probe.fit_autoencoder(FIT, SPLITS)
    decoder_before = {k: v.clone() for k, v in probe.backend.decoder.state_dict().items()}
    encoders = {"linear": Linear(probe), "constant": Constant(), "random": Random()}
    rows = {}
    for name, enc in encoders.items():
        stats = probe.fit_map(enc, FIT)
        rows[name] = {"stats": stats, "splits": probe.evaluate(enc, SPLITS)}
    return probe, poc, decoder_before, encoders, rows


def test_tokenize_vocab_and_metrics():
    assert tokenize("There is a Cat, ok.") == ["there", "is", "a", "cat", ",", "ok", "."]
    v = WordVocab.build(["a b", "b c"])
    assert v.words == ["<pad>", "<bos>", "<eos>", "<unk>", "a", "b", "c"]
    assert v.encode("a d c") == [4, 3, 6] and v.decode([4, 6, 2, 5]) == ["a", "c"]
    m = match_metrics([["a", "b"], ["a", "x", "c"], []], [["a", "b"], ["a", "b"], ["c"]])
    assert m["em"] == pytest.approx(100 / 3)
    # matches: 2 + 1 + 0 over max lengths 2 + 3 + 1
    assert m["token_acc"] == pytest.approx(100 * 3 / 6) and m["n"] == 3


def test_split_captions_disjoint_and_seeded():
    caps = ["a", "b", "c", "a", "d", "e", "b"]
    fit, held = split_captions(caps, 2, seed=0)
    assert len(held) == 2 and len(set(held)) == 2 and not set(held) & set(fit)
    # every row of a held caption leaves the fit set (duplicates too); the rest stay, in order
    assert set(fit) | set(held) == set(caps) and fit == [c for c in caps if c not in held]
    assert split_captions(caps, 2, seed=0) == (fit, held)
    with pytest.raises(ValueError, match="distinct captions"):
        split_captions(caps, 5, seed=0)
    assert len(FIT) == 660 and len(IN_DIST) == 100 and not set(FIT) & set(IN_DIST)


def test_autoencoder_reconstructs_closed_vocabulary(fitted):
    _, poc, _, _, _ = fitted
    ind = poc["splits"]["in_distribution"]
    assert ind["em"] >= 90.0, ind                      # the probe can reconstruct at all
    assert ind["token_acc"] >= 98.0, ind
    assert poc["n_train"] == len(FIT) and poc["steps"] == CFG.ae_steps
    assert poc["vocab_size"] == 4 + len({w for c in FIT for w in tokenize(c)})
    assert 0.0 <= poc["splits"]["heldout"]["em"] <= 100.0


def test_maps_discriminate_informative_from_uninformative_encoders(fitted):
    _, poc, _, _, rows = fitted
    lin = rows["linear"]["splits"]["in_distribution"]
    assert lin["em"] >= 85.0, lin                      # an exact solution exists: the map finds it
    for name in ("constant", "random"):
        for split in SPLITS:
            bad = rows[name]["splits"][split]
            assert bad["em"] <= 2.0, (name, split, bad)
            assert bad["token_acc"] < lin["token_acc"] - 30.0, (name, split, bad)
    assert rows["linear"]["stats"]["final_loss"] < rows["constant"]["stats"]["final_loss"]
    assert rows["linear"]["stats"]["dim"] == CFG.d_model and rows["constant"]["stats"]["dim"] == 16


def test_decoder_frozen_while_maps_train(fitted):
    probe, _, decoder_before, _, rows = fitted
    after = probe.backend.decoder.state_dict()
    assert all(torch.equal(decoder_before[k], after[k]) for k in decoder_before)
    assert not any(p.requires_grad for p in probe.backend.decoder.parameters())
    # the maps did train (so the frozen check is not vacuous): the linear map's loss fell far below chance
    assert rows["linear"]["stats"]["final_loss"] < 0.1 < rows["constant"]["stats"]["final_loss"]


def test_split_counts(fitted):
    probe, poc, _, encoders, rows = fitted
    for result in (poc["splits"], rows["linear"]["splits"]):
        assert set(result) == {"in_distribution", "heldout"}
        assert result["in_distribution"]["n"] == 100 and result["heldout"]["n"] == 60
        assert result["in_distribution"]["n_in_train"] == 0 and result["heldout"]["n_in_train"] == 0
        assert result["in_distribution"]["n_oov"] == 0 and result["heldout"]["n_oov"] == 0
    extra = {"mixed": [FIT[0], FIT[0], "a small pink circle above a large red square"]}
    m = probe.evaluate(encoders["linear"], extra)["mixed"]
    assert (m["n"], m["n_in_train"], m["n_oov"]) == (3, 2, 1)
    assert m["em"] <= 100 * 2 / 3                     # the out-of-vocabulary caption can never match


def test_errors_and_embedding_cache():
    probe = TextProbe(CFG, ae_steps=2, map_steps=2)
    enc = Counting()
    with pytest.raises(RuntimeError, match="fit_autoencoder"):
        probe.fit_map(enc)
    probe.fit_autoencoder(FIT[:50])
    with pytest.raises(ValueError, match="same training captions"):
        probe.fit_map(enc, FIT[:40])
    with pytest.raises(RuntimeError, match="no map"):
        probe.evaluate(enc, SPLITS)
    probe.fit_map(enc, FIT[:50])
    probe.evaluate(enc, SPLITS)
    probe.evaluate(enc, SPLITS)
    probe.fit_map(enc)
    assert sum(enc.calls) == 50 + 100 + 60             # each caption list embedded once
    with pytest.raises(ValueError, match="no words"):
        probe.evaluate(enc, {"empty": [""]})
    with pytest.raises(ValueError, match="decoder is 'gpt'"):
        ProbeConfig(decoder="gpt")


def test_train_caption_cap_is_a_seeded_sample():
    caps = FIT[:120]
    a, b = TextProbe(CFG, ae_steps=2, map_steps=2, max_train_captions=50), TextProbe(CFG, ae_steps=2, map_steps=2,
                                                                                  max_train_captions=50)
    assert a.fit_autoencoder(caps)["n_train"] == 50 and b.fit_autoencoder(caps)["n_train"] == 50
    assert a.train_captions == b.train_captions and set(a.train_captions) <= set(caps)
    assert a.train_captions == [c for c in caps if c in set(a.train_captions)]  # original order kept
    enc = Counting()
    a.fit_map(enc, caps)                              # the list given to fit_autoencoder, not the sample
    assert enc.calls == [50]                          # only the sample is embedded

    class Precomputed:
        name = "precomputed"

        def encode_texts(self, texts):
            raise AssertionError("the precomputed rows should have been used")

    pre = Precomputed()
    b.set_embeddings(pre, caps, Code().encode_texts(caps))  # for the whole list: the sample's rows are picked
    assert b.fit_map(pre)["final_loss"] == pytest.approx(b.fit_map(Code())["final_loss"], rel=1e-4)


def _strip(result):
    """A result without its wall-clock fields."""
    if isinstance(result, dict):
        return {k: _strip(v) for k, v in result.items() if k != "seconds"}
    return result


def test_deterministic_under_seed():
    small = dict(ae_steps=15, map_steps=10, seed=3)
    a = text_em_table({"code": Code()}, FIT[:120], {"ind": IN_DIST[:20]}, CFG, **small)
    b = text_em_table({"code": Code()}, FIT[:120], {"ind": IN_DIST[:20]}, CFG, **small)
    assert _strip(a) == _strip(b)
    c = text_em_table({"code": Code()}, FIT[:120], {"ind": IN_DIST[:20]}, CFG, **{**small, "seed": 4})
    assert c["autoencoder"]["final_loss"] != a["autoencoder"]["final_loss"]
    assert c["encoders"]["code"]["final_loss"] != a["encoders"]["code"]["final_loss"]
    assert a["config"]["seed"] == 3 and a["encoders"]["code"]["splits"]["ind"]["n"] == 20


def test_backwards_entry_point_with_precomputed_embeddings():
    code = Code()
    a = text_em_probe(code, FIT[:100], IN_DIST[:20], steps=8, seed=3)
    b = text_em_probe(None, FIT[:100], IN_DIST[:20], steps=8, seed=3, train_emb=code.encode_texts(FIT[:100]),
                      test_emb=code.encode_texts(IN_DIST[:20]))
    assert a["final_loss"] == b["final_loss"] and a["em"] == b["em"] and a["examples"] == b["examples"]
    assert a["n_test"] == 20 and a["n_train"] == 100 and a["steps"] == 8
    assert set(a["autoencoder"]) == {"em", "token_acc"}


def test_t5_decoder_path(tmp_path):
    """The optional T5 path runs the same protocol end to end on a tiny random T5 saved locally."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(Code.WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                                unk_token="<unk>")
    fast.save_pretrained(tmp_path)
    cfg = transformers.T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                num_decoder_layers=1, num_heads=4, decoder_start_token_id=0, pad_token_id=0,
                                eos_token_id=1)
    transformers.T5ForConditionalGeneration(cfg).save_pretrained(tmp_path)
    probe = TextProbe(ProbeConfig(decoder=f"t5:{tmp_path}", ae_steps=3, map_steps=3, batch_size=16))
    poc = probe.fit_autoencoder(FIT[:64], {"ind": IN_DIST[:8]})
    frozen = {k: v.clone() for k, v in probe.backend.t5.decoder.state_dict().items()}
    enc = Random()
    probe.fit_map(enc)
    r = probe.evaluate(enc, {"ind": IN_DIST[:8], "oov": ["a pink circle"]})
    assert poc["splits"]["ind"]["n"] == 8 and 0.0 <= r["ind"]["em"] <= 100.0 and r["oov"]["n_oov"] == 1
    assert all(torch.equal(frozen[k], v) for k, v in probe.backend.t5.decoder.state_dict().items())
