"""timm's Vision Transformers as a backbone family: one stage per transformer block.

Stage ``i`` is ``blocks[i]`` of the timm model; the patch embedding, the class token and the position embedding
compute with stage ``0`` and the final norm with the last stage, so ``model.blocks=0-2,3-5,6-8,9-11`` cuts a
12-block ViT into four blocks of three, the embedding training with the first and the norm with the last. Every
stage's output is the token sequence, (N, prefix + L, C): the class token (and any register tokens) first.

The architecture is any timm ``vit_*`` model built as timm's ``VisionTransformer`` (``vit_tiny_patch16_224``,
``vit_small_patch16_224``, ...), at the dataset's image size and channels; ``model.patch_size``, ``model.depth``,
``model.embed_dim`` and ``model.num_heads`` override its own (0 keeps them: ``vit_tiny_patch16_224`` with
``model.patch_size=4`` reads 28 px Fashion-MNIST as 7 x 7 patches), ``model.drop_path`` is timm's stochastic depth
rate. timm is imported when a ViT is asked for, not before: ResNet runs do not pay for it.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from blockssl.models.backbone import BackboneOptions, Family, StageInfo, register_family

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer

EXAMPLES = ("vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224")
EMBED = "embed."  # the embedding's prefix in the backbone's state dict; timm keeps it at the top level


def timm_kwargs(options: BackboneOptions) -> dict[str, Any]:
    """The ``timm.create_model`` arguments of the options, beside the architecture's name (no classifier)."""
    overrides = {"patch_size": options.patch_size, "depth": options.depth, "embed_dim": options.embed_dim,
                 "num_heads": options.num_heads}
    return {"num_classes": 0, "img_size": options.image_size, "in_chans": options.in_channels,
            **{k: v for k, v in overrides.items() if v}, **({"drop_path_rate": options.drop_path}
                                                             if options.drop_path else {})}


def _create(arch: str, options: BackboneOptions) -> VisionTransformer:
    import timm
    from timm.models.vision_transformer import VisionTransformer

    model = timm.create_model(arch, pretrained=False, **timm_kwargs(options))
    if type(model) is not VisionTransformer:
        raise ValueError(f"model.arch {arch!r} is a timm {type(model).__name__}, not a plain VisionTransformer; "
                         f"choose a vit_* model such as {', '.join(EXAMPLES)}")
    return model


class Embedding(nn.Module):
    """Patches to tokens: timm's patch embedding, prefix tokens and position embedding, by timm's own code."""

    def __init__(self, vit: VisionTransformer) -> None:
        super().__init__()
        self.patch_embed, self.pos_drop, self.patch_drop, self.norm_pre = (
            vit.patch_embed, vit.pos_drop, vit.patch_drop, vit.norm_pre)
        self.cls_token, self.reg_token, self.pos_embed = vit.cls_token, vit.reg_token, vit.pos_embed
        # the attributes timm's _pos_embed reads
        self.no_embed_class, self.dynamic_img_size = vit.no_embed_class, vit.dynamic_img_size
        self.num_prefix_tokens = vit.num_prefix_tokens
        self.timm_pos_embed = type(vit)._pos_embed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.timm_pos_embed(self, self.patch_embed(x))  # type: ignore[arg-type]  # has what it reads
        return self.norm_pre(self.patch_drop(tokens))


class ViT(nn.Module):
    """A timm ``VisionTransformer`` without its classifier, as stages (see the module's docstring).

    Its modules are timm's own; the state dict is timm's with the embedding under ``embed.``
    (``library_state_dict`` takes it off).
    """

    def __init__(self, arch: str, options: BackboneOptions) -> None:
        super().__init__()
        vit = _create(arch, options)
        self.embed = Embedding(vit)
        self.blocks = vit.blocks
        self.norm = vit.norm
        depth, width = len(vit.blocks), vit.embed_dim
        patch = vit.patch_embed.patch_size[0]
        self.stage_info: tuple[StageInfo, ...] = tuple(
            StageInfo(str(i), width, patch, "NLC", vit.num_prefix_tokens) for i in range(depth))

    def no_weight_decay(self) -> set[str]:
        """Parameters trained without weight decay, as timm's ``VisionTransformer.no_weight_decay`` names them."""
        return {f"{EMBED}{name}" for name in ("pos_embed", "cls_token", "reg_token")}

    def stage_modules(self, name: str) -> list[nn.Module]:
        names = [s.name for s in self.stage_info]
        if name not in names:
            raise KeyError(f"unknown stage {name!r}; stages are {names[0]} to {names[-1]}")
        i = int(name)
        return [*([self.embed] if i == 0 else []), self.blocks[i], *([self.norm] if i == len(names) - 1 else [])]

    def stage(self, name: str) -> nn.Module:
        modules = self.stage_modules(name)
        return modules[0] if len(modules) == 1 else nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for info in self.stage_info:
            x = self.stage(info.name)(x)
        return x


@functools.cache
def _stages(arch: str, options: BackboneOptions) -> tuple[str, ...]:
    """Built on the meta device (no memory, a tenth of a second), so that timm checks the options."""
    try:
        with torch.device("meta"):
            depth = len(_create(arch, options).blocks)
    except (AssertionError, RuntimeError) as e:  # timm asserts, e.g. embed_dim divisible by num_heads
        raise ValueError(f"model.arch={arch} with {timm_kwargs(options)}: timm cannot build it "
                         f"({e or type(e).__name__}); check model.embed_dim, model.num_heads and model.patch_size"
                         ) from None
    return tuple(str(i) for i in range(depth))


def _loads_into(arch: str, options: BackboneOptions) -> str:
    args = "".join(f", {k}={v!r}" for k, v in timm_kwargs(options).items())
    return f"timm.create_model({arch!r}{args})"


def library_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The backbone's state dict under timm's names."""
    return {k.removeprefix(EMBED): v for k, v in state.items()}


register_family("vit", Family(
    EXAMPLES, _stages, ViT, _loads_into,
    options=("patch_size", "depth", "embed_dim", "num_heads", "drop_path", "token_pool"),
    accepts=lambda arch: arch.startswith("vit_"), library_names=library_state_dict))
