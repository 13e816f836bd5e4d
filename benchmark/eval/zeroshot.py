"""Zero-shot classification from text: no labelled training images.

Methods with a text tower compare image embeddings with the mean embedding of a class's prompts
(CLIP's prompt ensembling, Radford et al., 2021). Captioners score each class's prompts under the
caption decoder and pick the class whose prompts are most likely (generative zero-shot, as in
CapPa, Tschannen et al., 2023). The prompt templates and class words belong to the evaluation set
(`ClassificationSet.prompts`, ``class_names``).

Both run at ImageNet's size (50,000 images x 1,000 classes x 7 prompts) and are sharded over the ranks of
a torchrun job (`mugbench.eval.sharding`): each rank scores its run of the image batches, the scores are
gathered in the set's order, and they equal a one-process run's bit for bit. Likelihood scoring puts as
many (image, prompt) sequences into one decoder call as a memory budget allows (`sequences_per_call`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data.tokenizer import trim_padding
from ..method import evaluating
from ..progress import progress_bar
from . import sharding
from .outcomes import percent, topk_outcomes

# Float32 numbers of decoder activations per (position, unit of width, attention block) counted for a
# sequence: the residual stream plus one working tensor (queries, keys, values, the MLP's hidden layer at its
# share). Without gradients only one block's tensors are alive at a time; counting every block keeps the
# estimate an upper bound, with room for what the allocator keeps between calls.
ACTIVATION_FACTOR = 2


@torch.no_grad()
def embedding_scores(method, images: torch.Tensor, classes: list[str], templates, tokenizer, *,
                     batch_size: int = 256, device="cpu") -> torch.Tensor:
    """Cosine similarity ``[N, C]`` of each image with each class's ensembled prompt embedding.

    Image embeddings are computed in the one-process batches of ``batch_size`` and class embeddings one class
    at a time (its prompts in one text-tower call, their mean normalised), both shared out over the ranks
    (`sharding.map_batches`) and gathered on every rank, so a job's scores are one process's."""
    with evaluating(method):
        def image_rows(a: int, b: int) -> torch.Tensor:
            return method.encode_image(images[a:b].to(device)).float().cpu()

        def class_rows(a: int, b: int) -> torch.Tensor:
            weights = [F.normalize(method.encode_text(tokenizer([t.format(name) for t in templates]).to(device))
                                   .mean(0), dim=-1) for name in classes[a:b]]
            return torch.stack(weights).float().cpu()

        feats = sharding.map_batches(image_rows, len(images), batch_size, desc="zero-shot image embeddings")
        weights = sharding.map_batches(class_rows, len(classes), 1)  # one class per batch: as even as classes allow
    if not len(images):
        return torch.zeros(0, len(classes))
    return feats @ weights.T


@dataclass(frozen=True)
class DecoderSize:
    """What a captioner's per-sequence scoring memory depends on (`decoder_size`)."""

    vocab: int
    width: int
    blocks: int  # attention blocks: a decoder layer has two (self- and cross-attention)
    heads: int
    image_tokens: int  # tokens the decoder attends to (at most: a masked latent has fewer)
    image_dim: int


def decoder_size(method) -> DecoderSize:
    """The sizes `sequence_bytes` needs, read off the method: its ``caption_decoder``'s attention blocks
    (CoCa's unimodal text tower included) and its encoder's token count, else the study's `TextSpec`."""
    spec = method.text_spec
    decoder = getattr(method, "caption_decoder", None)
    attention = [m for m in decoder.modules() if isinstance(m, nn.MultiheadAttention)] \
        if isinstance(decoder, nn.Module) else []
    encoder = getattr(method, "encoder", None)
    patch_embed = getattr(encoder, "patch_embed", None)
    tokens = int(getattr(patch_embed, "num_patches", 0) or 0) + int(getattr(encoder, "num_prefix_tokens", 0) or 0)
    return DecoderSize(vocab=spec.vocab_size,
                       width=max((m.embed_dim for m in attention), default=spec.width),
                       blocks=len(attention) or 2 * spec.layers,
                       heads=max((m.num_heads for m in attention), default=spec.heads),
                       image_tokens=tokens, image_dim=int(getattr(encoder, "embed_dim", 0) or 0))


def sequence_bytes(size: DecoderSize, length: int) -> int:
    """Estimated peak memory, in bytes, that one (image, prompt) sequence of ``length`` tokens adds to a
    `likelihood_scores` decoder call. In float32 numbers, with ``n = length - 1`` decoder positions:

    * ``2 n V``: the logits ``[n, V]`` and one more float32 copy (the float32 copy of a bf16 output; for
      float32 logits `caption_log_likelihood` normalises in place, so this is headroom);
    * ``blocks x n x (2 width + heads (n + T))``: the decoder's activations, ``ACTIVATION_FACTOR`` numbers per
      position and unit of width and the attention weights over the caption and the ``T`` image tokens, in
      every attention block (an upper bound: without gradients one block's are alive at a time);
    * ``T (D + 3 width)``: the image tokens repeated for each caption (``score_text`` pairs rows), their
      projection to the decoder's width, and one cross-attention block's normalised copy of them.

    The encoder's activations for the call's images are left out: an image costs less than a sequence
    (ViT-B/16: about 6 MB) and a call never has more images than sequences.

    Paper preset (ViT-B/16: T = 197, D = 768; decoder width 768, 12 layers, 12 heads, V = 49,408) at 24
    prompt tokens (ImageNet's prompts, trimmed): 9.1 MB logits + 9.2 MB activations + 2.4 MB image tokens =
    20.7 MB per sequence, so 51 sequences a call at the default 1024 MB."""
    n, s = max(1, length - 1), size
    logits = 2 * n * s.vocab
    activations = s.blocks * n * (ACTIVATION_FACTOR * s.width + s.heads * (n + s.image_tokens))
    image = s.image_tokens * (s.image_dim + 3 * s.width)
    return 4 * (logits + activations + image)


def sequences_per_call(size: DecoderSize, length: int, max_memory_mb: float) -> int:
    """How many (image, prompt) sequences of ``length`` tokens one decoder call may score within
    ``max_memory_mb`` (`sequence_bytes`); at least one."""
    return max(1, int(max_memory_mb * 2 ** 20 // sequence_bytes(size, length)))


@torch.no_grad()
def likelihood_scores(method, images: torch.Tensor, classes: list[str], templates, tokenizer, *,
                      seed: int, batch_size: int = 100, max_memory_mb: float = 1024,
                      device="cpu") -> torch.Tensor:
    """Mean log-likelihood ``[N, C]`` of each class's prompts given each image (averaged over
    prompts). A method that captions from a randomly masked latent draws its masks from ``seed``.

    Memory is bounded by ``max_memory_mb`` per decoder call, whatever the number of classes: the prompts
    are tokenized once and cut to the longest one's length (`trim_padding`), and each call scores a piece
    of an image batch against a chunk of the prompts, ``sequences_per_call`` pairs in all; only a batch's
    ``[b, prompts]`` scores are kept (never anything of size images x prompts x vocabulary).

    A captioner with ``scoring_memory`` and ``score_text_with_memory`` (`CaptioningMixin`: cap, mug, coca)
    encodes each batch of ``batch_size`` images once, its masks drawn from `sharding.batch_seed` of the
    batch's first image, and every call decodes against those tokens: the scores depend neither on the
    budget nor on the chunks. Any other ``score_text`` encodes the images of every call, so its batches
    shrink to what one call holds and each call is seeded alike. The batches are one process's
    (`sharding.map_batches`), so a torchrun job's gathered scores equal one process's bit for bit.

    Cost on ImageNet (paper preset; prompts trimmed to 24 tokens, 20.7 MB per sequence): 50,000 encoder
    passes and 350 million decoded sequences, in 6.9 million calls of 51 at the default 1024 MB, or 0.46
    million calls of 768 at 16,384 MB (an 80 GB GPU), split over the ranks. Prompts of one template share
    their prefix (``a photo of a ...``), but its decoding is not shared: open_clip's
    ``MultimodalTransformer`` has no key-value cache to continue from a decoded prefix."""
    words = [t.format(name) for name in classes for t in templates]
    # Tokenized once, without the padding columns no prompt uses: the decoder's cost and its
    # [positions, vocabulary] logits grow with the padded length (77 for the paper's context).
    prompts = trim_padding(tokenizer(words), tokenizer.pad_id).to(device)
    n, n_prompts, n_templates = len(images), len(words), len(templates)
    per_call = sequences_per_call(decoder_size(method), prompts.shape[1], max_memory_mb)
    encode, score = getattr(method, "scoring_memory", None), getattr(method, "score_text_with_memory", None)
    if callable(encode) and callable(score):
        image_batch = int(batch_size)
    else:  # score_text draws a masking method's masks in every call: a call holds its whole batch
        encode, score, image_batch = (lambda x: x), method.score_text, max(1, min(int(batch_size), per_call))

    def pieces(b: int) -> tuple[int, int]:
        """(images, prompts) per call for a batch of ``b`` images."""
        rows = min(b, per_call)
        return rows, min(n_prompts, max(1, per_call // rows))

    spans = sharding.my_batches(n, image_batch)
    calls = sum(-(-(b - a) // pieces(b - a)[0]) * -(-n_prompts // pieces(b - a)[1]) for a, b in spans)
    with progress_bar(calls, desc="zero-shot scoring", unit="call", disable=not sharding.is_main()) as bar:
        def batch_rows(a: int, b: int) -> torch.Tensor:
            rows, k = pieces(b - a)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sharding.batch_seed(seed, a))  # the batch's masks, whatever the calls
                memory = encode(images[a:b].to(device))
            scores = torch.empty(b - a, n_prompts)  # the batch's scores, no more: 256 x 7,000 floats are 7 MB
            for i in range(0, b - a, rows):
                for p in range(0, n_prompts, k):
                    part, chunk = memory[i:i + rows], prompts[p:p + k]
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(sharding.batch_seed(seed, a))
                        part = score(part, chunk.repeat(len(part), 1))
                    scores[i:i + rows, p:p + k] = part.view(len(scores[i:i + rows]), -1).float().cpu()
                    bar.update()
            # The per-class mean of the complete [b, C, T] scores: the same reduction whatever the chunks.
            return scores.view(b - a, len(classes), n_templates).mean(-1)

        rows = sharding.map_batches(batch_rows, n, image_batch)
    return rows if n else torch.zeros(0, len(classes))


def accuracy(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1 (and, with more than 10 classes, top-5) accuracy in percent: the mean of `topk_outcomes`."""
    return percent(topk_outcomes(scores, labels))
