"""1x1 convolutions as linear layers, so that everything ditq does to an ``nn.Linear`` applies to them.

A 1x1 convolution (stride 1, no padding, no dilation, one group) maps the channels of each pixel with one matrix:
``y[b, :, h, w] = W x[b, :, h, w] + bias``, a linear layer over channels-last rows. Sana's MLP (``GLUMBConv``: its
``conv_inverted`` and ``conv_point``, about half of the model's weights) is built this way, and so are the
``proj_in`` / ``proj_out`` of diffusers' continuous-input ``Transformer2DModel``.

:func:`wrap` puts a :class:`PointwiseConv` where each such convolution was: a module whose child ``linear`` is an
``nn.Linear`` *sharing* the convolution's weight and bias (the [N, K, 1, 1] weight seen as [N, K]; nothing copied)
and whose forward moves the channels last, applies ``linear`` and moves them back. Calibration hooks, layer
selection, the swap to :class:`ditq.nn.QuantLinear`, reports, checkpoints and run-time LoRA then all see an
ordinary linear named ``<conv name>.linear``. :func:`unwrap` puts the original convolutions back (a failed
quantization, or a convolution whose linear was not quantized). A checkpoint lists the wrapped names (its header's
``pointwise_convs``) so that loading wraps the same ones before it places the quantized layers.

The GEMM reads the channels-last rows the ``movedim`` gives (``QuantLinear`` makes them contiguous once, as it does
for any input); the output comes back as a channels-last view of [B, N, H, W], which the depthwise convolution and
the elementwise ops after it take as they are.
"""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn

LINEAR = "linear"  # the child's name: quantized layers of wrapped convolutions are named "<conv>.linear"


def is_pointwise(module: nn.Module) -> bool:
    """A 2-D convolution that is a per-pixel linear map of the channels."""
    return (type(module) is nn.Conv2d and module.kernel_size == (1, 1) and module.stride == (1, 1)
            and module.padding in ((0, 0), "valid") and module.dilation == (1, 1) and module.groups == 1
            and module.padding_mode == "zeros")


class PointwiseConv(nn.Module):
    """A 1x1 convolution as ``linear`` over channels-last rows (see the module docstring). ``conv`` keeps the
    original module (not a child: it is what :func:`unwrap` restores)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        linear = nn.Linear(conv.in_channels, conv.out_channels, bias=conv.bias is not None, device="meta")
        # the same tensors, seen as a linear's: [N, K, 1, 1] -> [N, K] is a view of a contiguous weight
        linear.weight = nn.Parameter(conv.weight.detach().reshape(conv.out_channels, conv.in_channels),
                                     requires_grad=conv.weight.requires_grad)
        linear.bias = conv.bias
        self.linear = linear
        object.__setattr__(self, "conv", conv)

    def release(self) -> None:
        """Drop the reference to the original convolution (once its linear is quantized, its float weight would
        otherwise stay alive through it); :func:`unwrap` then leaves this one in place."""
        self.__dict__.pop("conv", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"a 1x1 convolution takes [B, C, H, W] input, got shape {tuple(x.shape)}")
        return self.linear(x.movedim(1, -1)).movedim(-1, 1)


def _parent(root: nn.Module, name: str):
    parent, _, attr = name.rpartition(".")
    return (root.get_submodule(parent) if parent else root), attr


def wrap(root: nn.Module, names=None) -> List[str]:
    """Replace each pointwise convolution under ``root`` (or those ``names``) by a :class:`PointwiseConv`; returns
    the wrapped names. A convolution reachable under several names, or whose weight is not contiguous (the [N, K]
    view needs it), is left alone."""
    seen: Dict[int, int] = {}
    for _, m in root.named_modules(remove_duplicate=False):
        seen[id(m)] = seen.get(id(m), 0) + 1
    found = [n for n, m in root.named_modules() if n and is_pointwise(m) and seen[id(m)] == 1
             and m.weight.is_contiguous()]
    if names is not None:
        missing = sorted(set(names) - set(found))
        if missing:
            raise ValueError(f"not a 1x1 convolution ditq can treat as a linear layer: {', '.join(missing[:4])}")
        found = [n for n in found if n in set(names)]
    for name in found:
        parent, attr = _parent(root, name)
        setattr(parent, attr, PointwiseConv(getattr(parent, attr)))
    return found


def unwrap(root: nn.Module, names) -> None:
    """Put the original convolutions back at ``names`` (each a :class:`PointwiseConv` made by :func:`wrap`)."""
    for name in names:
        parent, attr = _parent(root, name)
        module = getattr(parent, attr)
        if isinstance(module, PointwiseConv) and "conv" in module.__dict__:
            setattr(parent, attr, module.conv)


def wrapped_names(root: nn.Module) -> List[str]:
    return [n for n, m in root.named_modules() if isinstance(m, PointwiseConv)]
