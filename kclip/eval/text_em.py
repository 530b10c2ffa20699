"""Exact-match text reconstruction from a single frozen text embedding (paper Table 1; Kamath et al. 2023).

Question: how much of a caption survives in a text encoder's single embedding vector? The probe follows
Kamath, Hessel & Chang ("Text encoders bottleneck compositionality in contrastive vision-language
models", EMNLP 2023), scaled down to run on a CPU:

1. **Proof of concept: an autoencoder.** A small text encoder of its own (bidirectional Transformer,
   mean-pooled to ONE vector) + an adapter (**Linear + LayerNorm** to ``n_prefix`` vectors of width
   ``d_model``: the decoder's input space) + a small causal Transformer decoder are trained together to
   reconstruct the training captions (:meth:`TextProbe.fit_autoencoder`). Its exact match is the
   proof-of-concept row: how well the probe can reconstruct at all through a single vector.
2. **The decoder is then frozen** (its parameters never change again).
3. **One map per frozen encoder under test** (CLIP students before/after, the teacher): only a new
   Linear(d_enc -> n_prefix * d_model) + LayerNorm(d_model), the same form as the autoencoder's adapter,
   is trained on the **same training captions** to feed the frozen decoder (:meth:`TextProbe.fit_map`).
   The encoder never changes either; each encoder's embeddings of each caption list are computed once
   and cached.
4. **Evaluate** (:meth:`TextProbe.evaluate`): greedy decoding (up to the longest training caption + 2
   words) on named caption splits the caller passes, e.g. an in-distribution split (captions from the
   training distribution that were NOT used to fit the probe; :func:`split_captions` makes one) and a
   held-out-combination split (on the synthetic set: the validation captions, whose colour-shape pairs
   never occur in training). The autoencoder is evaluated on the same splits.

Differences from Kamath et al. (on purpose, for a CPU budget): a word-level vocabulary built from the
training captions and a from-scratch 2-layer decoder instead of a pretrained T5-large (``decoder="t5:
<local folder>"`` runs the same protocol with a local T5 checkpoint instead); a fixed step budget.
Before the map, each encoder's embeddings are centred on their training mean and divided by one global
scale (mean per-dimension variance 1): an affine reparametrisation of the Linear, so raw LLM hidden
states and unit vectors train alike under one learning rate (a single scale, not one per dimension, so
a dimension that never varies in training cannot blow up on held-out captions).

Training: AdamW (weight decay 0.01), linear warm-up over 5% of the steps then cosine decay, gradient
clipping at 1, ``batch_size`` captions per step in a seeded order; every random choice (sub-sampling,
initialisation, batch order) comes from ``seed``; every map gets the same budget and batch order.

Caption count: a real CC3M run has millions of captions; the probe trains for a fixed number of steps,
so it uses at most ``max_train_captions`` of them (a seeded sample, recorded as ``n_train`` in the
result; default 100,000, which is also how many captions each encoder embeds once).

Metrics per split (percent): **exact match** (``em``) = captions whose decoded word sequence equals the
reference word sequence (lower-cased words and punctuation marks); **token accuracy** = words equal at
the same position / the longer of the two sequences, summed over the split. ``n`` is the number of
captions in the split as passed (duplicates count), ``n_oov`` how many hold a word outside the training
vocabulary (they can never match), ``n_in_train`` how many occur verbatim among the training captions.
With a ``slot_fn`` (a grammar that parses captions into slots, e.g. the synthetic set's), **slot accuracy**
(``slot_acc``) = slots stated right / slots in the references: the content, whatever the phrasing.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import random
import re
import time
from dataclasses import asdict, dataclass
from typing import Callable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .encoders import encode_texts, encoder_name

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


def match_metrics(preds: Sequence[Sequence[str]], refs: Sequence[Sequence[str]]) -> dict:
    """Exact match and position-wise token accuracy (percent) of word sequences; see the module docstring."""
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions for {len(refs)} references")
    exact = sum(list(p) == list(r) for p, r in zip(preds, refs))
    hits = sum(sum(a == b for a, b in zip(p, r)) for p, r in zip(preds, refs))
    total = sum(max(len(p), len(r)) for p, r in zip(preds, refs))
    n = max(len(refs), 1)
    return {"em": 100.0 * exact / n, "token_acc": 100.0 * hits / total if total else 0.0, "n": len(refs)}


SlotFn = Callable[[Sequence[str], Sequence[str]], "tuple[int, int]"]


def slot_accuracy(preds: Sequence[Sequence[str]], refs: Sequence[Sequence[str]], slot_fn: SlotFn) -> float:
    """Percent of the references' slots the predictions state right (``slot_fn`` scores one pair), phrasing
    ignored: the content a caption carries, where exact match and token accuracy also score the wording."""
    hits = [slot_fn(p, r) for p, r in zip(preds, refs)]
    total = sum(t for _, t in hits)
    return 100.0 * sum(h for h, _ in hits) / total if total else 0.0


def split_captions(captions: Sequence[str], n_eval: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Split a training-distribution caption list into (probe-fit, in-distribution evaluation) captions.

    Distinct caption strings are shuffled with ``seed``; ``n_eval`` of them form the evaluation split and
    every row whose string is not among them (duplicates included) stays for fitting, so no evaluation
    caption occurs verbatim in the fit set. Order within each part follows ``captions``.

    Raises:
        ValueError: ``n_eval`` < 1, or fewer than ``n_eval`` + 1 distinct captions.
    """
    distinct = sorted(set(captions))
    if n_eval < 1 or len(distinct) <= n_eval:
        raise ValueError(f"split_captions: n_eval is {n_eval} but there are {len(distinct)} distinct captions; "
                         f"n_eval must be >= 1 and leave at least one distinct caption for fitting")
    held = set(random.Random(seed).sample(distinct, n_eval))
    return [c for c in captions if c not in held], [c for c in dict.fromkeys(captions) if c in held]


@dataclass
class ProbeConfig:
    """The probe's sizes and budget (keep it equal across the encoders being compared).

    Attributes:
        decoder: "tiny" (word-level, from scratch) or "t5:<local folder with a T5 model + tokenizer>".
        d_model, n_heads: width and heads of the tiny encoder and decoder (t5: d_model is T5's own).
        n_layers, encoder_layers: depth of the tiny decoder and of the autoencoder's own encoder.
        n_prefix: the decoder input is ``n_prefix`` vectors of width d_model (default 1: the single
            vector a map writes into).
        ae_steps, map_steps: AdamW steps for the autoencoder and for each map.
        batch_size, lr, map_lr: captions per step; peak learning rates of the autoencoder and of the
            maps (a pretrained T5 wants a lower ``lr``, e.g. 3e-4).
        max_train_captions: a seeded sample of at most this many training captions is used.
        seed: seeds the sample, every initialisation and the batch order.
        embed_batch_size: captions per ``encode_texts`` call.
        num_threads: torch CPU threads while the probe trains/decodes (restored after; None = leave as
            is). One is fastest for this tiny model: more threads mostly add synchronisation.
        n_examples: failed reconstructions kept per split as {"ref", "pred"}.
    """
    decoder: str = "tiny"
    d_model: int = 64
    n_layers: int = 2
    encoder_layers: int = 1
    n_heads: int = 4
    n_prefix: int = 1
    ae_steps: int = 400
    map_steps: int = 200
    batch_size: int = 64
    lr: float = 3e-3
    map_lr: float = 1e-2
    max_train_captions: int = 100_000
    seed: int = 0
    embed_batch_size: int = 256
    num_threads: int | None = 1
    n_examples: int = 3
    progress: bool = False

    def __post_init__(self):
        for key in ("d_model", "n_layers", "encoder_layers", "n_heads", "n_prefix", "ae_steps", "map_steps",
                    "batch_size", "max_train_captions", "embed_batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"ProbeConfig.{key} is {getattr(self, key)}; it must be >= 1")
        if not (self.decoder == "tiny" or self.decoder.startswith("t5:")):
            raise ValueError(f"decoder is {self.decoder!r}; use 'tiny' or 't5:<local folder with a T5 model + "
                             f"tokenizer>'")


# ---------------------------------------------------------------------------------------------- modules


class Adapter(nn.Module):
    """Linear + LayerNorm from one vector into the decoder's input space: the only part a map trains.

    Shapes:
        forward(x (B, D_in)) -> (B, n_prefix, d_model)
    """

    def __init__(self, d_in: int, d_model: int, n_prefix: int):
        super().__init__()
        self.n_prefix, self.d_model = n_prefix, d_model
        self.linear = nn.Linear(d_in, n_prefix * d_model)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.linear(x).view(x.shape[0], self.n_prefix, self.d_model))  # (B, P, d)


def _blocks(d_model: int, n_heads: int, n_layers: int) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(d_model, n_heads, 4 * d_model, dropout=0.0, batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)


class TinyTextEncoder(nn.Module):
    """The autoencoder's own text encoder: bidirectional Transformer over word ids, mean-pooled to one vector.

    Shapes:
        forward(tokens (B, L) with PAD=0) -> (B, d_model)
    """

    def __init__(self, vocab_size: int, max_len: int, d_model: int, n_layers: int, n_heads: int):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Parameter(torch.randn(max_len, d_model) * 0.02)
        self.blocks = _blocks(d_model, n_heads, n_layers)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        keep = tokens != PAD  # (B, L)
        h = self.blocks(self.tok(tokens) + self.pos[: tokens.shape[1]], src_key_padding_mask=~keep)  # (B, L, d)
        h = self.norm(h) * keep[..., None]  # (B, L, d)
        return h.sum(dim=1) / keep.sum(dim=1, keepdim=True).clamp_min(1)  # (B, d)


class TinyDecoder(nn.Module):
    """Causal Transformer decoder: the prefix vectors come first, then ``<bos> w1 ... wn``.

    Shapes:
        forward(prefix (B, P, d), tokens (B, L)) -> logits (B, L, V): position j predicts token j + 1.
    """

    def __init__(self, vocab_size: int, max_len: int, d_model: int, n_layers: int, n_heads: int, n_prefix: int):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Parameter(torch.randn(n_prefix + max_len, d_model) * 0.02)
        self.blocks = _blocks(d_model, n_heads, n_layers)
        self.out_norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, prefix: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        p = prefix.shape[1]
        x = torch.cat([prefix, self.tok(tokens)], dim=1) + self.pos[: p + tokens.shape[1]]  # (B, P+L, d)
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], dtype=x.dtype)  # (P+L, P+L)
        h = self.blocks(x, mask=mask, is_causal=True)  # (B, P+L, d)
        return self.head(self.out_norm(h[:, p:]))  # (B, L, V)

    @torch.no_grad()
    def greedy(self, prefix: torch.Tensor, max_len: int) -> torch.Tensor:
        """(B, <= max_len) generated ids (without <bos>); rows stop being extended after <eos>."""
        tokens = torch.full((prefix.shape[0], 1), BOS, dtype=torch.long)  # (B, 1)
        done = torch.zeros(prefix.shape[0], dtype=torch.bool)
        for _ in range(max_len):
            nxt = self.forward(prefix, tokens)[:, -1].argmax(dim=-1)  # (B,)
            nxt = nxt.masked_fill(done, PAD)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            done |= nxt == EOS
            if bool(done.all()):
                break
        return tokens[:, 1:]


# ---------------------------------------------------------------------------------------------- backends
# A backend owns the tokenisation, the autoencoder's own encoder and the decoder. ``prepare`` turns a
# caption list into a dict of (N, ...) tensors; ``batch`` picks rows (trimmed to the batch's longest).


def _pad(seqs: list[list[int]], value: int = PAD) -> torch.Tensor:
    out = torch.full((len(seqs), max(1, max(map(len, seqs), default=1))), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


class _TinyBackend:
    def __init__(self, train_captions: Sequence[str], cfg: ProbeConfig):
        self.vocab = WordVocab.build(train_captions)
        self.max_words = max(len(tokenize(c)) for c in train_captions)
        self.max_len = self.max_words + 2  # greedy decoding budget
        n_pos = self.max_len + 2
        self.encoder = TinyTextEncoder(len(self.vocab), n_pos, cfg.d_model, cfg.encoder_layers, cfg.n_heads)
        self.decoder = TinyDecoder(len(self.vocab), n_pos, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_prefix)
        self.d_model = cfg.d_model
        self.vocab_size = len(self.vocab)

    def prepare(self, captions: Sequence[str]) -> dict:
        seqs = [self.vocab.encode(c)[: self.max_len] for c in captions]  # longer than any training caption: cut
        return {"words": _pad(seqs), "dec_in": _pad([[BOS] + s for s in seqs]),
                "target": _pad([s + [EOS] for s in seqs])}

    @staticmethod
    def batch(prepared: dict, idx: torch.Tensor) -> dict:
        words, dec_in, target = prepared["words"][idx], prepared["dec_in"][idx], prepared["target"][idx]
        width = int((target != PAD).sum(dim=1).max())
        return {"words": words[:, : max(1, width - 1)], "dec_in": dec_in[:, :width], "target": target[:, :width]}

    def own_encode(self, batch: dict) -> torch.Tensor:
        return self.encoder(batch["words"])  # (B, d)

    def loss(self, prefix: torch.Tensor, batch: dict) -> torch.Tensor:
        logits = self.decoder(prefix, batch["dec_in"])  # (B, L, V)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["target"].reshape(-1), ignore_index=PAD)

    def generate(self, prefix: torch.Tensor) -> list[list[str]]:
        return [self.vocab.decode(row.tolist()) for row in self.decoder.greedy(prefix, self.max_len)]

    def oov(self, caption: str) -> bool:
        return any(w not in self.vocab.index for w in tokenize(caption))

    def decoder_modules(self) -> list[nn.Module]:
        return [self.decoder]

    def encoder_modules(self) -> list[nn.Module]:
        return [self.encoder]


class _T5Backend:
    """A local pretrained T5: its encoder (mean-pooled) is the autoencoder's own encoder; its decoder
    cross-attends to the ``n_prefix`` adapter vectors. Words are compared after detokenisation."""

    def __init__(self, train_captions: Sequence[str], cfg: ProbeConfig):
        from transformers import AutoTokenizer, T5ForConditionalGeneration

        path = cfg.decoder[3:]
        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.t5 = T5ForConditionalGeneration.from_pretrained(path, local_files_only=True)
        self.d_model = self.t5.config.d_model
        self.vocab_size = len(self.tok)
        self.max_new = max(len(self.tok(c).input_ids) for c in train_captions) + 4
        self._unk = self.tok.unk_token_id

    def prepare(self, captions: Sequence[str]) -> dict:
        enc = self.tok(list(captions), return_tensors="pt", padding=True)
        return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask}

    @staticmethod
    def batch(prepared: dict, idx: torch.Tensor) -> dict:
        mask = prepared["attention_mask"][idx]
        width = int(mask.sum(dim=1).max())
        return {"input_ids": prepared["input_ids"][idx][:, :width], "attention_mask": mask[:, :width]}

    def own_encode(self, batch: dict) -> torch.Tensor:
        h = self.t5.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        m = batch["attention_mask"][..., None].to(h.dtype)  # (B, L, 1)
        return (h * m).sum(dim=1) / m.sum(dim=1).clamp_min(1)  # (B, d)

    def loss(self, prefix: torch.Tensor, batch: dict) -> torch.Tensor:
        from transformers.modeling_outputs import BaseModelOutput

        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return self.t5(encoder_outputs=BaseModelOutput(last_hidden_state=prefix), labels=labels).loss

    def generate(self, prefix: torch.Tensor) -> list[list[str]]:
        from transformers.modeling_outputs import BaseModelOutput

        ids = self.t5.generate(encoder_outputs=BaseModelOutput(last_hidden_state=prefix), max_new_tokens=self.max_new,
                               do_sample=False, num_beams=1)
        return [tokenize(t) for t in self.tok.batch_decode(ids, skip_special_tokens=True)]

    def oov(self, caption: str) -> bool:
        return self._unk is not None and self._unk in self.tok(caption).input_ids

    def decoder_modules(self) -> list[nn.Module]:
        # lm_head is usually tied to the shared embedding, which the encoder uses too: all frozen together
        return [self.t5.decoder, self.t5.lm_head, self.t5.shared]

    def encoder_modules(self) -> list[nn.Module]:
        return [self.t5.encoder]


# ---------------------------------------------------------------------------------------------- training


def _lr_lambda(steps: int):
    warm = max(1, steps // 20)
    return lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm)))


def _unique_params(modules: Sequence[nn.Module]) -> list[nn.Parameter]:
    out, seen = [], set()
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def _train(params: list[nn.Parameter], step_loss, n: int, steps: int, batch_size: int, lr: float, seed: int,
           desc: str, progress: bool) -> list[float]:
    """AdamW with warm-up + cosine over ``steps`` batches of a seeded permutation of ``range(n)``."""
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps))
    gen = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, n)
    order, pos, losses = torch.randperm(n, generator=gen), 0, []
    for _ in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=gen), 0
        loss = step_loss(order[pos: pos + batch_size])
        pos += batch_size
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return losses


@contextlib.contextmanager
def _threads(n: int | None):
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _check_captions(captions: Sequence[str], what: str) -> None:
    if not captions:
        raise ValueError(f"text-EM probe: {what} has no captions")
    empty = [i for i, c in enumerate(captions) if not tokenize(c)]
    if empty:
        raise ValueError(f"text-EM probe: {len(empty)} caption(s) of {what} have no words (e.g. row {empty[0]}: "
                         f"{captions[empty[0]]!r}); remove empty captions first")


def _caption_key(captions: Sequence[str]) -> str:
    h = hashlib.sha1()
    for c in captions:
        h.update(c.encode("utf-8"))
        h.update(b"\0")
    return f"{len(captions)}:{h.hexdigest()}"


@dataclass
class _FittedMap:
    encoder: object           # kept so id(encoder) stays unique while the map exists
    name: str
    adapter: Adapter
    mean: torch.Tensor        # (1, D) training-set mean of the encoder's embeddings
    scale: torch.Tensor       # () one global scale
    stats: dict


class TextProbe:
    """The Kamath et al. reconstruction probe: autoencoder first, decoder frozen, then a map per encoder.

    Usage::

        probe = TextProbe(ProbeConfig(seed=0))
        poc = probe.fit_autoencoder(train_captions, splits)        # proof-of-concept row
        for enc in encoders:
            probe.fit_map(enc)                                     # Linear + LayerNorm only
            rows[enc.name] = probe.evaluate(enc, splits)           # {split: {em, token_acc, n, ...}}

    An encoder is anything with ``encode_texts(list[str]) -> (n, d)`` tensor; its output is used as
    returned (not re-normalised).
    """

    def __init__(self, config: ProbeConfig | None = None, slot_fn: SlotFn | None = None, **overrides):
        cfg = config or ProbeConfig()
        self.config = ProbeConfig(**{**asdict(cfg), **overrides}) if overrides else cfg
        self.slot_fn = slot_fn                                    # adds "slot_acc" to every split's metrics
        self.backend = None                                       # set by fit_autoencoder
        self.ae_adapter: Adapter | None = None
        self.train_captions: list[str] = []                       # as used (after the seeded cap)
        self._train_set: set[str] = set()
        self._train_key = ""                                      # key of the list given to fit_autoencoder
        self._train_keep: list[int] | None = None                 # rows kept when that list was capped
        self._prepared: dict[str, dict] = {}                      # caption key -> backend tensors
        self._emb: dict[tuple[int, str], tuple[object, torch.Tensor]] = {}  # (id(encoder), caption key) -> emb
        self._maps: dict[int, _FittedMap] = {}
        self.autoencoder_stats: dict | None = None

    # ------------------------------------------------------------------ captions and embeddings

    def _prepare(self, captions: Sequence[str]) -> dict:
        key = _caption_key(captions)
        if key not in self._prepared:
            self._prepared[key] = self.backend.prepare(captions)
        return self._prepared[key]

    def set_embeddings(self, encoder, captions: Sequence[str], emb: torch.Tensor) -> None:
        """Give precomputed ``encoder`` embeddings of ``captions`` (N, D) so they are not computed again."""
        if emb.dim() != 2 or emb.shape[0] != len(captions):
            raise ValueError(f"embeddings of shape {tuple(emb.shape)} for {len(captions)} captions; need (N, D)")
        self._emb[(id(encoder), _caption_key(captions))] = (encoder, emb.detach().float().cpu())

    def embeddings(self, encoder, captions: Sequence[str]) -> torch.Tensor:
        """``encoder``'s (N, D) float32 embeddings of ``captions``, computed once and cached."""
        key = (id(encoder), _caption_key(captions))
        if key not in self._emb:
            emb = encode_texts(encoder, captions, self.config.embed_batch_size, normalize=False)  # (N, D)
            self._emb[key] = (encoder, emb)
        return self._emb[key][1]

    # ------------------------------------------------------------------ the autoencoder

    def _require_autoencoder(self, what: str) -> None:
        if self.backend is None:
            raise RuntimeError(f"{what} needs the decoder: call fit_autoencoder(train_captions) first")

    def fit_autoencoder(self, train_captions: Sequence[str], splits: Mapping[str, Sequence[str]] | None = None) -> dict:
        """Train the own encoder + adapter + decoder to reconstruct ``train_captions``; then freeze the decoder.

        Args:
            train_captions: the probe's training captions (the maps use the same ones). At most
                ``max_train_captions`` of them are used (a seeded sample, original order kept).
            splits: optional name -> captions to evaluate the autoencoder on (the proof-of-concept row).

        Returns:
            {"n_train", "vocab_size", "steps", "final_loss" (mean of the last 10 steps), "seconds",
            "splits": {name: {"em", "token_acc", "n", "n_oov", "n_in_train", "examples"}}}.
        """
        cfg = self.config
        if self.backend is not None:
            raise RuntimeError("fit_autoencoder was already called on this TextProbe; make a new one")
        t0 = time.perf_counter()
        captions = list(train_captions)
        _check_captions(captions, "the training captions")
        self._train_key = _caption_key(captions)
        if len(captions) > cfg.max_train_captions:
            self._train_keep = sorted(random.Random(cfg.seed).sample(range(len(captions)), cfg.max_train_captions))
            captions = [captions[i] for i in self._train_keep]
        self.train_captions = captions
        self._train_set = set(captions)
        with _threads(cfg.num_threads), torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            b = _TinyBackend(captions, cfg) if cfg.decoder == "tiny" else _T5Backend(captions, cfg)
            adapter = Adapter(b.d_model, b.d_model, cfg.n_prefix)
            prepared = b.prepare(captions)
            params = _unique_params([*b.encoder_modules(), adapter, *b.decoder_modules()])
            for m in [*b.encoder_modules(), *b.decoder_modules()]:
                m.train()

            def step(idx):
                batch = b.batch(prepared, idx)
                return b.loss(adapter(b.own_encode(batch)), batch)

            losses = _train(params, step, len(captions), cfg.ae_steps, cfg.batch_size, cfg.lr, cfg.seed,
                            "text-EM autoencoder", cfg.progress)
            for m in [*b.encoder_modules(), *b.decoder_modules()]:
                m.eval()
            for m in b.decoder_modules():  # frozen from here on: only maps train
                m.requires_grad_(False)
        # set only once trained, so a failed fit leaves no half-trained decoder behind
        self.backend, self.ae_adapter = b, adapter
        self._prepared[_caption_key(captions)] = prepared
        self.autoencoder_stats = {"n_train": len(captions), "vocab_size": b.vocab_size, "steps": cfg.ae_steps,
                                  "final_loss": sum(losses[-10:]) / len(losses[-10:])}
        out = dict(self.autoencoder_stats)
        out["splits"] = self.evaluate_autoencoder(splits) if splits else {}
        out["seconds"] = time.perf_counter() - t0
        return out

    @torch.no_grad()
    def autoencoder_embeddings(self, captions: Sequence[str]) -> torch.Tensor:
        """The autoencoder's own single-vector embeddings (before its adapter), (N, d_model)."""
        self._require_autoencoder("autoencoder_embeddings")
        prepared = self._prepare(captions)
        with _threads(self.config.num_threads):
            return torch.cat([self.backend.own_encode(self.backend.batch(prepared, idx))
                              for idx in torch.arange(len(captions)).split(512)])  # (N, d)

    def evaluate_autoencoder(self, splits: Mapping[str, Sequence[str]]) -> dict:
        """The proof-of-concept row: {split: metrics} of the autoencoder's own reconstructions."""
        self._require_autoencoder("evaluate_autoencoder")

        def prefix(captions):
            return self.ae_adapter(self.autoencoder_embeddings(captions))  # (N, P, d)

        return self._evaluate(prefix, splits)

    # ------------------------------------------------------------------ maps for frozen encoders

    def fit_map(self, encoder, train_captions: Sequence[str] | None = None, name: str | None = None) -> dict:
        """Train only Linear + LayerNorm from ``encoder``'s frozen embeddings into the frozen decoder's input.

        Args:
            encoder: anything with ``encode_texts``; refitting the same encoder replaces its map.
            train_captions: None or the very list given to :meth:`fit_autoencoder` (the decoder and the
                maps see the same captions; anything else is an error).
            name: reported name (default: ``encoder.name`` or "encoder").

        Returns:
            {"name", "dim", "n_train", "steps", "final_loss" (mean of the last 10 steps), "seconds"}.
        """
        cfg = self.config
        self._require_autoencoder("fit_map")
        if train_captions is not None and _caption_key(train_captions) != self._train_key:
            raise ValueError("fit_map got other captions than fit_autoencoder: the decoder and the maps must see "
                             "the same training captions (pass the same list, or None)")
        t0 = time.perf_counter()
        full = self._emb.get((id(encoder), self._train_key))  # embeddings of the whole list given, if precomputed
        if self._train_keep is not None and full is not None:
            emb = full[1][self._train_keep]  # (N, D)
        else:
            emb = self.embeddings(encoder, self.train_captions)  # (N, D)
        mean = emb.mean(dim=0, keepdim=True)  # (1, D)
        scale = (emb - mean).pow(2).mean().sqrt().clamp_min(1e-8)  # ()
        x = (emb - mean) / scale  # (N, D)
        prepared = self._prepare(self.train_captions)
        b = self.backend
        with _threads(cfg.num_threads), torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            adapter = Adapter(x.shape[1], b.d_model, cfg.n_prefix)

            def step(idx):
                return b.loss(adapter(x[idx]), b.batch(prepared, idx))

            losses = _train(list(adapter.parameters()), step, len(self.train_captions), cfg.map_steps,
                            cfg.batch_size, cfg.map_lr, cfg.seed, "text-EM map", cfg.progress)
        name = name or encoder_name(encoder, "encoder")
        stats = {"name": name, "dim": int(x.shape[1]), "n_train": len(self.train_captions), "steps": cfg.map_steps,
                 "final_loss": sum(losses[-10:]) / len(losses[-10:]), "seconds": time.perf_counter() - t0}
        self._maps[id(encoder)] = _FittedMap(encoder, name, adapter, mean, scale, stats)
        return dict(stats)

    def evaluate(self, encoder, splits: Mapping[str, Sequence[str]]) -> dict:
        """{split: {"em", "token_acc", "n", "n_oov", "n_in_train", "examples"}} of ``encoder``'s fitted map."""
        self._require_autoencoder("evaluate")
        fitted = self._maps.get(id(encoder))
        if fitted is None:
            raise RuntimeError(f"no map for encoder {encoder_name(encoder, 'encoder')!r}: call fit_map(encoder) first")

        def prefix(captions):
            x = (self.embeddings(encoder, captions) - fitted.mean) / fitted.scale  # (N, D)
            return fitted.adapter(x)  # (N, P, d)

        return self._evaluate(prefix, splits)

    @torch.no_grad()
    def _evaluate(self, prefix_of, splits: Mapping[str, Sequence[str]]) -> dict:
        out = {}
        for split, captions in splits.items():
            captions = list(captions)
            _check_captions(captions, f"split {split!r}")
            prefix = prefix_of(captions)  # (N, P, d)
            with _threads(self.config.num_threads):
                preds = [p for s in range(0, len(captions), 512) for p in self.backend.generate(prefix[s:s + 512])]
            refs = [tokenize(c) for c in captions]
            m = match_metrics(preds, refs)
            if self.slot_fn is not None:
                m["slot_acc"] = slot_accuracy(preds, refs, self.slot_fn)
            m.update(n_oov=sum(self.backend.oov(c) for c in captions),
                     n_in_train=sum(c in self._train_set for c in captions),
                     examples=[{"ref": " ".join(r), "pred": " ".join(p)} for p, r in zip(preds, refs)
                               if p != r][: self.config.n_examples])
            out[split] = m
        return out


# ---------------------------------------------------------------------------------------------- entry points


def text_em_table(encoders: Mapping[str, object], train_captions: Sequence[str], splits: Mapping[str, Sequence[str]],
                  config: ProbeConfig | None = None, slot_fn: SlotFn | None = None, **overrides) -> dict:
    """Table 1 for several frozen encoders sharing one autoencoder-trained, frozen decoder.

    Args:
        encoders: name -> text encoder (``encode_texts``), e.g. {"before": ..., "after": ..., "teacher": ...}. An
            encoder with a ``covers(captions) -> bool`` method is evaluated only on the splits it covers.
        train_captions: the captions that train the autoencoder and every map.
        splits: name -> evaluation captions, e.g. {"in_distribution": ..., "heldout": ...}.
        slot_fn: optional (predicted words, reference words) -> (slots right, slots in all), e.g.
            :func:`kclip.synthetic.slot_hits`: adds ``slot_acc`` (percent) to each split's metrics.
        config / overrides: :class:`ProbeConfig` fields (``seed``, ``ae_steps``, ``map_steps``, ...).

    Returns:
        {"autoencoder": {"n_train", "vocab_size", "steps", "final_loss", "seconds", "splits": {split: m}},
         "encoders": {name: {"name", "dim", "n_train", "steps", "final_loss", "seconds", "splits": {split: m}}},
         "config": ProbeConfig as a dict, "seconds"}, where m = {"em", "token_acc", "n", "n_oov",
        "n_in_train", "examples"} (percentages for em/token_acc).
    """
    t0 = time.perf_counter()
    probe = TextProbe(config, slot_fn=slot_fn, **overrides)
    out = {"autoencoder": probe.fit_autoencoder(train_captions, splits), "encoders": {}}
    for name, encoder in encoders.items():
        t1 = time.perf_counter()
        row = probe.fit_map(encoder, name=name)
        covers = getattr(encoder, "covers", None)  # an encoder of a fixed caption set (a teacher cache)
        row["splits"] = probe.evaluate(encoder, {k: v for k, v in splits.items() if covers is None or covers(v)})
        row["seconds"] = time.perf_counter() - t1
        out["encoders"][name] = row
    out["config"] = asdict(probe.config)
    out["seconds"] = time.perf_counter() - t0
    return out


def text_em_probe(encoder, train_captions: Sequence[str], test_captions: Sequence[str], steps: int = 300,
                  batch_size: int = 64, seed: int = 0, embed_batch_size: int = 256,
                  train_emb: torch.Tensor | None = None, test_emb: torch.Tensor | None = None,
                  progress: bool = False, **config) -> dict:
    """Backwards-compatible single-encoder entry point (prefer :func:`text_em_table`).

    Runs the same protocol for one encoder: fits the autoencoder on ``train_captions`` (``steps``
    steps), freezes its decoder, fits ``encoder``'s map (``steps`` steps), tests on ``test_captions``.
    The autoencoder is deterministic given the seed and captions, so separate calls for several encoders
    share an identical decoder, only recomputed each time.

    Returns:
        {"em", "token_acc", "n_test", "n_oov", "n_in_train", "examples", "n_train", "steps",
        "final_loss", "vocab_size", "decoder", "seconds", "autoencoder": {"em", "token_acc"}}.
    """
    t0 = time.perf_counter()
    if not train_captions or not test_captions:
        raise ValueError("text_em_probe needs training and test captions")
    probe = TextProbe(ProbeConfig(**{"ae_steps": steps, "map_steps": steps, "batch_size": batch_size, "seed": seed,
                                     "embed_batch_size": embed_batch_size, "progress": progress, **config}))
    if encoder is None and (train_emb is None or test_emb is None):
        raise ValueError("text_em_probe: encoder is None, so pass both train_emb and test_emb")
    key = encoder if encoder is not None else object()
    if train_emb is not None:
        probe.set_embeddings(key, train_captions, train_emb)
    if test_emb is not None:
        probe.set_embeddings(key, test_captions, test_emb)
    ae = probe.fit_autoencoder(train_captions, {"test": test_captions})
    fit = probe.fit_map(key)
    test = probe.evaluate(key, {"test": test_captions})["test"]
    return {"em": test["em"], "token_acc": test["token_acc"], "n_test": test["n"], "n_oov": test["n_oov"],
            "n_in_train": test["n_in_train"], "examples": test["examples"], "n_train": fit["n_train"], "steps": steps,
            "final_loss": fit["final_loss"], "vocab_size": ae["vocab_size"], "decoder": probe.config.decoder,
            "seconds": time.perf_counter() - t0,
            "autoencoder": {k: ae["splits"]["test"][k] for k in ("em", "token_acc")}}
