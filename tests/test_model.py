"""kclip.model: the head owns W_e and C and computes L_emb / L_conc in its forward; the logit scale is capped."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import TOL
from kclip.model import MAX_LOGIT_SCALE, KnowledgeClip, KnowledgeHead, build_clip, capped_logit_scale

D, D_T, K, B = 16, 24, 5, 7


def _head(path="shared", impl="triton", seed=0):
    torch.manual_seed(seed)
    head = KnowledgeHead(D, D_T, K, concept_path=path, distill_impl=impl)
    head.load_concept_classifier(torch.randn(K, D_T) * 3, torch.randn(K))
    return head


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    text = F.normalize(torch.randn(B, D, generator=g), dim=-1)
    image = F.normalize(torch.randn(B, D, generator=g), dim=-1)
    teacher = F.normalize(torch.randn(B, D_T, generator=g), dim=-1).half()  # the fp16 cache rows
    concept = torch.randint(0, K, (B,), generator=g)
    return text, image, teacher, concept


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_head_terms_are_eq1_and_the_concept_ce(impl):
    head = _head(impl=impl)
    text, image, teacher, concept = _batch()
    terms = head(text, image, teacher, concept)
    y = F.linear(text, head.weight, head.bias)
    want_emb = ((y - teacher.float()) ** 2).sum(-1).mean()  # Eq. 1: sum over d' per caption, batch mean
    logits = F.linear(F.linear(image, head.weight, head.bias), head.concept_weight, head.concept_bias)
    torch.testing.assert_close(terms["distill"], want_emb, **TOL[torch.float32])
    torch.testing.assert_close(terms["concept"], F.cross_entropy(logits, concept), **TOL[torch.float32])
    assert set(head(text, None, teacher, None)) == {"distill"} and set(head(None, image, None, concept)) == {"concept"}


def test_concept_path_controls_what_l_conc_trains():
    text, image, teacher, concept = _batch()
    for path in ("stopgrad", "shared", "separate"):
        head = _head(path)
        img = image.clone().requires_grad_(True)
        head(None, img, None, concept)["concept"].backward()
        we_grad = head.weight.grad
        if path == "shared":
            assert we_grad is not None and we_grad.abs().sum() > 0  # L_conc moves W_e
        else:
            assert we_grad is None or we_grad.abs().sum() == 0     # W_e is fitted by L_emb alone
        if path == "separate":
            assert head.image_weight.grad.abs().sum() > 0
        assert img.grad.abs().sum() > 0  # the image encoder always learns from L_conc
    # C is frozen: buffers, not parameters
    assert "concept_weight" not in dict(_head().named_parameters())


def test_capped_logit_scale_forward_and_gradient_rule():
    cap = math.log(MAX_LOGIT_SCALE)
    for value, grad_out, want_grad in ((math.log(10.0), 1.0, 10.0),   # below the cap: plain exp gradient
                                       (cap + 0.5, -1.0, 0.0),          # above, pushed further up: blocked
                                       (cap + 0.5, 1.0, MAX_LOGIT_SCALE)):  # above, pushed down: passes
        p = torch.tensor([value], requires_grad=True)
        s = capped_logit_scale(p)
        assert float(s.detach()) == pytest.approx(min(math.exp(value), MAX_LOGIT_SCALE), rel=1e-6)
        s.backward(torch.tensor([grad_out]))
        assert float(p.grad) == pytest.approx(want_grad * grad_out if want_grad else 0.0, rel=1e-5)


def test_student_forward_and_export_cap(tmp_path):
    import open_clip

    from kclip.model import export_student, register_model_configs

    clip, _, _, tokenizer = build_clip("kclip-tiny", seed=0)
    model = KnowledgeClip(clip, D_T, K)
    with torch.no_grad():
        model.clip.logit_scale.fill_(math.log(MAX_LOGIT_SCALE) + 1.0)
    images = torch.randn(2, 3, *clip.visual.image_size)
    tokens = tokenizer(["a small red circle", "a large blue square"])
    out = model(images, tokens, torch.randn(2, D_T), torch.tensor([0, 1]))
    assert set(out) == {"image", "text", "logit_scale", "distill", "concept"}
    assert float(out["logit_scale"].detach()) == pytest.approx(MAX_LOGIT_SCALE)
    assert out["image"].shape == out["text"].shape == (2, clip.text_projection.shape[1])
    path = export_student(model.clip, tmp_path / "student.safetensors")
    register_model_configs()
    loaded = open_clip.create_model("kclip-tiny", pretrained=str(path))
    assert float(loaded.logit_scale.detach().exp()) == pytest.approx(MAX_LOGIT_SCALE, rel=1e-5)


def test_student_download_failure_says_what_to_do(monkeypatch):
    """A pretrained tag that is neither cached nor downloadable (offline) gets a clear error; other errors pass."""
    import open_clip
    from huggingface_hub.errors import LocalEntryNotFoundError

    from kclip.model import StudentWeightsError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("Cannot find the requested files in the disk cache and outgoing traffic "
                                      "has been disabled.")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", offline)
    with pytest.raises(StudentWeightsError, match="HF_HUB_OFFLINE=1.*local .safetensors"):
        build_clip("ViT-B-32", "openai")

    def unknown_tag(*args, **kwargs):
        raise RuntimeError("Pretrained weights (nope) not found for model ViT-B-32. Available pretrained tags: ...")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", unknown_tag)
    with pytest.raises(RuntimeError, match="Available pretrained tags"):  # open_clip's own message stays
        build_clip("ViT-B-32", "nope")
