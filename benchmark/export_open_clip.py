"""The open_clip half of `mugbench export`: a CLIP-style method's image and text towers as an open_clip
folder (``open_clip_config.json`` + ``open_clip_model.safetensors``) that loads offline with
``open_clip.create_model_and_transforms("local-dir:FOLDER")`` and ``open_clip.get_tokenizer(...)``.

The files sit beside timm's ``config.json`` / ``model.safetensors`` in the same folder, as in the
Hugging Face hub repositories that serve both libraries: each library picks its own files.

The image tower becomes open_clip's own ``VisionTransformer``: open_clip's timm adapter can only build
a registered timm architecture by name, not the study's custom ViT (its image size, width, depth). The
weights map one to one, except the patch embedding's bias, which open_clip's ``conv1`` lacks: adding
a constant to every patch token before the position embedding is the same as adding it to the position
embedding of the patch positions, so it is folded in there. The text tower is open_clip's
``TextTransformer`` already; a run trained on a compact sub-vocabulary (`mugbench.data.tokenizer`)
gets its token embedding expanded back to open_clip's 49,408 BPE ids, each id outside the
sub-vocabulary taking the ``unk`` row, exactly what the run's tokenizer maps it to.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .files import atomic_write, atomic_write_text

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"  # the first name open_clip looks for in a local folder
OPEN_CLIP_FILES = (OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS)
# Largest difference allowed between mugbench's and open_clip's normalised embeddings: the towers run the
# same arithmetic in another order (fused attention vs nn.MultiheadAttention, the folded patch bias).
TOLERANCE = 1e-5

# Methods with a text tower whose embeddings open_clip's model config cannot express exactly, and why.
_NOT_EXPRESSIBLE = {
    "coca": (
        "coca's embeddings cannot be expressed in an open_clip 3.3 model config: its image embedding is a "
        "one-query attentional pooler over the encoder's tokens, which open_clip offers only as its 'parallel' "
        "pooling (marked untested there; it returns [B, 1, D] and sizes its norm for the joint width, not the "
        "encoder's), and its text tower lets the appended class token attend to the caption with "
        "correct_cls_mask=True, which open_clip's text config cannot set (its CoCa keeps the legacy mask)"),
}


def open_clip_problem(method: nn.Module) -> str | None:
    """Why ``method`` cannot become an open_clip folder, or None when it can.

    It can when its embeddings are CLIP's: ``encode_image`` the projected class token of the shared ViT,
    ``encode_text`` open_clip's causal text tower (mugbench's clip, slip and flip).
    """
    from .methods.clip import CLIP

    name = getattr(method, "name", "?")
    if name in _NOT_EXPRESSIBLE:
        return _NOT_EXPRESSIBLE[name]
    if not (callable(getattr(method, "encode_image", None)) and callable(getattr(method, "encode_text", None))):
        return f"{name} has no text tower (encode_image and encode_text), so there is nothing for open_clip to load"
    if not (isinstance(method, CLIP) and type(method).encode_image is CLIP.encode_image
            and type(method).encode_text is CLIP.encode_text):
        return (f"{name} computes its image or text embedding its own way, and only CLIP's (a linear projection of "
                f"the class token, open_clip's text tower) is known to map onto an open_clip model")
    return None


def open_clip_config(method: nn.Module, img_size: int, mean, std, about: dict | None = None) -> dict:
    """``open_clip_config.json``: the model config that rebuilds both towers and the preprocessing, plus
    ``about`` under a "mugbench" key (open_clip reads only ``model_cfg`` and ``preprocess_cfg``)."""
    from .data.tokenizer import TextTokenizer

    enc, text = method.encoder, method.text
    width, heads = int(enc.embed_dim), int(enc.blocks[0].attn.num_heads)
    vision_cfg = {
        "image_size": int(img_size), "patch_size": int(enc.patch_embed.patch_size[0]), "width": width,
        "layers": len(enc.blocks), "head_width": width // heads,
        "mlp_ratio": enc.blocks[0].mlp.fc1.out_features / width,
        "no_ln_pre": not isinstance(enc.norm_pre, nn.LayerNorm), "pool_type": "tok",
        # timm's ViT normalises with eps 1e-6, open_clip's LayerNorm defaults to 1e-5.
        "norm_kwargs": {"eps": float(enc.norm.eps)},
    }
    bpe = TextTokenizer(int(text.context_length))  # open_clip's own BPE: the ids the export is indexed by
    text_cfg = {
        "context_length": int(text.context_length), "vocab_size": bpe.vocab_size, "width": int(text.width),
        "heads": int(text.heads), "layers": len(text.transformer.resblocks),
        "mlp_ratio": text.transformer.resblocks[0].mlp.c_fc.out_features / text.width,
        "pad_id": bpe.pad_id, "eos_id": bpe.eot_id, "pool_type": "eos", "proj_bias": False,
    }
    out = {
        "model_cfg": {"embed_dim": int(method.image_proj.out_features), "custom_text": True, "quick_gelu": False,
                      "vision_cfg": vision_cfg, "text_cfg": text_cfg},
        "preprocess_cfg": {"size": int(img_size), "mode": "RGB", "mean": list(mean), "std": list(std),
                           "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0},
    }
    if about:
        out["mugbench"] = about
    return out


def open_clip_state_dict(method: nn.Module, tokenizer) -> dict[str, torch.Tensor]:
    """The weights of ``method`` under open_clip's ``CustomTextCLIP`` names."""
    state = {f"visual.{k}": v for k, v in _vision_state(method.encoder).items()}
    state["visual.proj"] = method.image_proj.weight.detach().T  # x @ proj == image_proj(x)
    state.update({f"text.{k}": v for k, v in method.text.state_dict().items()})
    state["text.token_embedding.weight"] = full_vocabulary_embedding(method.text.token_embedding.weight, tokenizer)
    state["logit_scale"] = method.logit_scale.detach()
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def full_vocabulary_embedding(weight: torch.Tensor, tokenizer) -> torch.Tensor:
    """Token embedding rows for every open_clip BPE id: row ``i`` is the row the run's tokenizer maps
    BPE id ``i`` to (itself for a full-vocabulary run; its compact id, or ``unk``, otherwise)."""
    table = getattr(tokenizer, "_to_compact", None)
    return weight.detach() if table is None else weight.detach()[table]


# timm ViT block parameters and their open_clip ResidualAttentionBlock names (weight and bias each).
_BLOCK_NAMES = {"norm1": "ln_1", "attn.qkv": "attn.in_proj", "attn.proj": "attn.out_proj", "norm2": "ln_2",
                "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def _vision_state(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """timm ViT weights -> open_clip ``VisionTransformer`` weights (without the projection)."""
    from .export import ExportError

    if getattr(encoder, "num_prefix_tokens", None) != 1 or encoder.cls_token is None or encoder.no_embed_class:
        raise ExportError("open_clip's VisionTransformer has exactly one class token with its own position "
                          "embedding; this encoder's ViT has another layout (register tokens, no class token or "
                          "no class position), so no open_clip folder can reproduce it.")
    act = encoder.blocks[0].mlp.act
    if not (type(act) is nn.GELU and act.approximate == "none"):
        raise ExportError(f"open_clip's VisionTransformer (beside mugbench's text tower) uses the exact GELU; this "
                          f"encoder's MLPs use {act!r}, so no open_clip folder can reproduce it.")
    src = {k: v.detach() for k, v in encoder.state_dict().items()}
    bias = src.pop("patch_embed.proj.bias", None)
    pos = src.pop("pos_embed")[0].clone()
    if bias is not None:
        pos[1:] += bias  # conv1 has no bias: the same constant added to every patch token
    out = {"conv1.weight": src.pop("patch_embed.proj.weight"), "class_embedding": src.pop("cls_token")[0, 0],
           "positional_embedding": pos, "ln_post.weight": src.pop("norm.weight"), "ln_post.bias": src.pop("norm.bias")}
    if isinstance(encoder.norm_pre, nn.LayerNorm):
        out.update({"ln_pre.weight": src.pop("norm_pre.weight"), "ln_pre.bias": src.pop("norm_pre.bias")})
    width = int(encoder.embed_dim)
    for i in range(len(encoder.blocks)):
        for timm_name, oc_name in _BLOCK_NAMES.items():
            for kind in ("weight", "bias"):
                key = f"blocks.{i}.{timm_name}.{kind}"
                if key in src:
                    joined = "_" if oc_name.endswith("in_proj") else "."  # nn.MultiheadAttention's in_proj_weight
                    out[f"transformer.resblocks.{i}.{oc_name}{joined}{kind}"] = src.pop(key)
        # A ViT built with qkv_bias=False has no attention biases; open_clip's attention always has them.
        out.setdefault(f"transformer.resblocks.{i}.attn.in_proj_bias", torch.zeros(3 * width))
        out.setdefault(f"transformer.resblocks.{i}.attn.out_proj.bias", torch.zeros(width))
    if src:
        raise ExportError(f"The encoder has weights open_clip's VisionTransformer has no place for "
                          f"({', '.join(sorted(src)[:4])}): its ViT variant (layer scale, q/k norm, a patch norm, ...) "
                          f"cannot be exported to open_clip.")
    return out


def write_open_clip(method: nn.Module, tokenizer, out_dir: Path, img_size: int, mean, std) -> list[Path]:
    """Write ``open_clip_config.json`` and ``open_clip_model.safetensors`` for ``method`` into ``out_dir``.

    Raises `mugbench.export.ExportError` when open_clip cannot express the method (`open_clip_problem`).
    """
    from safetensors.torch import save_file

    from .export import ExportError

    problem = open_clip_problem(method)
    if problem:
        raise ExportError(f"No open_clip folder can be written: {problem}.")
    state = open_clip_state_dict(method, tokenizer)
    vocab = getattr(tokenizer, "vocab", None)
    note = {"method": getattr(method, "name", None),
            "vocabulary": (f"trained on a compact vocabulary of {len(vocab) + 1} ids (the BPE ids of its training "
                           f"captions and unk); every other BPE id shares unk's embedding") if vocab else
                          "open_clip's full BPE vocabulary"}
    config = open_clip_config(method, img_size, mean, std, {k: v for k, v in note.items() if v})
    out_dir = Path(out_dir)
    weights = atomic_write(out_dir / OPEN_CLIP_WEIGHTS, lambda tmp: save_file(state, tmp))
    return [atomic_write_text(out_dir / OPEN_CLIP_CONFIG, json.dumps(config, indent=2) + "\n"), weights]


# Captions the verification embeds: words of the toy world and words no compact vocabulary has.
_PROBE_TEXTS = ("a red cube left of a blue sphere.", "a picture of a small green cone", "zebra xylophone quasar", "")


@torch.no_grad()
def verify_open_clip(method: nn.Module, tokenizer, out_dir: Path, img_size: int) -> dict[str, float]:
    """Load ``out_dir`` through open_clip (model and tokenizer) and compare its embeddings with ``method``'s.

    Returns the largest absolute differences of the normalised image and text embeddings and of the logit
    scale; raises RuntimeError when one exceeds `TOLERANCE`.
    """
    import open_clip

    where = f"local-dir:{Path(out_dir).resolve()}"
    model = open_clip.create_model(where).eval()
    oc_tokenizer = open_clip.get_tokenizer(where)
    was_training = method.training
    method.eval()
    try:
        images = torch.randn(4, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
        texts = list(_PROBE_TEXTS)
        diffs = {
            "image": (method.encode_image(images) - model.encode_image(images, normalize=True)).abs().max().item(),
            "text": (method.encode_text(tokenizer(texts)) - model.encode_text(oc_tokenizer(texts), normalize=True)
                     ).abs().max().item(),
            "logit_scale": abs(method.logit_scale.item() - model.logit_scale.item()),
        }
    finally:
        method.train(was_training)
    bad = {k: v for k, v in diffs.items() if not v <= TOLERANCE}
    if bad:
        raise RuntimeError(f"The open_clip files in {out_dir} do not reproduce the method's embeddings (largest "
                           f"differences {bad}, allowed {TOLERANCE}); please report this with the open_clip version.")
    return diffs
