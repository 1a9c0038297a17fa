"""torchvision backbones for P, F and RIFE, cut before their pooling / classifier.

Every model is built with ``weights=None``: nothing is downloaded at run time.
ImageNet weights come only from a local file (``model.backbone_weights``), a
state dict as saved by ``torch.save(torchvision.models.resnet50().state_dict())``;
it is loaded into the *full* torchvision model (so ``fc.*`` / ``classifier.*``
keys are accepted) before the model is cut.

ResNets use the re-id "last stride 1" trick by default: the first block of
layer4 keeps stride 1, so the final map is 1/16 of the input instead of 1/32.

``width`` scales a ResNet's channels (64 = torchvision's; 32 = half the channels
of every layer, about 1/4 of the multiply-adds): the narrower trunk is built from
torchvision's own blocks with torchvision's layer names, so it is the same network
at another width. ImageNet weights exist only for width 64.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn as nn
import torchvision

from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

from components.config import BACKBONES, RESNETS
from components.models.weights import load_state_dict_file

STAGE_CHANNELS = {
    "resnet18": [64, 128, 256, 512],
    "resnet34": [64, 128, 256, 512],
    "resnet50": [256, 512, 1024, 2048],
}
RESNET_LAYOUT = {"resnet18": (BasicBlock, (2, 2, 2, 2)), "resnet34": (BasicBlock, (3, 4, 6, 3)),
                 "resnet50": (Bottleneck, (3, 4, 6, 3))}
TORCHVISION_WIDTH = 64
MOBILENET_CHANNELS = 576  # mobilenet_v3_small.features output


def _check_name(name: str, allowed=BACKBONES) -> None:
    if name not in allowed:
        raise ValueError(f"unknown backbone {name!r}; allowed: {', '.join(allowed)}")


def _shape(v) -> str:
    return str(tuple(v.shape)) if torch.is_tensor(v) else type(v).__name__


def load_backbone_weights(model: nn.Module, path: str | Path, name: str) -> None:
    """Load a local torchvision ImageNet state dict into ``model`` (a full torchvision ``name``)."""
    load_state_dict_file(
        model, path, "model.backbone_weights", f"torchvision {name}", check="model.backbone",
        hint=f"save a torchvision {name} state dict there "
             f"(torch.save(torchvision.models.{name}(weights=...).state_dict(), path))",
    )


def _set_last_stride(net: torchvision.models.ResNet, stride: int) -> None:
    block = net.layer4[0]
    # Bottleneck (resnet50) strides in conv2, BasicBlock (resnet18/34) in conv1
    conv = block.conv2 if isinstance(block, torchvision.models.resnet.Bottleneck) else block.conv1
    conv.stride = (stride, stride)
    if block.downsample is not None:
        block.downsample[0].stride = (stride, stride)


def _torchvision(name: str, weights, last_stride: int, width: int = TORCHVISION_WIDTH) -> nn.Module:
    _check_name(name)
    if name in RESNETS and width != TORCHVISION_WIDTH:
        if weights is not None:
            raise ValueError(f"model.width = {width}: ImageNet weights (model.backbone_weights) exist only for "
                             f"width {TORCHVISION_WIDTH}; set model.width: {TORCHVISION_WIDTH} or backbone_weights: null")
        net = _scaled_resnet(name, width)
    else:
        net = getattr(torchvision.models, name)(weights=None)
    if weights is not None:
        load_backbone_weights(net, weights, name)
    if name in RESNETS:
        if last_stride not in (1, 2):
            raise ValueError(f"last_stride must be 1 or 2, got {last_stride}")
        _set_last_stride(net, last_stride)
    return net


def _scaled_resnet(name: str, width: int) -> nn.Module:
    """torchvision's ResNet ``name`` with every layer's channels times width / 64 (no fc)."""
    if width < 8 or width % 8:
        raise ValueError(f"model.width = {width}: use a multiple of 8 (64 = torchvision's ResNet)")
    block, depths = RESNET_LAYOUT[name]
    net = nn.Module()
    net.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
    net.bn1, net.relu, net.maxpool = nn.BatchNorm2d(width), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
    inplanes = width
    for i, depth in enumerate(depths):
        planes, stride, blocks = width * 2 ** i, 1 if i == 0 else 2, []
        for _ in range(depth):
            down = None
            if stride != 1 or inplanes != planes * block.expansion:
                down = nn.Sequential(conv1x1(inplanes, planes * block.expansion, stride),
                                     nn.BatchNorm2d(planes * block.expansion))
            blocks.append(block(inplanes, planes, stride, down))
            inplanes, stride = planes * block.expansion, 1
        setattr(net, f"layer{i + 1}", nn.Sequential(*blocks))
    for m in net.modules():  # torchvision's initialisation
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return net


def stage_channels(name: str, width: int = TORCHVISION_WIDTH) -> list[int]:
    """Output channels of layer1..layer4 of ResNet ``name`` at ``width``."""
    return [c * width // TORCHVISION_WIDTH for c in STAGE_CHANNELS[name]]


def resnet_stages(
    name: str, weights: str | Path | None = None, last_stride: int = 1, width: int = TORCHVISION_WIDTH
) -> tuple[nn.Module, list[nn.Module], list[int]]:
    """(stem, [layer1..layer4], their out channels) of a torchvision ResNet (for RIFE).

    stem = conv1, bn1, relu, maxpool; chaining stem and the four stages gives the
    same map as ``build_backbone(name, weights, last_stride)``.
    """
    _check_name(name, RESNETS)
    net = _torchvision(name, weights, last_stride, width)
    stem = nn.Sequential(OrderedDict(conv1=net.conv1, bn1=net.bn1, relu=net.relu, maxpool=net.maxpool))
    stages = [net.layer1, net.layer2, net.layer3, net.layer4]
    return stem, stages, stage_channels(name, width)


def build_backbone(
    name: str, weights: str | Path | None = None, last_stride: int = 1, width: int = TORCHVISION_WIDTH
) -> tuple[nn.Module, int]:
    """A torchvision model cut before pooling: x [B,3,H,W] -> maps [B,C,h,w], and C.

    ResNets keep torchvision's key names (``conv1.weight``, ``layer4.2...``);
    ``last_stride`` and ``width`` are ignored for mobilenet_v3_small.
    """
    _check_name(name)
    if name in RESNETS:
        net = _torchvision(name, weights, last_stride, width)
        body = nn.Sequential(
            OrderedDict(
                (k, getattr(net, k))
                for k in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
            )
        )
        return body, stage_channels(name, width)[-1]
    net = _torchvision(name, weights, last_stride)
    return net.features, MOBILENET_CHANNELS
