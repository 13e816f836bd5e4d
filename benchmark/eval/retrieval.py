"""Image-text retrieval: Recall@K in both directions on a set of images with several captions each."""
from __future__ import annotations

import torch

from ..method import evaluating
from .sharding import map_batches


def recall_at_k(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor,
                ks=(1, 5, 10)) -> dict[str, float]:
    """Recall@K in percent for image->text and text->image retrieval by cosine similarity.

    ``text_to_image[j]`` is the index of the image caption ``j`` describes. An image query is
    correct at K when any of its captions is among the K most similar texts (the COCO/Flickr
    Karpathy-split convention); a text query when its image is among the K most similar images.
    """
    image_emb = torch.nn.functional.normalize(image_emb.float(), dim=-1)
    text_emb = torch.nn.functional.normalize(text_emb.float(), dim=-1)
    sim = image_emb @ text_emb.T  # [I, T]
    out = {}
    for k in ks:
        top_texts = sim.topk(min(k, sim.shape[1]), dim=1).indices  # [I, k]
        out[f"i2t_r{k}"] = 100.0 * (text_to_image[top_texts] == torch.arange(len(sim))[:, None]).any(1).float().mean().item()
        top_images = sim.T.topk(min(k, sim.shape[0]), dim=1).indices  # [T, k]
        out[f"t2i_r{k}"] = 100.0 * (top_images == text_to_image[:, None]).any(1).float().mean().item()
    return out


@torch.no_grad()
def embed_pairs(method, images: torch.Tensor, captions: list[list[str]], tokenizer, *, batch_size: int = 256,
                device="cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(image embeddings, text embeddings, text_to_image)`` for images with caption lists; in a torchrun
    job each rank embeds its run of the batches of each (`sharding.map_batches`), and every rank gets all."""
    texts = [c for caps in captions for c in caps]
    owner = torch.tensor([i for i, caps in enumerate(captions) for _ in caps])
    with evaluating(method):
        img = map_batches(lambda a, b: method.encode_image(images[a:b].to(device)).float().cpu(), len(images),
                          batch_size, desc="retrieval: images")
        txt = map_batches(lambda a, b: method.encode_text(tokenizer(texts[a:b]).to(device)).float().cpu(), len(texts),
                          batch_size, desc="retrieval: captions")
    return img, txt, owner
