"""The Knowledge-CLIP student: an open_clip model and its head (the projector W_e and the frozen concept
classifier C, with the distillation and concept losses in the head's forward).

``W_e`` maps the student's L2-normalised text embeddings into the teacher's space (d -> d'); feeding it
normalised features keeps its scale independent of the CLIP towers' norms. ``C`` (d' -> K) is trained on
teacher embeddings by the concepts stage and frozen here. The logit scale is capped at 100 as in open_clip.
"""
from __future__ import annotations

import math
import os
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from kclip.config import ConfigError, LossConfig, check_choice, choices
from kclip.errors import UserError
from kclip.notices import drop_notice

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
_registered = False


def register_model_configs() -> None:
    """Make kclip's own open_clip model configs (``kclip-tiny``) known to open_clip (idempotent)."""
    global _registered
    if not _registered:
        import open_clip
        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True


def build_clip(name: str, pretrained: str = "", seed: int | None = None, device="cpu"):
    """An open_clip model with its train/val transforms and tokenizer.

    Args:
        name: open_clip model name (``ViT-B-32``) or a kclip config (``kclip-tiny``).
        pretrained: an open_clip tag (``openai``), a local weights file (.safetensors/.pt), or "" for random init.
        seed: seeds the random initialisation, so "before training" can be rebuilt exactly.
    Returns:
        (model, preprocess_train, preprocess_val, tokenizer)
    """
    import open_clip

    register_model_configs()
    if name not in open_clip.list_models():
        raise ConfigError(f"config key 'model.name' is {name!r}, not an open_clip model; choose one of "
                          f"open_clip.list_models() (e.g. ViT-B-32) or kclip's "
                          f"{sorted(p.stem for p in MODEL_CONFIG_DIR.glob('*.json'))}")
    if pretrained and (pretrained.endswith((".safetensors", ".pt", ".pth", ".bin")) and not os.path.isfile(pretrained)):
        raise StudentWeightsError(f"config key 'model.pretrained' names {pretrained!r}, which does not exist; give "
                                  "an existing weights file, an open_clip tag (e.g. openai) or '' for random init")
    if seed is not None:
        torch.manual_seed(seed)
    # random init is what an empty model.pretrained asks for: open_clip's warning about it is expected
    expected = drop_notice("", "No pretrained weights loaded for model") if not pretrained else nullcontext()
    try:
        with expected:
            model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
                name, pretrained=pretrained or None, device=device)
    except Exception as exc:
        if pretrained and not os.path.isfile(pretrained) and _is_download_error(exc):
            raise StudentWeightsError(
                f"model.pretrained={pretrained!r} for model.name={name!r}: open_clip could neither find these weights "
                f"in the local cache nor download them ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). "
                "Online, open_clip downloads a pretrained tag into the Hugging Face cache on first use; offline "
                "(HF_HUB_OFFLINE=1, or no network) the weights must already be there: run once with network, or "
                "set model.pretrained to a local .safetensors/.bin/.pt file.") from exc
        raise
    tokenizer = open_clip.get_tokenizer(name)
    return model, preprocess_train, preprocess_val, tokenizer


class StudentWeightsError(UserError, RuntimeError):
    """The student's pretrained weights could not be found locally nor downloaded."""


def _is_download_error(exc: BaseException) -> bool:
    """True for the errors a missing network / offline Hub cache raises (through open_clip)."""
    import urllib.error

    try:
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
        hub = (HfHubHTTPError, LocalEntryNotFoundError)
    except ImportError:  # older huggingface_hub
        hub = ()
    if isinstance(exc, (*hub, urllib.error.URLError, ConnectionError, TimeoutError)):
        return True
    text = str(exc).lower()
    return any(w in text for w in ("offline", "connection", "network", "resolve host", "cannot find the requested files"))


def clip_embed_dim(clip: nn.Module) -> int:
    if getattr(clip, "text_projection", None) is not None:
        proj = clip.text_projection
        return proj.shape[1] if isinstance(proj, torch.Tensor) else proj.out_features
    return clip.visual.output_dim


MAX_LOGIT_SCALE = 100.0  # open_clip clamps the (exponentiated) logit scale at 100


class _CappedLogScale(torch.autograd.Function):
    """``min(log_scale, cap)`` whose gradient never pushes the raw parameter further above the cap.

    open_clip clamps ``logit_scale`` in place after each optimizer step. Under DeepSpeed the optimizer
    steps fp32 master copies inside its partitions, so an in-place clamp of the module parameter would be
    overwritten. Clamping in the forward keeps the effective scale <= cap at every ZeRO stage and precision;
    the backward lets through only gradients that move the parameter down when it sits at or above the cap
    (a plain clamp would zero them and could leave the parameter stuck above the cap forever).
    """

    @staticmethod
    def forward(ctx, log_scale, cap: float):
        ctx.save_for_backward(log_scale)
        ctx.cap = cap
        return log_scale.clamp(max=cap)

    @staticmethod
    def backward(ctx, grad):
        (log_scale,) = ctx.saved_tensors
        # descent moves the parameter by -lr * grad: above the cap only grad > 0 (downwards) is kept
        keep = (log_scale < ctx.cap) | (grad > 0)
        return torch.where(keep, grad, torch.zeros_like(grad)), None


def capped_logit_scale(log_scale: torch.Tensor, max_scale: float = MAX_LOGIT_SCALE) -> torch.Tensor:
    """exp(min(log_scale, ln max_scale)), with the gradient rule of :class:`_CappedLogScale`. Shapes: any -> same."""
    return _CappedLogScale.apply(log_scale, math.log(max_scale)).exp()


class KnowledgeHead(nn.Module):
    """W_e (d -> d') and the frozen concept classifier C (d' -> K), with the method's losses in its own forward.

    - L_emb = ||W_e(text) - t||^2 per caption (summed over d'), averaged over the batch (the paper's Eq. 1):
      ``kclip.kernels.projected_mse_loss`` (``distill_impl="triton"``) fuses the projection GEMM with the
      squared error and its gradient; ``"reference"`` is the plain PyTorch form.
    - L_conc = CE(C(P(image)), s) with C frozen. ``concept_path`` chooses P, the projection of the image
      embedding into the teacher space that C classifies:
        ``shared`` (default, the paper's C(W_e(E_I(x)))): W_e itself, trained by both terms;
        ``stopgrad``: W_e with its gradient stopped (W_e fitted by L_emb alone; the image encoder still
            learns to land where the text projection puts the concept);
        ``separate``: an image projector of its own (same shape as W_e), trained by L_conc only.
      Whether C's large weights let L_conc pull W_e away from the teacher is measured per path in
      ``bench/results/concept_path_tiny.md`` (held-out R^2 of W_e(E_T(x)) on the embedded default).

    W_e's weight and bias are parameters of this module itself (not of an ``nn.Linear`` child): the fused
    kernel reads them as GEMM operands inside this forward, which is where ZeRO-3 gathers a module's own
    parameters (as Liger-Kernel's fused-linear modules own their weight). C is frozen and kept as buffers.
    """

    def __init__(self, dim: int, teacher_dim: int, num_concepts: int, concept_path: str = "shared",
                 distill_impl: str = "triton"):
        super().__init__()
        check_choice("loss.concept_path", concept_path, choices(LossConfig, "concept_path"))  # direct callers too
        check_choice("loss.distill_impl", distill_impl, choices(LossConfig, "distill_impl"))
        self.concept_path, self.distill_impl = concept_path, distill_impl
        init = nn.Linear(dim, teacher_dim)  # nn.Linear's initialisation, then owned directly
        self.weight = nn.Parameter(init.weight.detach().clone())            # (d', d)
        self.bias = nn.Parameter(init.bias.detach().clone())                # (d',)
        if concept_path == "separate":
            init = nn.Linear(dim, teacher_dim)
            self.image_weight = nn.Parameter(init.weight.detach().clone())  # (d', d)
            self.image_bias = nn.Parameter(init.bias.detach().clone())      # (d',)
        self.register_buffer("concept_weight", torch.zeros(num_concepts, teacher_dim))  # (K, d')
        self.register_buffer("concept_bias", torch.zeros(num_concepts))                 # (K,)

    def load_concept_classifier(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        with torch.no_grad():
            self.concept_weight.copy_(weight)
            self.concept_bias.copy_(bias)

    def project_text(self, text: torch.Tensor) -> torch.Tensor:
        """W_e(text). Shapes: (B, d) -> (B, d'). Inside a forward only under ZeRO-3."""
        return F.linear(text, self.weight, self.bias)

    def _image_projection(self, image: torch.Tensor) -> torch.Tensor:
        if self.concept_path == "separate":
            return F.linear(image, self.image_weight, self.image_bias)
        if self.concept_path == "stopgrad":
            return F.linear(image, self.weight.detach(), self.bias.detach())
        return F.linear(image, self.weight, self.bias)

    def forward(self, text: torch.Tensor | None = None, image: torch.Tensor | None = None,
                teacher: torch.Tensor | None = None, concept: torch.Tensor | None = None) -> dict:
        """The head's loss terms for the inputs given.

        Args:
            text: (B, d) L2-normalised student text embeddings (for L_emb).
            image: (B, d) L2-normalised student image embeddings (for L_conc).
            teacher: (B, d') teacher targets of the captions in any float dtype (the fp16 cache rows),
                normalised as configured; L_emb is computed when text and teacher are given.
            concept: (B,) int64 concept labels; L_conc is computed when image and concept are given.
        Returns:
            {"distill": 0-d fp32, "concept": 0-d fp32} for the terms that were computed.
        """
        from kclip import kernels

        terms = {}
        if text is not None and teacher is not None:
            mse = kernels.projected_mse_loss if self.distill_impl == "triton" else kernels.projected_mse_loss_reference
            weight, bias = self.weight, self.bias
            if weight.dtype != text.dtype and not torch.is_autocast_enabled(text.device.type):
                weight, bias = weight.to(text.dtype), bias.to(text.dtype)
            terms["distill"] = mse(text, weight, teacher, bias, reduction="batchmean").float()
        if image is not None and concept is not None:
            logits = F.linear(self._image_projection(image).float(), self.concept_weight.float(),
                              self.concept_bias.float())                          # (B, K)
            terms["concept"] = F.cross_entropy(logits, concept)
        return terms


class KnowledgeClip(nn.Module):
    """open_clip student + :class:`KnowledgeHead` (W_e, frozen C and their losses).

    ``forward(images, tokens, teacher, concept)`` returns the L2-normalised embeddings, the capped logit
    scale and the head's loss terms: everything that reads a parameter happens inside this forward, so the
    DeepSpeed engine can wrap the model directly at every ZeRO stage.
    """

    def __init__(self, clip: nn.Module, teacher_dim: int, num_concepts: int, concept_path: str = "shared",
                 distill_impl: str = "triton", max_logit_scale: float = MAX_LOGIT_SCALE):
        super().__init__()
        if clip.logit_scale.ndim == 0:
            # DeepSpeed broadcasts parameters as bytes, which a 0-d tensor cannot be viewed as; open_clip's loader
            # reshapes a (1,) logit_scale back when the exported weights are loaded.
            clip.logit_scale = nn.Parameter(clip.logit_scale.detach().reshape(1))
        self.clip = clip
        self.max_logit_scale = max_logit_scale
        self.head = KnowledgeHead(clip_embed_dim(clip), teacher_dim, num_concepts, concept_path, distill_impl)

    def load_concept_classifier(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        self.head.load_concept_classifier(weight, bias)

    def forward(self, images: torch.Tensor | None = None, tokens: torch.Tensor | None = None,
                teacher: torch.Tensor | None = None, concept: torch.Tensor | None = None) -> dict:
        """Shapes: images (B, 3, H, W), tokens (B, L), teacher (B, d'), concept (B,) ->
        {"image": (B, d), "text": (B, d), "logit_scale": (), "distill": (), "concept": ()} (what applies)."""
        out = {}
        if images is not None:
            out["image"] = F.normalize(self.clip.encode_image(images), dim=-1)    # (B, d)
        if tokens is not None:
            out["text"] = F.normalize(self.clip.encode_text(tokens), dim=-1)      # (B, d)
        out["logit_scale"] = capped_logit_scale(self.clip.logit_scale, self.max_logit_scale).reshape(())
        out.update(self.head(out.get("text"), out.get("image"), teacher, concept))
        return out

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]


class ClipEncoders:
    """Frozen, batched encoders over a CLIP model, the interface the evaluators use."""

    def __init__(self, name: str, clip: nn.Module, preprocess, tokenizer, device="cpu", batch_size: int = 256):
        self.name = name
        self.clip = clip.eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.batch_size = batch_size

    @torch.inference_mode()
    def encode_images(self, images) -> torch.Tensor:
        out = []
        for i in range(0, len(images), self.batch_size):
            batch = torch.stack([self.preprocess(im) for im in images[i:i + self.batch_size]]).to(self.device)
            out.append(F.normalize(self.clip.encode_image(batch).float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.empty(0, clip_embed_dim(self.clip))

    @torch.inference_mode()
    def encode_texts(self, texts) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[i:i + self.batch_size])).to(self.device)
            out.append(F.normalize(self.clip.encode_text(tokens).float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.empty(0, clip_embed_dim(self.clip))


def export_student(clip: nn.Module, path: str | Path) -> Path:
    """Save the student as a safetensors state dict that ``open_clip.create_model(name, pretrained=path)`` loads."""
    from safetensors.torch import save_file

    from kclip.atomic import atomic_path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in clip.state_dict().items()}
    if "logit_scale" in state:  # what the student used in training: the capped scale (open_clip's clamp)
        state["logit_scale"] = state["logit_scale"].clamp(max=math.log(MAX_LOGIT_SCALE))
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))
    return path
