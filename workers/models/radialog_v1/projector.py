"""The BioViL-T projector RaDialog v1 was trained with, when the released checkpoint does not hold it.

In the reference, the BioViL-T image model is built with a fresh 1408-channel projector (Conv 512->1408 without
bias, BatchNorm, ReLU, Conv 1408->1408), the published BioViL-T weights are loaded *without* their projector,
the whole visual encoder is frozen, and LAVIS's checkpoint saver deletes frozen parameters. So
``checkpoint_4.pth`` holds the projector's BatchNorm buffers at most, and the two convolutions are whatever the
random number generator gave at construction. The Q-Former was trained on those numbers, and the LLM on
Q-Former outputs computed with them (``pretraining/train.py``, seeded 42 for training and for the embedding
extraction; the demo seeds 16 and so runs with a projector neither was trained with).

:func:`replay` draws them again: a CPU generator seeded like the reference (42), the same number of draws
in the same order as the construction before the projector consumed -- torchvision's ResNet-50 (every conv's
default init, the fc layer, then the kaiming-normal re-init in module order), the 448-px probe image
``get_encoder_output_dim`` draws, ``backbone_to_vit``, the ViT pooler (its Linear layers' default inits,
``type_embed``, then timm's truncated-normal re-init), ``missing_previous_emb``, the second probe image --
then the projector's own default inits. Nothing is built: scratch tensors only advance the generator.
tests/test_radialog_v1_projector.py checks the result bit for bit against digests of the projector that
hi-ml's own code built under the reference's pinned torch 1.13.0 / torchvision 0.14.0 / timm 0.4.12.

BatchNorm of a fresh module is weight 1, bias 0, running mean 0, variance 1 (no random draws); the loader
uses the checkpoint's buffers where it has them, as the reference's ``load_state_dict(strict=False)`` does.
"""

from __future__ import annotations

import math

import torch

#: pretraining/configs/*.yaml ``run.seed`` (training and embedding extraction).
TRAINING_SEED = 42
#: Where the projector sits in checkpoint_4.pth's ``visual_encoder`` (the published BioViL-T key names).
PROJECTOR_PREFIX = "visual_encoder.projector."
#: The projector's parameters drawn at random (BatchNorm's affine parameters start at 1 and 0).
DRAWN = ("model.0.weight", "model.3.weight", "model.3.bias")
WIDTH = 1408  # joint_feature_size, the Q-Former's encoder width
PATCH_CHANNELS = 512  # BioViL-T patch embeddings: 256 current + 256 "missing previous"

_RESNET50 = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))  # (planes, blocks, stride) per stage
_VIT_DIM, _VIT_BLOCKS = 256, 3


def _resnet50_convs() -> tuple[list[int], list[int]]:
    """Conv weight sizes of torchvision's ResNet-50 in construction order and in ``modules()`` order.

    A stage's first block builds its downsample conv before its own three; as a submodule the downsample
    comes after them (Bottleneck registers conv1, conv2, conv3 and then downsample).
    """
    built, registered = [3 * 64 * 7 * 7], [3 * 64 * 7 * 7]
    inplanes = 64
    for planes, blocks, stride in _RESNET50:
        for block in range(blocks):
            downsample = [inplanes * planes * 4] if block == 0 and (stride != 1 or inplanes != planes * 4) else []
            own = [inplanes * planes, planes * planes * 9, planes * planes * 4]
            built += downsample + own
            registered += own + downsample
            inplanes = planes * 4
    return built, registered


def _advance_to_projector(generator: torch.Generator) -> None:
    """Draw what the reference's construction draws before the projector (values unused, counts exact)."""

    def uniform(n: int) -> None:  # kaiming_uniform_, Linear/Conv bias init, timm trunc_normal_, torch.rand
        torch.empty(n).uniform_(0, 1, generator=generator)

    def normal(n: int) -> None:  # kaiming_normal_ (the count rule of torch's CPU normal_ is its own)
        torch.empty(n).normal_(0, 1, generator=generator)

    built, registered = _resnet50_convs()
    for n in built:
        uniform(n)
    uniform(2048 * 1000)  # fc weight
    uniform(1000)  # fc bias
    for n in registered:
        normal(n)
    uniform(3 * 448 * 448)  # MultiImageEncoder: get_encoder_output_dim's torch.rand((1, 3, 448, 448))
    uniform(2048 * _VIT_DIM)  # backbone_to_vit
    linear, with_bias = _VIT_DIM * _VIT_DIM, _VIT_DIM * _VIT_DIM + _VIT_DIM
    for _ in range(_VIT_BLOCKS):  # proj_q, proj_k, proj_v (no bias), proj, mlp.fc1, mlp.fc2
        for n in (linear, linear, linear, with_bias, with_bias, with_bias):
            uniform(n)
    uniform(2 * _VIT_DIM)  # type_embed, trunc_normal_
    for _ in range(_VIT_BLOCKS * 6):  # self.apply(_init_weights): trunc_normal_ on every Linear weight
        uniform(linear)
    uniform(_VIT_DIM)  # missing_previous_emb, trunc_normal_
    uniform(3 * 448 * 448)  # ImageModel: get_encoder_output_dim again


def replay(seed: int = TRAINING_SEED) -> dict[str, torch.Tensor]:
    """The projector's drawn parameters (``model.0.weight``, ``model.3.weight``, ``model.3.bias``), float32."""
    generator = torch.Generator().manual_seed(seed)
    _advance_to_projector(generator)
    first = torch.empty(WIDTH, PATCH_CHANNELS, 1, 1)
    torch.nn.init.kaiming_uniform_(first, a=math.sqrt(5), generator=generator)  # Conv2d's default init
    second = torch.empty(WIDTH, WIDTH, 1, 1)
    torch.nn.init.kaiming_uniform_(second, a=math.sqrt(5), generator=generator)
    bound = 1 / math.sqrt(WIDTH)
    bias = torch.empty(WIDTH).uniform_(-bound, bound, generator=generator)
    return {"model.0.weight": first, "model.3.weight": second, "model.3.bias": bias}
