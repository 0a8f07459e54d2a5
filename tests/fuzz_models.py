"""Random valid small models from the vocabulary fxopt's passes handle, for differential fuzzing.

`fuzz_models()` is a hypothesis strategy returning `(model_in_eval_mode, example_inputs, recipe)`;
`recipe` is a one-line description of the blocks drawn (printed on failure, so a failing model can
be rebuilt by hand). A model is a stack of blocks over a tensor whose shape the generator tracks:

* image mode, (N, C, *spatial) with 1 or 2 spatial dims: conv (any padding mode, groups, stride,
  dilation, even kernels) with BatchNorm after (module or F.batch_norm) or before, transposed conv
  with BatchNorm, RepVGG-like parallel branches (kxk, 1x1, BN-only and plain identity branches),
  DBB-style average-pooling branches, residual conv, concatenation of two conv branches, eval dropout / identity, relu / gelu;
* sequence mode, (N, F) or (N, T, F), entered by flattening: Linear (+ BatchNorm1d on 2-D input,
  or on a 3-D input whose channel axis is T), BatchNorm1d -> Linear, LayerNorm / RMSNorm (+ Linear), pre-norm residual
  blocks, LoRA-style adapters (base Linear + scale * B(A(x))), concatenation, reshapes, LayerNorm/RMSNorm ->
  fake-quantizer (per tensor or per channel) -> Linear;
* image mode also has conv LoRA adapters; a model sometimes returns a tuple, and sometimes branches on
  its input's shape in Python, so only torch.export can capture it.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

BATCH = 2


# ---------------------------------------------------------------------------------------------
# parameter randomization: folded weights must be non-trivial (default BN statistics are 0 / 1)


def randomize(module: nn.Module, gen: torch.Generator) -> None:
    """Random weights, BN statistics and affines (variance kept positive), drawn from ``gen``."""
    with torch.no_grad():
        for m in module.modules():
            for p in m.parameters(recurse=False):
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if p.dim() > 1 else 1.0))
            if getattr(m, "running_mean", None) is not None:  # nn.BatchNorm and FunctionalBN
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) * 2 + 0.05)


# ---------------------------------------------------------------------------------------------
# building blocks (each traces with torch.fx.symbolic_trace)


class FunctionalBN(nn.Module):
    """BatchNorm spelled as F.batch_norm on the block's own tensors (the style many repos use)."""

    def __init__(self, channels: int, affine: bool, eps: float):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.weight = nn.Parameter(torch.ones(channels)) if affine else None
        self.bias = nn.Parameter(torch.zeros(channels)) if affine else None
        self.eps = eps

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, self.eps)


class Act(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, x):
        if self.kind == "relu":
            return F.relu(x)
        if self.kind == "gelu":
            return F.gelu(x)
        return x


class Chain(nn.Sequential):
    """nn.Sequential under another name, so recipes read as the block kinds."""


class Residual(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


class Branches(nn.Module):
    """Sum of parallel branches (RepVGG / ACNet style); ``identity`` adds x itself."""

    def __init__(self, branches: list[nn.Module], identity: bool, act: str):
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.identity = identity
        self.act = Act(act)

    def forward(self, x):
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        if self.identity:
            out = out + x
        return self.act(out)


class Concat(nn.Module):
    def __init__(self, a: nn.Module, b: nn.Module, dim: int):
        super().__init__()
        self.a, self.b, self.dim = a, b, dim

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], dim=self.dim)


class Flatten(nn.Module):
    """(N, C, *S) -> (N, C * prod(S)), or to tokens (N, prod(S), C) when ``tokens``."""

    def __init__(self, tokens: bool):
        super().__init__()
        self.tokens = tokens

    def forward(self, x):
        if self.tokens:
            return x.flatten(2).transpose(1, 2)
        return torch.flatten(x, 1)


class Reshape(nn.Module):
    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.shape = shape

    def forward(self, x):
        return x.reshape(self.shape)


class LoRALinear(nn.Module):
    """base(x) + scale * B(A(dropout(x))), the peft layout."""

    def __init__(self, fin: int, fout: int, rank: int, scale: float, bias: bool):
        super().__init__()
        self.base = nn.Linear(fin, fout, bias=bias)
        self.lora_A = nn.Linear(fin, rank, bias=False)
        self.lora_B = nn.Linear(rank, fout, bias=False)
        self.dropout = nn.Dropout(0.1)
        self.scale = scale

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scale


class ConvLoRA(nn.Module):
    """conv(x) + scale * B(A(x)): A a k x k conv to ``rank`` channels, B a 1x1 conv back (peft's conv LoRA)."""

    def __init__(self, conv: nn.Module, rank: int, scale: float):
        super().__init__()
        d = conv.weight.dim() - 2
        self.base = conv
        self.lora_A = _CONV[d](conv.in_channels, rank, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                               bias=False, padding_mode=conv.padding_mode)
        self.lora_B = _CONV[d](rank, conv.out_channels, 1, bias=False)
        self.scale = scale

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scale


class FakeQuant(nn.Module):
    """Uniform fake-quantization of activations, per tensor or per channel of the last axis."""

    def __init__(self, features: int, per_channel: bool, bits: int, seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.per_channel, self.quant_max = per_channel, 2**bits - 1
        scale = torch.rand(features, generator=gen) * 0.2 + 0.02
        zero_point = torch.randint(0, self.quant_max + 1, (features,), generator=gen, dtype=torch.int32)
        if per_channel:
            self.register_buffer("scale", scale)
            self.register_buffer("zero_point", zero_point)
        else:
            self.scale, self.zero_point = float(scale[0]), int(zero_point[0])

    def forward(self, x):
        if self.per_channel:
            return torch.fake_quantize_per_channel_affine(x, self.scale, self.zero_point, x.dim() - 1, 0,
                                                          self.quant_max)
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, 0, self.quant_max)


class TupleOutput(nn.Module):
    """Returns the body's output and a view of it: models with several outputs."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        y = self.body(x)
        return y, y.flatten(1)[:, :1] * 2


class ShapeBranch(nn.Module):
    """Python control flow on the input's shape: torch.fx.symbolic_trace cannot capture it, torch.export can."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        if x.shape[0] > 1:
            return self.body(x)
        return self.body(x) * 1.0


class Stack(nn.Module):
    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


# ---------------------------------------------------------------------------------------------
# the strategy


_CONV = {1: nn.Conv1d, 2: nn.Conv2d}
_CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}


def _conv_out(size: int, k: int, stride: int, pad: int, dil: int) -> int:
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


class _Builder:
    """Draws blocks while tracking the activation shape; ``recipe`` records what was drawn."""

    def __init__(self, draw):
        self.draw = draw
        self.recipe: list[str] = []
        self.dtype = torch.float32

    def pick(self, options):
        return self.draw(st.sampled_from(options))

    def ints(self, lo, hi):
        return self.draw(st.integers(lo, hi))

    def bn(self, d: int, channels: int) -> nn.Module:
        eps = self.pick([1e-5, 1e-3])
        if self.draw(st.booleans()):
            return _BN[d](channels, eps=eps, affine=self.draw(st.booleans()))
        return FunctionalBN(channels, self.draw(st.booleans()), eps)

    def groups_for(self, cin: int) -> int:
        return self.pick([g for g in range(1, cin + 1) if cin % g == 0])

    # --- image mode: shape (C, spatial tuple) ---------------------------------------------------

    def conv(self, d, c, size, *, k=None, stride=None, pad=None, dil=None, cout=None, groups=None, mode=None,
             bias=None):
        """A conv layer with the drawn (or given) hyper-parameters; returns (conv, cout, new size)."""
        k = k or self.pick([1, 2, 3, 3, 4, 5])
        dil = dil or (1 if k == 1 else self.pick([1, 1, 2]))
        groups = groups or self.groups_for(c)
        cout = cout or groups * self.ints(1, max(1, 6 // groups))
        stride = stride or self.pick([1, 1, 2])
        mode = mode or self.pick(["zeros", "zeros", "reflect", "replicate", "circular"])
        if pad is None:
            pad = self.ints(0, dil * (k - 1) // 2 + 1)
        if mode != "zeros":
            pad = min(pad, min(size) - 1)
        new = tuple(_conv_out(s, k, stride, pad, dil) for s in size)
        if min(new) < 1:  # too small: a stride-1 'full' conv always fits (zero padding)
            stride, pad, mode = 1, dil * (k - 1), "zeros"
            new = tuple(_conv_out(s, k, stride, pad, dil) for s in size)
        bias = self.draw(st.booleans()) if bias is None else bias
        conv = _CONV[d](c, cout, k, stride, pad, dil, groups, bias, mode)
        self.recipe.append(f"conv{d}d({c}->{cout},k{k},s{stride},p{pad},d{dil},g{groups},{mode},bias={bias})")
        return conv, cout, new

    def image_block(self, d, c, size):
        kind = self.pick(["conv_bn", "conv_bn", "bn_conv", "convT_bn", "repvgg", "residual", "concat", "conv_lora",
                          "noop"])
        if kind == "conv_bn":
            conv, c, size = self.conv(d, c, size)
            layers = [conv]
            if self.draw(st.booleans()):
                layers.append(self.bn(d, c))
                self.recipe.append("bn")
            act = self.pick(["relu", "gelu", "none"])
            self.recipe.append(act)
            return Chain(*layers, Act(act)), c, size
        if kind == "bn_conv":
            bn = self.bn(d, c)
            self.recipe.append("bn")
            conv, c, size = self.conv(d, c, size)
            return Chain(bn, conv), c, size
        if kind == "convT_bn":
            k = self.pick([1, 2, 3])
            stride = self.pick([1, 2])
            groups = self.groups_for(c)
            cout = groups * self.ints(1, max(1, 6 // groups))
            pad = self.ints(0, (k - 1) // 2)
            out_pad = self.ints(0, stride - 1)
            bias = self.draw(st.booleans())
            conv = _CONVT[d](c, cout, k, stride, pad, out_pad, groups, bias)
            size = tuple((s - 1) * stride - 2 * pad + k + out_pad for s in size)
            self.recipe.append(f"convT{d}d({c}->{cout},k{k},s{stride},p{pad},op{out_pad},g{groups},bias={bias})+bn")
            return Chain(conv, self.bn(d, cout)), cout, size
        if kind == "repvgg":
            # branches keep the size: odd kernels, padding dil*(k-1)/2, shared stride and padding mode
            stride = self.pick([1, 1, 2])
            mode = self.pick(["zeros", "zeros", "reflect", "replicate", "circular"])
            groups = self.groups_for(c)
            same_channels = self.draw(st.booleans())
            cout = c if same_channels else groups * self.ints(1, max(1, 6 // groups))
            branches, new = [], None
            dil = self.pick([1, 1, 2])
            for k in self.draw(st.lists(st.sampled_from([1, 3, 5]), min_size=1, max_size=3)):
                pad = dil * (k - 1) // 2
                m = mode if pad < min(size) else "zeros"
                conv, _, new = self.conv(d, c, size, k=k, stride=stride, pad=pad, dil=dil, cout=cout, groups=groups,
                                         mode=m, bias=False)
                branches.append(Chain(conv, self.bn(d, cout)) if self.draw(st.booleans()) else conv)
            if cout == c and self.draw(st.booleans()):  # DBB-style average-pooling branch
                k = self.pick([1, 3])
                pool = {1: nn.AvgPool1d, 2: nn.AvgPool2d}[d](k, stride, (k - 1) // 2,
                                                              count_include_pad=self.draw(st.booleans()))
                branches.append(Chain(pool, self.bn(d, c)) if self.draw(st.booleans()) else pool)
                self.recipe.append(f"avgpool-branch(k{k})")
            if cout == c and stride == 1:
                if self.draw(st.booleans()):
                    branches.append(self.bn(d, c))
                    self.recipe.append("bn-identity branch")
            identity = cout == c and stride == 1 and self.draw(st.booleans())
            act = self.pick(["relu", "none"])
            self.recipe.append(f"repvgg(identity={identity},{act})")
            return Branches(branches, identity, act), cout, new
        if kind == "residual":
            k = self.pick([1, 3])
            mode = "zeros" if min(size) < 2 else None  # reflect padding needs pad < size
            conv, _, _ = self.conv(d, c, size, k=k, stride=1, pad=(k - 1) // 2, dil=1, cout=c,
                                   groups=self.groups_for(c), mode=mode)
            layers = [conv] + ([self.bn(d, c)] if self.draw(st.booleans()) else [])
            self.recipe.append("residual")
            return Residual(Chain(*layers)), c, size
        if kind == "conv_lora":
            conv, cout, out_size = self.conv(d, c, size, groups=1)
            rank, scale = self.ints(1, 3), self.pick([0.5, 2.0])
            self.recipe.append(f"conv_lora(r{rank},scale={scale})")
            return ConvLoRA(conv, rank, scale), cout, out_size
        if kind == "concat":
            a, ca, _ = self.conv(d, c, size, k=1, stride=1, pad=0)
            b, cb, _ = self.conv(d, c, size, k=3, stride=1, pad=1, dil=1, mode="zeros")
            self.recipe.append("concat")
            return Concat(Chain(a, self.bn(d, ca)), b, 1), ca + cb, size
        noop = self.pick([nn.Dropout(0.2), nn.Identity(), nn.Dropout2d(0.3) if d == 2 else nn.Identity()])
        self.recipe.append(type(noop).__name__)
        return noop, c, size

    # --- sequence mode: shape (T or None, F) ------------------------------------------------

    def linear(self, fin, fout=None, bias=None):
        fout = fout or self.ints(1, 8)
        bias = self.draw(st.booleans()) if bias is None else bias
        self.recipe.append(f"linear({fin}->{fout},bias={bias})")
        return nn.Linear(fin, fout, bias=bias), fout

    def norm(self, f):
        kind = self.pick(["layer", "layer", "rms"])
        affine = self.draw(st.booleans())
        self.recipe.append(f"{kind}norm(affine={affine})")
        if kind == "rms":
            return nn.RMSNorm(f, elementwise_affine=affine)
        return nn.LayerNorm(f, elementwise_affine=affine, bias=affine and self.draw(st.booleans()))

    def seq_block(self, t, f):
        kind = self.pick(["linear_bn", "linear_bn", "bn_linear", "norm_linear", "prenorm", "lora", "lora",
                          "concat", "reshape", "fake_quant", "noop"])
        if kind == "linear_bn":
            lin, f = self.linear(f)
            layers = [lin]
            # BatchNorm1d normalizes axis 1: the features of (N, F), the tokens of (N, T, F)
            if self.draw(st.booleans()):
                layers.append(self.bn(1, f if t is None else t))
                self.recipe.append("bn1d" if t is None else "bn1d-on-3d")
            layers.append(Act(self.pick(["relu", "gelu", "none"])))
            return Chain(*layers), t, f
        if kind == "bn_linear" and t is None:
            bn = self.bn(1, f)
            self.recipe.append("bn1d")
            lin, f = self.linear(f)
            return Chain(bn, lin), t, f
        if kind == "norm_linear" or kind == "bn_linear":
            norm = self.norm(f)
            lin, f = self.linear(f)
            return Chain(norm, lin), t, f
        if kind == "prenorm":
            norm = self.norm(f)
            lin, _ = self.linear(f, f)
            return Residual(Chain(norm, lin)), t, f
        if kind == "lora":
            fout = self.ints(1, 8)
            rank = self.ints(1, 4)
            scale = self.pick([0.5, 1.0, 2.0, 16 / 3])
            bias = self.draw(st.booleans())
            self.recipe.append(f"lora({f}->{fout},r{rank},scale={scale:.3g},bias={bias})")
            return LoRALinear(f, fout, rank, scale, bias), t, fout
        if kind == "fake_quant" and self.dtype == torch.float32:  # torch's fake-quant kernels are float32
            per_channel, bits = self.draw(st.booleans()), self.pick([4, 8])
            norm = self.norm(f)
            lin, f_out = self.linear(f)
            self.recipe.append(f"fake_quant(per_channel={per_channel},bits={bits})")
            return Chain(norm, FakeQuant(f, per_channel, bits, self.ints(0, 2**16)), lin), t, f_out
        if kind == "concat":
            a, fa = self.linear(f)
            b, fb = self.linear(f)
            self.recipe.append("concat")
            return Concat(a, b, -1), t, fa + fb
        if kind == "reshape":
            if t is None:
                splits = [s for s in range(2, f + 1) if f % s == 0]
                if not splits:
                    return nn.Identity(), t, f
                t = self.pick(splits)
                self.recipe.append(f"reshape(N,{t},{f // t})")
                return Reshape((BATCH, t, f // t)), t, f // t
            self.recipe.append(f"reshape(N,{t * f})")
            return Reshape((BATCH, t * f)), None, t * f
        noop = self.pick([nn.Dropout(0.5), nn.Identity()])
        self.recipe.append(type(noop).__name__)
        return noop, t, f


@st.composite
def fuzz_models(draw, max_blocks: int = 5):
    """(model in eval mode, example inputs, recipe) for a random valid model."""
    b = _Builder(draw)
    dtype = draw(st.sampled_from([torch.float32] * 5 + [torch.float64] * 4 + [torch.bfloat16]))
    b.dtype = dtype
    blocks: list[nn.Module] = []
    if draw(st.booleans()):  # start as an image
        d = draw(st.sampled_from([1, 2]))
        c = b.ints(1, 6)
        size = tuple(b.ints(3, 9) for _ in range(d))
        shape = (BATCH, c, *size)
        b.recipe.append(f"input{shape}")
        for _ in range(b.ints(1, max_blocks)):
            block, c, size = b.image_block(d, c, size)
            blocks.append(block)
        t, f = None, None
        if draw(st.booleans()) and math.prod(size) * c <= 256:
            tokens = draw(st.booleans())
            blocks.append(Flatten(tokens))
            t, f = (math.prod(size), c) if tokens else (None, c * math.prod(size))
            b.recipe.append("flatten-to-tokens" if tokens else "flatten")
    else:
        t = draw(st.sampled_from([None, None, 3, 4]))
        f = b.ints(1, 8)
        shape = (BATCH, f) if t is None else (BATCH, t, f)
        b.recipe.append(f"input{shape}")
    if f is not None:
        for _ in range(b.ints(1, max_blocks)):
            block, t, f = b.seq_block(t, f)
            blocks.append(block)
    model: nn.Module = Stack(blocks)
    # (hypothesis draws boundary values often: a middle value keeps these at about the rate written)
    if draw(st.integers(0, 7)) == 3:
        model = TupleOutput(model)
        b.recipe.append("tuple-output")
    if draw(st.integers(0, 7)) == 5:  # torch.export costs a second or so per model
        model = ShapeBranch(model)
        b.recipe.append("export-only")
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    randomize(model, gen)
    model = model.to(dtype).eval()
    x = torch.randn(shape, generator=gen).to(dtype)
    return model, (x,), f"{dtype}: " + " | ".join(b.recipe)


# ---------------------------------------------------------------------------------------------
# the user's model must come back bit for bit


def snapshot(model: nn.Module) -> tuple[bool, dict[str, torch.Tensor]]:
    """The training flag and a detached copy of every state_dict entry (bits compared later)."""
    return model.training, {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def unchanged(model: nn.Module, before: tuple[bool, dict[str, torch.Tensor]]) -> str | None:
    """None when ``model`` still has the training flag and state_dict bits of ``before``; else what differs."""
    training, state = before
    if model.training != training:
        return f"training flag changed to {model.training}"
    now = model.state_dict(keep_vars=True)
    if set(now) != set(state):
        return f"state_dict keys changed: {sorted(set(now) ^ set(state))}"
    for name, old in state.items():
        new = now[name].detach()
        if new.dtype != old.dtype or new.shape != old.shape:
            return f"{name}: {old.dtype}{tuple(old.shape)} became {new.dtype}{tuple(new.shape)}"
        if old.numel() and not torch.equal(_bits(new), _bits(old)):
            return f"{name}: values changed"
    return None


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of ``t`` (so NaN == NaN and -0.0 != 0.0)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def stored_elements(model: nn.Module, only_biases: bool = False) -> int:
    """Elements of the parameters and buffers a model stores, each tied tensor counted once."""
    unique = {
        (t.data_ptr(), t.dtype, tuple(t.shape)): t
        for name, t in model.state_dict().items()
        if t.numel() and (not only_biases or name.rsplit(".", 1)[-1].endswith("bias"))
    }
    return sum(t.numel() for t in unique.values())


def grows(model: nn.Module, result: nn.Module) -> str | None:
    """Why ``result`` is larger than ``model`` beyond what the size rule allows, else None.

    The rule: the default pipeline never stores more than the model did, except for biases. A fold
    that removes a normalization may give a bias-less layer a bias (conv(bias) -> 1x1 conv merged,
    BatchNorm -> Linear(bias=False), LayerNorm affine -> Linear(bias=False)): out_features numbers
    traded for a whole op less, which is the cheaper model.
    """
    before, after = stored_elements(model), stored_elements(result)
    allowed = before + stored_elements(result, only_biases=True)
    if after > allowed:
        return f"result stores {after} elements, the model {before}, and biases explain only {allowed - before}"
    return None
