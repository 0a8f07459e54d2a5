"""Hand-written re-parameterizable blocks, in the styles their papers' code uses, with their own
hand-written ``reparameterize()`` that returns the deploy-time conv (the baseline fxopt must match).

RepVGG, ACNet, DBB, MobileOne, RepLKNet and DEA-Net's DEConv; module style (nn.Conv2d + nn.BatchNorm2d)
and functional style (F.conv2d + F.batch_norm on the block's own tensors).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------
# the hand-written reparameterization helpers (what each family's repo carries)


def fuse_bn(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    std = (bn.running_var + bn.eps).sqrt()
    a = bn.weight / std
    b = torch.zeros_like(bn.running_mean) if bias is None else bias
    return weight * a.view(-1, 1, 1, 1), (b - bn.running_mean) * a + bn.bias


def centred(weight: torch.Tensor, k: int) -> torch.Tensor:
    ph, pw = (k - weight.shape[2]) // 2, (k - weight.shape[3]) // 2
    return F.pad(weight, [pw, pw, ph, ph])  # F.pad: last dimension (width) first


def identity_kernel(channels: int, groups: int, k: int) -> torch.Tensor:
    w = torch.zeros(channels, channels // groups, k, k)
    for c in range(channels):
        w[c, c % (channels // groups), k // 2, k // 2] = 1.0
    return w


def deploy_conv(ref: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    conv = nn.Conv2d(ref.in_channels, ref.out_channels, ref.kernel_size, ref.stride, ref.padding, ref.dilation,
                     ref.groups, True, ref.padding_mode)
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
    return conv


def conv_bn(cin: int, cout: int, k: int | tuple[int, int], stride: int, padding, groups: int = 1,
            dilation: int = 1, padding_mode: str = "zeros") -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias=False, padding_mode=padding_mode),
        nn.BatchNorm2d(cout),
    )


def fused(branch: nn.Sequential, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    w, b = fuse_bn(branch[0].weight, branch[0].bias, branch[1])
    return centred(w, k), b


# ---------------------------------------------------------------------------------------------
# RepVGG: 3x3-BN + 1x1-BN + BN identity


class RepVGGBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1, groups: int = 1, dilation: int = 1,
                 padding_mode: str = "zeros"):
        super().__init__()
        self.k = 3
        self.dense = conv_bn(cin, cout, 3, stride, dilation, groups, dilation, padding_mode)
        self.one = conv_bn(cin, cout, 1, stride, 0, groups)
        self.identity = nn.BatchNorm2d(cout) if cin == cout and stride == 1 else None
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dense(x) + self.one(x)
        return out + self.identity(x) if self.identity is not None else out

    @torch.no_grad()
    def reparameterize(self) -> nn.Conv2d:
        w, b = fused(self.dense, 3)
        w1, b1 = fused(self.one, 3)
        w, b = w + w1, b + b1
        if self.identity is not None:
            c = self.identity.num_features
            wi, bi = fuse_bn(identity_kernel(c, self.groups, 3), None, self.identity)
            w, b = w + wi, b + bi
        return deploy_conv(self.dense[0], w, b)


class RepVGGFunctional(RepVGGBlock):
    """The same block written with F.conv2d / F.batch_norm (timm / MMCV style)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c3, bn3, c1, bn1 = self.dense[0], self.dense[1], self.one[0], self.one[1]
        y = F.batch_norm(F.conv2d(x, c3.weight, None, c3.stride, c3.padding, c3.dilation, c3.groups)
                         if c3.padding_mode == "zeros" else c3(x),
                         bn3.running_mean, bn3.running_var, bn3.weight, bn3.bias, False, 0.1, bn3.eps)
        y = y + F.batch_norm(F.conv2d(x, c1.weight, None, c1.stride, 0, 1, c1.groups),
                             bn1.running_mean, bn1.running_var, bn1.weight, bn1.bias, False, 0.1, bn1.eps)
        if self.identity is not None:
            i = self.identity
            y = F.batch_norm(x, i.running_mean, i.running_var, i.weight, i.bias, False, 0.1, i.eps) + y
        return y


# ---------------------------------------------------------------------------------------------
# ACNet: KxK-BN + 1xK-BN + Kx1-BN


class ACBlock(nn.Module):
    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, padding_mode: str = "zeros"):
        super().__init__()
        p = k // 2
        self.square = conv_bn(cin, cout, k, stride, p, padding_mode=padding_mode)
        self.hor = conv_bn(cin, cout, (1, k), stride, (0, p), padding_mode=padding_mode)
        self.ver = conv_bn(cin, cout, (k, 1), stride, (p, 0), padding_mode=padding_mode)
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.square(x) + self.hor(x) + self.ver(x)

    @torch.no_grad()
    def reparameterize(self) -> nn.Conv2d:
        parts = [fused(b, self.k) for b in (self.square, self.hor, self.ver)]
        return deploy_conv(self.square[0], sum(w for w, _ in parts), sum(b for _, b in parts))


# ---------------------------------------------------------------------------------------------
# DBB: KxK-BN + 1x1-BN + (1x1 -> BNAndPad -> KxK)-BN + (1x1 -> BNAndPad -> avg)-BN


class BNAndPad(nn.Module):
    """DBB's BNAndPadLayer: a BatchNorm whose output is padded with the BN's own per-channel shift
    (what it gives a zero input), written into the border with one slice assignment per side.

    With the KxK conv after it at padding 0, the 1x1 -> BN -> KxK branch is one KxK conv with zero
    padding on the block's input (zero padding there would need the shift at the border).
    """

    def __init__(self, pad: int, channels: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn(x)
        if self.pad > 0:
            bn, p = self.bn, self.pad
            shift = bn.bias.detach() - bn.running_mean * bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
            out = F.pad(out, [p, p, p, p])
            shift = shift.view(1, -1, 1, 1)
            out[:, :, 0:p, :] = shift
            out[:, :, -p:, :] = shift
            out[:, :, :, 0:p] = shift
            out[:, :, :, -p:] = shift
        return out


class IdentityBasedConv1x1(nn.Conv2d):
    """DBB's 1x1 conv that learns a residual on the identity: its kernel is weight + I, built in forward."""

    def __init__(self, channels: int, groups: int = 1):
        super().__init__(channels, channels, 1, groups=groups, bias=False)
        per_group = channels // groups
        identity = torch.zeros(channels, per_group, 1, 1)
        for c in range(channels):
            identity[c, c % per_group] = 1.0
        self.register_buffer("id_tensor", identity)
        nn.init.normal_(self.weight, std=0.1)  # DBB starts from zeros; trained weights are not

    def kernel(self) -> torch.Tensor:
        return self.weight + self.id_tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.kernel(), None, 1, 0, 1, self.groups)


class DBBlock(nn.Module):
    """The Diverse Branch Block as its paper's code builds it: the 1x1 -> KxK and 1x1 -> avg branches pad
    with BNAndPad and run their KxK conv / pool at padding 0 (torch.export captures it: slice writes)."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1):
        super().__init__()
        p = k // 2
        self.k, self.groups = k, groups
        self.origin = conv_bn(cin, cout, k, stride, p, groups)
        depthwise = groups >= cout
        self.one = None if depthwise else conv_bn(cin, cout, 1, stride, 0, groups)
        if depthwise:  # no 1x1 before the pool: it pads the input with zeros itself
            self.avg = nn.Sequential(nn.AvgPool2d(k, stride, p))
        else:
            self.avg = nn.Sequential(nn.Conv2d(cin, cout, 1, groups=groups, bias=False), BNAndPad(p, cout),
                                     nn.AvgPool2d(k, stride, 0))
        self.avg_bn = nn.BatchNorm2d(cout)
        self.idconv = IdentityBasedConv1x1(cin, groups)
        self.bn_pad = BNAndPad(p, cin)
        self.kxk = conv_bn(cin, cout, k, stride, 0, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.origin(x)
        if self.one is not None:
            out = out + self.one(x)
        out = out + self.avg_bn(self.avg(x))
        return out + self.kxk(self.bn_pad(self.idconv(x)))

    @torch.no_grad()
    def reparameterize(self) -> nn.Conv2d:
        g, k = self.groups, self.k
        w, b = fused(self.origin, k)
        if self.one is not None:
            w1, b1 = fused(self.one, k)
            w, b = w + w1, b + b1
        first = fuse_bn(self.idconv.kernel(), None, self.bn_pad.bn)
        w2, b2 = _compose_1x1_then_kxk_bias(first, fuse_bn(self.kxk[0].weight, None, self.kxk[1]), g)
        avg = torch.ones(k, k) / k**2
        cout = self.avg_bn.num_features
        if self.one is None:
            wa, ba = fuse_bn(_depthwise_as_grouped(avg, cout, g), None, self.avg_bn)
        else:
            first = fuse_bn(self.avg[0].weight, None, self.avg[1].bn)
            second = fuse_bn(_depthwise_as_grouped(avg, cout, g), None, self.avg_bn)
            wa, ba = _compose_1x1_then_kxk_bias(first, second, g)
        return deploy_conv(self.origin[0], w + w2 + wa, b + b2 + ba)


def _compose_1x1_then_kxk_bias(first: tuple[torch.Tensor, torch.Tensor], second: tuple[torch.Tensor, torch.Tensor],
                               groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DBB's transIII with biases: the 1x1's bias goes through the KxK kernel (the border is padded with it)."""
    (w1, b1), (w2, b2) = first, second
    through = [w.sum((2, 3)) @ b for w, b in zip(w2.chunk(groups, 0), b1.chunk(groups, 0))]
    return _compose_1x1_then_kxk(w1, w2, groups), torch.cat(through) + b2


class DBBlockBiasFree(nn.Module):
    """A DBB variant without BNAndPad: the 1x1 before the KxK has no bias and nothing between them, so
    plain zero padding of its output is exact (symbolic_trace captures it)."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1):
        super().__init__()
        p = k // 2
        self.k, self.groups, self.stride, self.p = k, groups, stride, p
        self.origin = conv_bn(cin, cout, k, stride, p, groups)
        self.one = conv_bn(cin, cout, 1, stride, 0, groups)
        self.idconv = nn.Conv2d(cin, cin, 1, groups=groups, bias=False)
        self.kxk = conv_bn(cin, cout, k, stride, p, groups)
        self.avg_conv = nn.Conv2d(cin, cout, 1, groups=groups, bias=False)
        self.avg = nn.AvgPool2d(k, stride, p)  # count_include_pad=True: a conv
        self.avg_bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.origin(x) + self.one(x)
        y = y + self.kxk(self.idconv(x))
        return y + self.avg_bn(self.avg(self.avg_conv(x)))

    @torch.no_grad()
    def reparameterize(self) -> nn.Conv2d:
        w, b = fused(self.origin, self.k)
        w1, b1 = fused(self.one, self.k)
        g = self.groups
        w2, b2 = fuse_bn(self.kxk[0].weight, None, self.kxk[1])
        w2 = _compose_1x1_then_kxk(self.idconv.weight, w2, g)
        avg = torch.ones(self.k, self.k) / self.k**2
        wa = _compose_1x1_then_kxk(self.avg_conv.weight, _depthwise_as_grouped(avg, self.avg_bn.num_features, g), g)
        wa, ba = fuse_bn(wa, None, self.avg_bn)
        return deploy_conv(self.origin[0], w + w1 + w2 + wa, b + b1 + b2 + ba)


def _compose_1x1_then_kxk(w1: torch.Tensor, w2: torch.Tensor, groups: int) -> torch.Tensor:
    """DBB's transIII: per group, K'[o, i] = sum_m K2[o, m] * K1[m, i]."""
    out = []
    for a, b in zip(w1.chunk(groups, 0), w2.chunk(groups, 0)):
        out.append(torch.einsum("omhw,mi->oihw", b, a[:, :, 0, 0]))
    return torch.cat(out)


def _depthwise_as_grouped(kernel: torch.Tensor, channels: int, groups: int) -> torch.Tensor:
    """A per-channel kernel written as a conv of ``groups`` groups (avg pooling after a 1x1)."""
    per = channels // groups
    w = torch.zeros(channels, per, *kernel.shape)
    for c in range(channels):
        w[c, c % per] = kernel
    return w


# ---------------------------------------------------------------------------------------------
# MobileOne: k over-parameterized KxK-BN branches + 1x1-BN scale branch + BN skip


class MobileOneBlock(nn.Module):
    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, branches: int = 3):
        super().__init__()
        self.k, self.groups = k, groups
        self.convs = nn.ModuleList(conv_bn(cin, cout, k, stride, k // 2, groups) for _ in range(branches))
        self.scale = conv_bn(cin, cout, 1, stride, 0, groups) if k > 1 else None
        self.skip = nn.BatchNorm2d(cout) if cin == cout and stride == 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.skip(x) if self.skip is not None else 0
        if self.scale is not None:
            out = out + self.scale(x)
        for conv in self.convs:
            out = out + conv(x)
        return out

    @torch.no_grad()
    def reparameterize(self) -> nn.Conv2d:
        parts = [fused(c, self.k) for c in self.convs]
        if self.scale is not None:
            parts.append(fused(self.scale, self.k))
        if self.skip is not None:
            parts.append(fuse_bn(identity_kernel(self.skip.num_features, self.groups, self.k), None, self.skip))
        return deploy_conv(self.convs[0][0], sum(w for w, _ in parts), sum(b for _, b in parts))


class MobileOneScale(nn.Module):
    """MobileOne-style block whose scale branch is a learned per-channel multiply (the issue's variant)."""

    def __init__(self, channels: int, k: int = 3, branches: int = 2):
        super().__init__()
        self.k = k
        self.convs = nn.ModuleList(conv_bn(channels, channels, k, 1, k // 2) for _ in range(branches))
        self.gamma = nn.Parameter(torch.randn(channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x * self.gamma
        for conv in self.convs:
            out = out + conv(x)
        return out

    @torch.no_grad()
    def reparameterize(self) -> nn.Conv2d:
        parts = [fused(c, self.k) for c in self.convs]
        c = self.gamma.numel()
        w = sum(p[0] for p in parts) + identity_kernel(c, 1, self.k) * self.gamma.view(-1, 1, 1, 1)
        return deploy_conv(self.convs[0][0], w, sum(p[1] for p in parts))


# ---------------------------------------------------------------------------------------------
# RepLKNet: large depthwise kernel + small depthwise kernel, each with BN


class RepLKBlock(nn.Module):
    def __init__(self, channels: int, large: int = 7, small: int = 3, stride: int = 1):
        super().__init__()
        self.large_k = large
        self.large = conv_bn(channels, channels, large, stride, large // 2, groups=channels)
        self.small = conv_bn(channels, channels, small, stride, small // 2, groups=channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.large(x) + self.small(x)

    @torch.no_grad()
    def reparameterize(self) -> nn.Conv2d:
        w, b = fused(self.large, self.large_k)
        ws, bs = fused(self.small, self.large_k)
        return deploy_conv(self.large[0], w + ws, b + bs)


# ---------------------------------------------------------------------------------------------
# DEA-Net DEConv: vanilla + central / angular / horizontal / vertical difference convs (3x3)

_ANGULAR = [3, 0, 1, 6, 4, 2, 7, 8, 5]


def cd_kernel(w: torch.Tensor) -> torch.Tensor:
    flat = w.flatten(2)
    centre = flat[:, :, 4] - flat.sum(2)
    return torch.cat([flat[:, :, :4], centre.unsqueeze(2), flat[:, :, 5:]], 2).view_as(w)


def ad_kernel(w: torch.Tensor, theta: float = 1.0) -> torch.Tensor:
    flat = w.flatten(2)
    return (flat - theta * flat[:, :, _ANGULAR]).view_as(w)


def hd_kernel(w1d: torch.Tensor) -> torch.Tensor:
    """(o, i, 3) column weights -> 3x3 with the left column w and the right column -w."""
    z = torch.zeros_like(w1d)
    return torch.stack([w1d, z, -w1d], 3)


def vd_kernel(w1d: torch.Tensor) -> torch.Tensor:
    z = torch.zeros_like(w1d)
    return torch.stack([w1d, z, -w1d], 2)


class DEConv(nn.Module):
    """``sum_weights=True``: DEA-Net's own forward (kernels summed, one conv); else five convs summed."""

    def __init__(self, channels: int, sum_weights: bool = True):
        super().__init__()
        self.sum_weights = sum_weights
        self.cd = nn.Parameter(torch.randn(channels, channels, 3, 3) * 0.2)
        self.ad = nn.Parameter(torch.randn(channels, channels, 3, 3) * 0.2)
        self.hd = nn.Parameter(torch.randn(channels, channels, 3) * 0.2)
        self.vd = nn.Parameter(torch.randn(channels, channels, 3) * 0.2)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def kernels(self) -> list[torch.Tensor]:
        return [cd_kernel(self.cd), ad_kernel(self.ad), hd_kernel(self.hd), vd_kernel(self.vd), self.conv.weight]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ks = self.kernels()
        if self.sum_weights:
            return F.conv2d(x, ks[0] + ks[1] + ks[2] + ks[3] + ks[4], self.conv.bias, 1, 1)
        out = F.conv2d(x, ks[0], None, 1, 1)
        for k in ks[1:4]:
            out = out + F.conv2d(x, k, None, 1, 1)
        return out + self.conv(x)

    @torch.no_grad()
    def reparameterize(self) -> nn.Conv2d:
        return deploy_conv(self.conv, sum(self.kernels()), self.conv.bias)


# ---------------------------------------------------------------------------------------------
# networks


class Net(nn.Module):
    """Blocks with a ReLU after each (the nonlinearity that stops merging across blocks)."""

    def __init__(self, *blocks: nn.Module):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = F.relu(block(x))
        return x

    def deploy(self) -> Net:
        return Net(*(b.reparameterize() if hasattr(b, "reparameterize") else b for b in self.blocks)).eval()


@torch.no_grad()
def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics (fresh ones are the identity) and eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.copy_(torch.randn(n, generator=g))
            m.bias.copy_(torch.randn(n, generator=g))
    return model.eval()
