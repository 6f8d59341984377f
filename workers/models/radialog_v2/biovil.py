"""BioViL-T image model in plain torch (no torchvision, no hi-ml): ResNet-50 trunk + multi-image ViT pooler.

Attribute names equal the published state dict (hi-ml ``ImageModel`` with a ``MultiImageEncoder``), so
RaDialog's ``model.vision_tower.*`` weights and the classifier's ``model.biovil_encoder.*`` weights load
with zero missing or unexpected keys. Nothing is ever downloaded: weights come only from checkpoints.

BatchNorm: the reference runs RaDialog's vision tower in training mode, i.e. each image (batch of one) is
normalised with its own statistics. :class:`PerImageBatchNorm2d` reproduces that per sample, so a study's
result never depends on its batch companions; with ``per_image=False`` it is an ordinary eval-mode
BatchNorm (running statistics), as the findings classifier uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

VIT_DIM = 256  # per-image channels after backbone_to_vit; patch embeddings are 2 x 256
GRID = (14, 14)  # the ViT pooler's patch grid (448 px input)


class PerImageBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that can normalise every image with its own statistics (reference train-mode at batch 1).

    Instance norm over (H, W) with the BN affine parameters is exactly batch norm at batch size 1 in
    training mode (biased variance); running statistics are neither used nor updated.
    """

    per_image: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.per_image:
            return F.instance_norm(x, weight=self.weight, bias=self.bias, use_input_stats=True, eps=self.eps)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3 conv), as torchvision names it."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = PerImageBatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = PerImageBatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = PerImageBatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50(nn.Module):
    """ResNet-50 trunk returning the last feature map (the unused ``fc`` is kept: it is in the files)."""

    def __init__(self, layers: tuple[int, int, int, int] = (3, 4, 6, 3), width: int = 64, num_classes: int = 1000):
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = PerImageBatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        self.fc = nn.Linear(width * 8 * Bottleneck.expansion, num_classes)
        self.out_channels = width * 8 * Bottleneck.expansion

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, 1, stride=stride, bias=False),
                PerImageBatchNorm2d(planes * Bottleneck.expansion),
            )
        modules = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * Bottleneck.expansion
        modules += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def sine_position_embedding(grid: tuple[int, int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """DETR-style normalised 2-D sine/cosine position embedding, [1, H*W, dim] (y half then x half)."""
    h, w = grid
    half = dim // 2
    ones = torch.ones(1, h, w)
    scale = 2 * math.pi
    y = ones.cumsum(1)
    x = ones.cumsum(2)
    y = y / (y[:, -1:, :] + 1e-6) * scale
    x = x / (x[:, :, -1:] + 1e-6) * scale
    dim_t = torch.arange(half, dtype=torch.float32)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / half)
    pos_x = x[..., None] / dim_t
    pos_y = y[..., None] / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).view(1, h * w, dim)


class MultiHeadAttention(nn.Module):
    """Self-attention with separate q/k/v projections (no bias) and an output projection."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.proj_q = nn.Linear(dim, dim, bias=False)
        self.proj_k = nn.Linear(dim, dim, bias=False)
        self.proj_v = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        heads = [
            p(x).reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)
            for p in (self.proj_q, self.proj_k, self.proj_v)
        ]
        out = F.scaled_dot_product_attention(*heads)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """timm-style MLP (fc1 -> GELU -> fc2)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PoolerBlock(nn.Module):
    """Pre-norm transformer block; position+type embeddings are added to the normed input of attention."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 1.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MultiHeadAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, pos_and_type: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x) + pos_and_type)
        return x + self.mlp(self.norm2(x))


class VisionTransformerPooler(nn.Module):
    """Fuses current and previous patch grids; returns the current image's tokens as a grid."""

    pos_embed: torch.Tensor  # a buffer (register_buffer): typed here, nn.Module.__getattr__ cannot tell

    def __init__(self, dim: int = VIT_DIM, grid: tuple[int, int] = GRID, num_heads: int = 8, num_blocks: int = 3):
        super().__init__()
        self.blocks = nn.ModuleList([PoolerBlock(dim, num_heads) for _ in range(num_blocks)])
        self.norm_post = nn.LayerNorm(dim, eps=1e-6)
        self.grid = grid
        self.type_embed = nn.Parameter(torch.zeros(2, 1, dim))
        self.register_buffer("pos_embed", sine_position_embedding(grid, dim), persistent=False)

    def forward(self, current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        b, c, h, w = current.shape
        if (h, w) != self.grid or previous.shape != current.shape:
            raise ValueError(
                f"ViT pooler expects two {self.grid} grids, got {tuple(current.shape)}, {tuple(previous.shape)}"
            )
        n = h * w
        tokens = torch.cat([current.flatten(2).transpose(1, 2), previous.flatten(2).transpose(1, 2)], dim=1)
        pos = self.pos_embed.to(tokens.dtype).repeat(b, 2, 1)
        types = torch.cat([self.type_embed[0].expand(b, n, -1), self.type_embed[1].expand(b, n, -1)], dim=1)
        pos_and_type = pos + types.to(tokens.dtype)
        for block in self.blocks:
            tokens = block(tokens, pos_and_type)
        tokens = self.norm_post(tokens)
        return tokens[:, :n].transpose(1, 2).reshape(b, c, h, w)


class MultiImageEncoder(nn.Module):
    """ResNet-50 + 1x1 conv to 256 channels + [current, previous-difference] fusion -> 512 channels."""

    def __init__(self, resnet_width: int = 64):
        super().__init__()
        self.encoder = ResNet50(width=resnet_width)
        self.backbone_to_vit = nn.Conv2d(self.encoder.out_channels, VIT_DIM, 1, bias=False)
        self.vit_pooler = VisionTransformerPooler()
        self.missing_previous_emb = nn.Parameter(torch.zeros(1, VIT_DIM, 1, 1))

    def forward(self, current: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
        b = current.shape[0]
        if previous is not None:
            x = self.backbone_to_vit(self.encoder(torch.cat([current, previous], dim=0)))
            patch_x, diff_x = x[:b], self.vit_pooler(x[:b], x[b:])
        else:
            patch_x = self.backbone_to_vit(self.encoder(current))
            diff_x = self.missing_previous_emb.expand(b, -1, patch_x.shape[2], patch_x.shape[3])
        return torch.cat([patch_x, diff_x.to(patch_x.dtype)], dim=1)


class Projector(nn.Module):
    """1x1-conv MLP to the joint space: conv (no bias) -> BN -> ReLU -> conv."""

    def __init__(self, in_dim: int = 2 * VIT_DIM, out_dim: int = 128):
        super().__init__()
        self.model = nn.Sequential(
            nn.Conv2d(in_dim, out_dim, 1, bias=False),
            PerImageBatchNorm2d(out_dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_dim, out_dim, 1, bias=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


@dataclass
class ImageModelOutput:
    img_embedding: torch.Tensor  # [B, 512]
    patch_embeddings: torch.Tensor  # [B, 512, h, w]
    projected_patch_embeddings: torch.Tensor  # [B, joint, h, w]
    projected_global_embedding: torch.Tensor  # [B, joint]


class BioViLT(nn.Module):
    """BioViL-T ``ImageModel``: ``encoder`` (MultiImageEncoder) + ``projector``.

    ``per_image_norm=True`` gives the LLM branch's behaviour (each image its own BN statistics);
    ``False`` uses stored running statistics (the classifier). Call :meth:`set_per_image_norm` to switch.
    """

    def __init__(self, joint_feature_size: int = 128, per_image_norm: bool = True, resnet_width: int = 64):
        super().__init__()
        self.encoder = MultiImageEncoder(resnet_width)
        self.projector = Projector(2 * VIT_DIM, joint_feature_size)
        self.set_per_image_norm(per_image_norm)

    def set_per_image_norm(self, per_image: bool) -> None:
        for module in self.modules():
            if isinstance(module, PerImageBatchNorm2d):
                module.per_image = per_image

    def forward(self, current: torch.Tensor, previous: torch.Tensor | None = None) -> ImageModelOutput:
        patch = self.encoder(current, previous)
        pooled = patch.mean(dim=(2, 3))
        projected = self.projector(patch)
        return ImageModelOutput(
            img_embedding=pooled,
            patch_embeddings=patch,
            projected_patch_embeddings=projected,
            projected_global_embedding=projected.mean(dim=(2, 3)),
        )
