"""Exact-match text reconstruction from a single frozen text embedding (paper Table 1; Kamath et al. 2023).

Question: how much of a caption survives in its embedding? Freeze the text encoder, embed each caption
once, and train a probe that must regenerate the caption word for word from that one vector.

The probe (default ``decoder="tiny"``):

- a fixed affine normalisation of the embedding (subtract the train-set mean, divide by one global
  scale so the mean per-dimension variance is 1: a reparametrisation of the linear map, there so raw
  LLM hidden states and unit vectors train alike under one learning rate), then a **linear map** to
  ``n_prefix`` vectors of width ``d_model`` and a **LayerNorm**: the only part that touches the
  embedding;
- a **tiny causal Transformer decoder** trained from scratch (pre-norm, ``n_layers`` x ``n_heads``,
  learned positions) over a word-level vocabulary built from the training captions (lower-cased;
  words and punctuation marks are tokens; ``<pad> <bos> <eos> <unk>``). The prefix vectors come
  first, then ``<bos> w1 ... wn``; the targets are ``w1 ... wn <eos>`` (teacher forcing). The map
  and the decoder train jointly (the decoder starts from nothing); the encoder never changes.
- a fixed budget: ``steps`` AdamW steps of ``batch_size`` captions (lr with linear warm-up over
  5% of the steps and cosine decay), seeded batch order and init; the same budget for every encoder.
- greedy decoding up to the longest training caption + 2 words.

Metrics on held-out captions (``test_captions``; on the synthetic set the validation captions, which
contain colour-shape combinations no training caption has): **exact match** = percent of captions
whose decoded word sequence equals the reference word sequence; **token accuracy** = matching words
at the same position / the longer of the two sequences, summed over captions (percent). Words outside
the training vocabulary can never be matched.

``decoder="t5:<path>"`` uses a pretrained T5 from a local folder instead (its decoder fine-tuned
jointly with the linear map + LayerNorm, which feed it ``n_prefix`` encoder states; T5's own
encoder is unused); words are compared the same way. Not needed on the embedded default.
"""
from __future__ import annotations

import contextlib
import math
import re
import time
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .encoders import encode_texts

PAD, BOS, EOS, UNK = 0, 1, 2, 3
_SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def tokenize(text: str) -> list[str]:
    """Lower-cased words and single punctuation marks: 'There is a cat, ok.' -> [there, is, a, cat, ',', ok, '.']."""
    return _WORD.findall(text.lower())


@dataclass
class WordVocab:
    """Word-level vocabulary; ids 0..3 are <pad> <bos> <eos> <unk>."""
    words: list[str]

    @classmethod
    def build(cls, captions: Sequence[str]) -> "WordVocab":
        seen = sorted({w for c in captions for w in tokenize(c)})
        return cls(list(_SPECIALS) + seen)

    def __post_init__(self):
        self.index = {w: i for i, w in enumerate(self.words)}

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, text: str) -> list[int]:
        return [self.index.get(w, UNK) for w in tokenize(text)]

    def decode(self, ids: Sequence[int]) -> list[str]:
        out = []
        for i in ids:
            if i == EOS:
                break
            if i not in (PAD, BOS):
                out.append(self.words[i])
        return out


class PrefixDecoder(nn.Module):
    """Linear map + LayerNorm from an embedding to ``n_prefix`` token vectors, then a tiny causal decoder.

    Shapes:
        forward(emb (B, D), tokens (B, L)) -> logits (B, L, V): position j predicts token j + 1.
    """

    def __init__(self, emb_dim: int, vocab_size: int, max_len: int, d_model: int = 64, n_layers: int = 2,
                 n_heads: int = 4, n_prefix: int = 4):
        super().__init__()
        self.n_prefix, self.d_model = n_prefix, d_model
        self.map = nn.Linear(emb_dim, n_prefix * d_model)
        self.map_norm = nn.LayerNorm(d_model)
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Parameter(torch.randn(n_prefix + max_len, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(d_model, n_heads, 4 * d_model, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.out_norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, emb: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        b, l = tokens.shape
        prefix = self.map_norm(self.map(emb).view(b, self.n_prefix, self.d_model))  # (B, P, d)
        x = torch.cat([prefix, self.tok(tokens)], dim=1) + self.pos[: self.n_prefix + l]  # (B, P+L, d)
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], dtype=x.dtype)  # (P+L, P+L)
        h = self.blocks(x, mask=mask, is_causal=True)  # (B, P+L, d)
        return self.head(self.out_norm(h[:, self.n_prefix:]))  # (B, L, V)

    @torch.no_grad()
    def greedy(self, emb: torch.Tensor, max_len: int) -> torch.Tensor:
        """(B, <= max_len) generated ids (without <bos>); rows stop being extended after <eos>."""
        tokens = torch.full((emb.shape[0], 1), BOS, dtype=torch.long)  # (B, 1)
        done = torch.zeros(emb.shape[0], dtype=torch.bool)
        for _ in range(max_len):
            nxt = self.forward(emb, tokens)[:, -1].argmax(dim=-1)  # (B,)
            nxt = nxt.masked_fill(done, PAD)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            done |= nxt == EOS
            if bool(done.all()):
                break
        return tokens[:, 1:]


def _pad(seqs: list[list[int]]) -> torch.Tensor:
    out = torch.full((len(seqs), max(map(len, seqs))), PAD, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def _lr_lambda(steps: int):
    warm = max(1, steps // 20)
    return lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm)))


def match_metrics(preds: Sequence[Sequence[str]], refs: Sequence[Sequence[str]]) -> dict:
    """Exact match and position-wise token accuracy (percent) of word sequences; see the module docstring."""
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions for {len(refs)} references")
    exact = sum(list(p) == list(r) for p, r in zip(preds, refs))
    hits = sum(sum(a == b for a, b in zip(p, r)) for p, r in zip(preds, refs))
    total = sum(max(len(p), len(r)) for p, r in zip(preds, refs))
    n = max(len(refs), 1)
    return {"em": 100.0 * exact / n, "token_acc": 100.0 * hits / total if total else 0.0, "n_test": len(refs)}


def _standardise(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre on the train mean and divide by ONE scalar so the mean per-dimension variance is 1.

    A single scale (not one per dimension) on purpose: a dimension that never varies in training but
    does on held-out captions (e.g. a feature for a held-out combination) would otherwise be divided
    by ~0 and swamp the probe. Centring removes the near-constant outlier dimensions of LLM states.
    """
    mean = train.mean(dim=0, keepdim=True)  # (1, D)
    scale = (train - mean).pow(2).mean().sqrt().clamp_min(1e-8)  # ()
    return (train - mean) / scale, (test - mean) / scale


def _train_tiny(train_emb, train_captions, test_emb, steps, batch_size, lr, seed, d_model, n_layers, n_heads, n_prefix,
                progress):
    vocab = WordVocab.build(train_captions)
    seqs = [vocab.encode(c) for c in train_captions]
    max_len = max(map(len, seqs)) + 2
    inputs = _pad([[BOS] + s for s in seqs])  # (N, L)
    targets = _pad([s + [EOS] for s in seqs])  # (N, L)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = PrefixDecoder(train_emb.shape[1], len(vocab), max_len + 1, d_model, n_layers, n_heads, n_prefix)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps))
    gen = torch.Generator().manual_seed(seed)
    n = train_emb.shape[0]
    losses = []
    order = torch.randperm(n, generator=gen)
    pos = 0
    from tqdm.auto import tqdm
    model.train()
    for _ in tqdm(range(steps), desc="text-EM probe", disable=not progress, leave=False):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos: pos + batch_size]
        pos += batch_size
        inp, tgt = inputs[idx], targets[idx]
        width = int((tgt != PAD).sum(dim=1).max())  # trim the batch to its longest caption
        logits = model(train_emb[idx], inp[:, :width])  # (b, L, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt[:, :width].reshape(-1), ignore_index=PAD)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    model.eval()
    preds = []
    for s in range(0, test_emb.shape[0], 512):
        preds += [vocab.decode(row.tolist()) for row in model.greedy(test_emb[s:s + 512], max_len)]
    return preds, losses, len(vocab)


def _train_t5(path, train_emb, train_captions, test_emb, steps, batch_size, lr, seed, n_prefix, progress):
    from transformers import AutoTokenizer, T5ForConditionalGeneration
    from transformers.modeling_outputs import BaseModelOutput

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        t5 = T5ForConditionalGeneration.from_pretrained(path, local_files_only=True)
        d = t5.config.d_model
        mapper = nn.Sequential(nn.Linear(train_emb.shape[1], n_prefix * d))
        norm = nn.LayerNorm(d)
    params, seen = [], set()  # lm_head is usually tied to the decoder's embedding: list each tensor once
    for p in [*mapper.parameters(), *norm.parameters(), *t5.decoder.parameters(), *t5.lm_head.parameters()]:
        if id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps))
    gen = torch.Generator().manual_seed(seed)

    def prefix(e):
        return norm(mapper(e).view(e.shape[0], n_prefix, d))  # (B, P, d)

    from tqdm.auto import tqdm
    t5.train()
    losses = []
    n = train_emb.shape[0]
    for _ in tqdm(range(steps), desc="text-EM probe (t5)", disable=not progress, leave=False):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen)
        labels = tok([train_captions[i] for i in idx.tolist()], return_tensors="pt", padding=True).input_ids
        labels = labels.masked_fill(labels == tok.pad_token_id, -100)
        out = t5(encoder_outputs=BaseModelOutput(last_hidden_state=prefix(train_emb[idx])), labels=labels)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(out.loss.detach()))
    t5.eval()
    max_new = max(len(tok(c).input_ids) for c in train_captions) + 4
    preds = []
    with torch.no_grad():
        for s in range(0, test_emb.shape[0], 256):
            e = test_emb[s:s + 256]
            ids = t5.generate(encoder_outputs=BaseModelOutput(last_hidden_state=prefix(e)), max_new_tokens=max_new,
                              do_sample=False, num_beams=1)
            preds += [tokenize(t) for t in tok.batch_decode(ids, skip_special_tokens=True)]
    return preds, losses, len(tok)


@contextlib.contextmanager
def _threads(n: int | None):
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fit_and_decode(decoder, train_emb, train_captions, test_emb, steps, batch_size, lr, seed, d_model, n_layers,
                    n_heads, n_prefix, progress):
    if decoder == "tiny":
        return _train_tiny(train_emb, train_captions, test_emb, steps, batch_size, lr, seed, d_model, n_layers,
                           n_heads, n_prefix, progress)
    if decoder.startswith("t5:"):
        return _train_t5(decoder[3:], train_emb, train_captions, test_emb, steps, batch_size, lr, seed, n_prefix,
                         progress)
    raise ValueError(f"decoder is {decoder!r}; use 'tiny' or 't5:<local folder with a T5 model + tokenizer>'")


def text_em_probe(encoder, train_captions: Sequence[str], test_captions: Sequence[str], steps: int = 300,
                  batch_size: int = 64, seed: int = 0, lr: float = 3e-3, decoder: str = "tiny", d_model: int = 64,
                  n_layers: int = 2, n_heads: int = 4, n_prefix: int = 4, embed_batch_size: int = 256,
                  train_emb: torch.Tensor | None = None, test_emb: torch.Tensor | None = None,
                  progress: bool = False, n_examples: int = 3, num_threads: int | None = 1) -> dict:
    """Train the reconstruction probe on ``encoder``'s frozen embeddings of ``train_captions``; test on ``test_captions``.

    Args:
        encoder: anything with ``encode_texts`` (its output is used as returned, not re-normalised).
        steps, batch_size, lr, seed: the fixed training budget (keep equal across encoders).
        decoder: "tiny" (from scratch) or "t5:<local folder>".
        num_threads: torch CPU threads while the probe trains (restored after; None = leave as is). One
            thread is fastest for this tiny model: more threads mostly add synchronisation.
        train_emb, test_emb: precomputed embeddings (skip encoding; then ``encoder`` may be None).

    Shapes:
        train_emb (Ntrain, D), test_emb (Ntest, D).

    Returns:
        {"em", "token_acc" (percent), "n_test", "n_train", "steps", "final_loss" (mean of the last 10
        steps), "vocab_size", "decoder", "seconds", "examples": up to ``n_examples`` failures as
        {"ref", "pred"}}.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps ({steps}) and batch_size ({batch_size}) must be >= 1")
    if not train_captions or not test_captions:
        raise ValueError("text_em_probe needs training and test captions")
    t0 = time.perf_counter()
    if train_emb is None:
        train_emb = encode_texts(encoder, train_captions, embed_batch_size, normalize=False)  # (Ntr, D)
    if test_emb is None:
        test_emb = encode_texts(encoder, test_captions, embed_batch_size, normalize=False)  # (Nte, D)
    if train_emb.shape[0] != len(train_captions) or test_emb.shape[0] != len(test_captions):
        raise ValueError("train_emb/test_emb rows must match the caption lists")
    train_emb, test_emb = _standardise(train_emb.float(), test_emb.float())
    with _threads(num_threads):
        preds, losses, vsize = _fit_and_decode(decoder, train_emb, list(train_captions), test_emb, steps, batch_size,
                                               lr, seed, d_model, n_layers, n_heads, n_prefix, progress)
    refs = [tokenize(c) for c in test_captions]
    out = match_metrics(preds, refs)
    out.update(n_train=len(train_captions), steps=steps, final_loss=sum(losses[-10:]) / len(losses[-10:]),
               vocab_size=vsize, decoder=decoder, seconds=time.perf_counter() - t0,
               examples=[{"ref": " ".join(r), "pred": " ".join(p)} for p, r in zip(preds, refs) if p != r][:n_examples])
    return out
