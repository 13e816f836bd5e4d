"""The shared encoder and the masking helper every masked method uses."""
from __future__ import annotations

import pytest
import torch

from mugbench.config import load_config
from mugbench.models.mae_decoder import masked_patch_loss
from mugbench.models.vit import build_encoder, masked_encode, patchify, random_masking, unpatchify


@pytest.fixture(scope="module")
def encoder():
    return build_encoder(load_config("smoke").encoder, seed=0).eval()


def test_same_seed_same_init_different_seed_differs():
    spec = load_config("smoke").encoder
    a, b, c = (build_encoder(spec, seed=s).state_dict() for s in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], c["blocks.0.attn.qkv.weight"])


def test_random_masking_keeps_the_right_tokens():
    torch.manual_seed(0)
    x = torch.arange(2 * 16, dtype=torch.float32).reshape(2, 16, 1)
    kept, mask, ids_restore = random_masking(x, 0.75)
    assert kept.shape == (2, 4, 1) and mask.shape == (2, 16)
    assert mask.sum(1).tolist() == [12, 12]
    for b in range(2):  # the kept tokens are exactly the unmasked positions
        assert sorted(kept[b, :, 0].tolist()) == sorted(x[b, mask[b] == 0, 0].tolist())
    # ids_restore undoes the shuffle: kept-then-removed order back to patch order
    full = torch.cat([kept, x.new_full((2, 12, 1), -1.0)], 1).gather(1, ids_restore.unsqueeze(-1))
    assert torch.equal(full[..., 0] >= 0, mask == 0)


def test_masks_differ_per_sample():
    torch.manual_seed(0)
    _, mask, _ = random_masking(torch.zeros(8, 64, 4), 0.75)
    assert len({tuple(m.tolist()) for m in mask}) == 8


def test_masked_encode_keeps_class_token_and_matches_full_forward(encoder):
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    latent, mask, ids_restore = masked_encode(encoder, x, 0.75)
    n = encoder.patch_embed.num_patches
    assert latent.shape == (2, 1 + n // 4, encoder.embed_dim)
    # with nothing masked, the latent is the ordinary forward up to the token permutation
    latent0, _, restore0 = masked_encode(encoder, x, 0.0)
    patches = latent0[:, 1:].gather(1, restore0.unsqueeze(-1).expand(-1, -1, latent0.shape[-1]))
    full = encoder.forward_features(x)
    torch.testing.assert_close(latent0[:, 0], full[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(patches, full[:, 1:], atol=1e-5, rtol=1e-5)


def test_patchify_roundtrip():
    x = torch.randn(2, 3, 32, 32)
    p = patchify(x, 8)
    assert p.shape == (2, 16, 192)
    assert torch.equal(p[0, 1], x[0, :, 0:8, 8:16].permute(1, 2, 0).reshape(-1))  # row-major patches, HWC
    assert torch.equal(unpatchify(p, 8), x)


def test_mae_loss_only_on_masked_patches_with_normalised_targets():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    mask = torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0]])
    # independent re-derivation, patch by patch
    total = 0.0
    for b in range(2):
        for i in range(4):
            if mask[b, i]:
                t = target[b, i]
                t = (t - t.mean()) / (t.var(unbiased=True) + 1e-6).sqrt()
                total += ((pred[b, i] - t) ** 2).mean()
    torch.testing.assert_close(masked_patch_loss(pred, target, mask), total / 3)
    # a change on an unmasked patch does not move the loss
    pred2 = pred.clone()
    pred2[0, 1] += 10
    torch.testing.assert_close(masked_patch_loss(pred2, target, mask), masked_patch_loss(pred, target, mask))
