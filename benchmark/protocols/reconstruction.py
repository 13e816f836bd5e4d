"""Masked-image reconstruction (`mugbench.eval.reconstruction`), MAE's Fig. 2 as a number and a figure."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..config import COUNT
from ..protocol import EvalContext, Protocol, ProtocolResult
from ..registry import register_protocol


@register_protocol("reconstruction")
class Reconstruction(Protocol):
    """Pixel error on the removed patches of the val images, and a PNG grid of the first few."""

    reads, set_kind, label, headline, order = "method", "captions", "reconstruction", ("masked_mse",), 80
    transfer, needs = False, ("reconstruct",)

    @dataclass
    class Options:
        """The figure."""

        figure_images: int = COUNT.field(8)

    @classmethod
    def method_problems(cls, method_cls: type) -> list[str]:
        """A method that reconstructs must say how much it masks (``Options.mask_ratio``): the record and
        the figure's caption state it."""
        problems = super().method_problems(method_cls)
        if cls.applies_to(method_cls):
            options = getattr(method_cls, "Options", None)
            fields = {f.name for f in dataclasses.fields(options)} if dataclasses.is_dataclass(options) else set()
            if "mask_ratio" not in fields:
                problems.append(f"{method_cls.__name__} defines reconstruct() but its Options have no mask_ratio, "
                                f"which the reconstruction protocol records beside the error")
        return problems

    def run(self, subject, data, options, ctx: EvalContext) -> ProtocolResult:
        """Masks drawn from the seed; the figure goes to ``ctx.artifact`` + ``.png`` (drawn by rank 0 alone in a
        torchrun job)."""
        from ..eval.reconstruction import reconstruction_error, save_reconstruction_grid  # torch: imported when run, not when the registry is read
        from ..eval.sharding import is_main
        images = data.val.image
        patch = subject.encoder.patch_embed.patch_size[0]  # the shared timm ViT's
        metrics = reconstruction_error(subject, images, seed=ctx.seed, patch_size=patch, device=ctx.device)
        grid = ctx.artifact.with_suffix(".png")
        if is_main():
            save_reconstruction_grid(subject, images[:options.figure_images], grid, seed=ctx.seed, device=ctx.device)
        # The figure's columns by key, so a report can set each beside other methods' captions of that image.
        columns = [{"key": k} for k in data.val.key[:options.figure_images]]
        return ProtocolResult(metrics, {"mask_ratio": subject.options.mask_ratio, "figure": grid.name}, columns)
