"""Text-reconstruction probe: an order-preserving 'encoder' reconstructs, a constant one cannot."""
import random

import pytest
import torch

from kclip.eval.text_em import WordVocab, match_metrics, text_em_probe, tokenize
from kclip.synthetic import COLORS, RELATIONS, SHAPES, SIZES, Scene


def _captions(n, seed):
    rng = random.Random(seed)
    out = set()
    while len(out) < n:
        out.add(Scene(rng.choice(list(SIZES)), rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(RELATIONS),
                      rng.choice(list(SIZES)), rng.choice(list(COLORS)), rng.choice(SHAPES)).phrasings()[0])
    return sorted(out)


ALL = _captions(2060, 0)
TRAIN, TEST = ALL[:2000], ALL[2000:]
WORDS = sorted({w for c in ALL for w in tokenize(c)})


class OrderedBagOfWords:
    """A lossless encoder: one-hot of the word at each position, concatenated (raw, not normalised)."""
    name = "ordered"

    def encode_texts(self, texts):
        out = torch.zeros(len(texts), 14 * len(WORDS))
        for i, t in enumerate(texts):
            for j, w in enumerate(tokenize(t)):
                out[i, j * len(WORDS) + WORDS.index(w)] = 1.0
        return out


class ConstantText:
    name = "constant"

    def encode_texts(self, texts):
        return torch.ones(len(texts), 16)


def test_tokenize_vocab_and_metrics():
    assert tokenize("There is a Cat, ok.") == ["there", "is", "a", "cat", ",", "ok", "."]
    v = WordVocab.build(["a b", "b c"])
    assert v.words == ["<pad>", "<bos>", "<eos>", "<unk>", "a", "b", "c"]
    assert v.encode("a d c") == [4, 3, 6] and v.decode([4, 6, 2, 5]) == ["a", "c"]
    m = match_metrics([["a", "b"], ["a", "x", "c"], []], [["a", "b"], ["a", "b"], ["c"]])
    assert m["em"] == pytest.approx(100 / 3)
    # matches: 2 + 1 + 0 over max lengths 2 + 3 + 1
    assert m["token_acc"] == pytest.approx(100 * 3 / 6) and m["n_test"] == 3


def test_lossless_encoder_reconstructs_constant_does_not():
    good = text_em_probe(OrderedBagOfWords(), TRAIN, TEST, steps=150, batch_size=64, seed=0)
    bad = text_em_probe(ConstantText(), TRAIN, TEST, steps=150, batch_size=64, seed=0)
    assert good["em"] >= 80.0, good
    assert good["token_acc"] >= 95.0, good
    assert bad["em"] <= 5.0, bad
    assert bad["token_acc"] < good["token_acc"] - 30.0, bad
    assert good["n_test"] == len(TEST) and good["n_train"] == len(TRAIN) and good["steps"] == 150
    assert good["final_loss"] < bad["final_loss"]


def test_deterministic_and_precomputed_embeddings():
    enc = OrderedBagOfWords()
    a = text_em_probe(enc, TRAIN[:100], TEST[:20], steps=5, seed=3)
    b = text_em_probe(None, TRAIN[:100], TEST[:20], steps=5, seed=3, train_emb=enc.encode_texts(TRAIN[:100]),
                      test_emb=enc.encode_texts(TEST[:20]))
    assert a["final_loss"] == b["final_loss"] and a["em"] == b["em"] and a["examples"] == b["examples"]
    assert torch.get_num_threads() >= 1
    with pytest.raises(ValueError, match="decoder is 'gpt'"):
        text_em_probe(enc, TRAIN[:10], TEST[:2], steps=1, decoder="gpt")


def test_t5_decoder_path(tmp_path):
    """The optional T5 path runs end to end on a tiny random T5 with a word-level tokenizer saved locally."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    try:
        transformers.T5ForConditionalGeneration  # noqa: B018 - resolves the lazy import
    except ImportError as exc:  # e.g. `python -m pytest` from the repo root puts kernels/ on sys.path
        pytest.skip(f"transformers' T5 cannot be imported here: {exc}")
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    from tokenizers.processors import TemplateProcessing
    tok.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                                unk_token="<unk>")
    fast.save_pretrained(tmp_path)
    cfg = transformers.T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                num_decoder_layers=1, num_heads=4, decoder_start_token_id=0, pad_token_id=0,
                                eos_token_id=1)
    transformers.T5ForConditionalGeneration(cfg).save_pretrained(tmp_path)
    r = text_em_probe(OrderedBagOfWords(), TRAIN[:64], TEST[:8], steps=3, batch_size=16, decoder=f"t5:{tmp_path}")
    assert r["decoder"].startswith("t5:") and r["n_test"] == 8 and 0.0 <= r["em"] <= 100.0
