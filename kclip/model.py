"""The Knowledge-CLIP student: an open_clip model, the projector W_e and the frozen concept classifier C.

``W_e`` maps the student's L2-normalised embeddings (text and image alike) into the teacher's space
(d -> d'); feeding it normalised features keeps its scale independent of the CLIP towers' norms. ``C``
(d' -> K) is trained on teacher embeddings by the concepts stage and frozen here.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

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
        raise ValueError(f"model.name {name!r} is not an open_clip model; choose one of open_clip.list_models() "
                         f"(e.g. ViT-B-32) or kclip's {sorted(p.stem for p in MODEL_CONFIG_DIR.glob('*.json'))}")
    if pretrained and (pretrained.endswith((".safetensors", ".pt", ".pth", ".bin")) and not os.path.isfile(pretrained)):
        raise FileNotFoundError(f"model.pretrained {pretrained!r} does not exist")
    if seed is not None:
        torch.manual_seed(seed)
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        name, pretrained=pretrained or None, device=device)
    tokenizer = open_clip.get_tokenizer(name)
    return model, preprocess_train, preprocess_val, tokenizer


def clip_embed_dim(clip: nn.Module) -> int:
    if getattr(clip, "text_projection", None) is not None:
        proj = clip.text_projection
        return proj.shape[1] if isinstance(proj, torch.Tensor) else proj.out_features
    return clip.visual.output_dim


class KnowledgeClip(nn.Module):
    """open_clip student + projector W_e (d -> d') + frozen concept classifier C (d' -> K)."""

    def __init__(self, clip: nn.Module, teacher_dim: int, num_concepts: int):
        super().__init__()
        if clip.logit_scale.ndim == 0:
            # DeepSpeed broadcasts parameters as bytes, which a 0-d tensor cannot be viewed as; open_clip's loader
            # reshapes a (1,) logit_scale back when the exported weights are loaded.
            clip.logit_scale = nn.Parameter(clip.logit_scale.detach().reshape(1))
        self.clip = clip
        self.projector = nn.Linear(clip_embed_dim(clip), teacher_dim)
        self.concept_classifier = nn.Linear(teacher_dim, num_concepts)
        self.concept_classifier.requires_grad_(False)

    def load_concept_classifier(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        with torch.no_grad():
            self.concept_classifier.weight.copy_(weight)
            self.concept_classifier.bias.copy_(bias)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict:
        image = F.normalize(self.clip.encode_image(images), dim=-1)       # (B, d)
        text = F.normalize(self.clip.encode_text(tokens), dim=-1)         # (B, d)
        return {"image": image, "text": text, "logit_scale": self.clip.logit_scale.exp().reshape(())}

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

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in clip.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, path)
    return path
