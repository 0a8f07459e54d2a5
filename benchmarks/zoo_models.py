"""The model zoo for benchmarks/zoo.py: which models, how to build them, what to feed them.

Models are named ``source:arch``: ``timm:repvgg_a0``, ``tv:resnet18`` (torchvision), ``hf:gpt2``
(transformers from a small config). The lists come from the libraries' own registries:

- timm: per model module (family) of ``timm.models``, the variant with the fewest parameters,
  counted on the meta device (no memory, no init). The count takes a few minutes for all ~1,400
  models, so it is cached in benchmarks/results/timm_smallest.json per timm version.
- torchvision: every classification model, ``torchvision.models.list_models(module=torchvision.models)``.
- transformers: a few architectures from small configs (``hf_models()``), plus a PEFT LoRA model.

Every model is built with seeded random weights and its norms made non-trivial
(``randomize_norms``): default statistics (mean 0, var 1, gamma 1, beta 0) make a BatchNorm an
identity up to eps, so a wrong fold still matches. The input size is the smallest of a few
that the model accepts (``prepare``): small inputs keep the float64 oracle and the latency runs cheap.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

RESULTS = Path(__file__).resolve().parent / "results"
SMALL_SIZES = (64, 96, 128)  # tried in order before the model's native size
# BatchNorm statistics are measured on this many random inputs: at 64 px a late stage has 1x1
# tokens, and statistics of 4 samples made a random LeViT's activations reach 1e5 on other inputs
CALIBRATION_BATCH = 16

# The --ci subset: every timm family that has re-parameterization methods (timm's own
# reparameterize_model does something on them), a spread of other timm families, a spread of
# torchvision, and the transformers hook.
CI_MODELS = [
    # timm families with fuse() / reparameterize() / switch_to_deploy()
    "timm:repvgg_a0", "timm:mobileone_s0", "timm:fastvit_t8", "timm:repvit_m0_9", "timm:efficientvit_m0",
    "timm:levit_128s", "timm:ghostnetv3_050", "timm:repghostnet_050", "timm:nextvit_small", "timm:shvit_s1",
    "timm:tiny_vit_5m_224", "timm:efficientvim_m1", "timm:iformer_t", "timm:lcnetv2_small",
    # other timm families
    "timm:resnet18", "timm:efficientnet_b0", "timm:mobilenetv3_small_050", "timm:regnetx_002",
    "timm:convnext_atto", "timm:cs3darknet_s", "timm:ese_vovnet19b_slim_dw", "timm:dla46_c",
    "timm:hrnet_w18_small", "timm:test_vit", "timm:mobilevit_xxs", "timm:efficientformerv2_s0",
    "timm:edgenext_xx_small", "timm:rexnet_100", "timm:ghostnet_050",
    # torchvision
    "tv:resnet18", "tv:mobilenet_v3_small", "tv:mobilenet_v2", "tv:efficientnet_b0", "tv:regnet_x_400mf",
    "tv:convnext_tiny", "tv:densenet121", "tv:inception_v3", "tv:squeezenet1_0", "tv:shufflenet_v2_x0_5",
    "tv:mnasnet0_5", "tv:googlenet", "tv:vgg11_bn", "tv:resnext50_32x4d",
    # transformers (small configs) and PEFT
    "hf:gpt2", "hf:bert", "hf:vit", "hf:gpt2_lora",
]


@dataclass
class Prepared:
    """A model ready for the worker: eval mode, random weights, non-trivial norms."""

    model: nn.Module
    inputs: Callable[[int, tuple[int, int] | int], tuple]  # (batch, size) -> forward()'s arguments
    size: tuple[int, int] | int  # the example's size: (H, W) for images, sequence length for text
    other_size: tuple[int, int] | int | None  # another size the model accepts (None: only the batch changes)
    notes: list[str] = field(default_factory=list)
    tools: dict[str, Callable[[nn.Module], nn.Module]] = field(default_factory=dict)  # extra reference tools


# --------------------------------------------------------------------------------------------- lists

def timm_smallest(refresh: bool = False) -> dict[str, str]:
    """module -> its variant with the fewest parameters (cached per timm version)."""
    import timm
    from timm.models import _registry

    cache = RESULTS / "timm_smallest.json"
    if cache.exists() and not refresh:
        stored = json.loads(cache.read_text())
        if stored.get("timm") == timm.__version__:
            return stored["smallest"]
    smallest: dict[str, str] = {}
    for module in _registry.list_modules():
        best: tuple[int, str] | None = None
        names = timm.list_models(module=module)
        for arch in names:
            try:
                with warnings.catch_warnings(), torch.device("meta"):
                    warnings.simplefilter("ignore")
                    count = sum(p.numel() for p in timm.create_model(arch, pretrained=False).parameters())
            except Exception:  # noqa: BLE001 - a model that cannot be built on meta is not counted
                continue
            if best is None or count < best[0]:
                best = (count, arch)
        if best is not None:
            smallest[module] = best[1]
        elif names:  # none builds on meta: the first name (timm lists them naturally sorted)
            smallest[module] = names[0]
    RESULTS.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"timm": timm.__version__, "smallest": smallest}, indent=1))
    return smallest


def torchvision_models() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def hf_models() -> list[str]:
    """The transformers architectures, from small configs (see _build_hf); empty without transformers."""
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        return []
    names = ["gpt2", "bert", "vit"]
    if importlib.util.find_spec("peft") is not None:
        names.append("gpt2_lora")
    return names


def all_models(refresh: bool = False) -> list[str]:
    """The whole sweep: timm's smallest per family, every torchvision classifier, the HF hook, and the
    --ci models (repvgg and mobileone are byobnet variants, not its smallest)."""
    names = [f"timm:{a}" for a in sorted(set(timm_smallest(refresh).values()))]
    names += [f"tv:{a}" for a in torchvision_models()]
    names += [f"hf:{a}" for a in hf_models()]
    return names + [n for n in CI_MODELS if n not in names]


def resolve(name: str) -> str:
    """``resnet18`` -> ``timm:resnet18`` when unambiguous; prefixed names pass through."""
    if ":" in name:
        return name
    import timm

    found = []
    if name in timm.list_models():
        found.append(f"timm:{name}")
    if name in torchvision_models():
        found.append(f"tv:{name}")
    if name in hf_models():
        found.append(f"hf:{name}")
    if len(found) != 1:
        raise ValueError(f"model {name!r}: {'ambiguous, say which: ' + ', '.join(found) if found else 'not found'}")
    return found[0]


# --------------------------------------------------------------------------------------------- norms

def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)) or (
        "norm" in type(module).__name__.lower()
    )


def _vector(module: nn.Module, name: str) -> torch.Tensor | None:
    t = getattr(module, name, None)
    return t if isinstance(t, torch.Tensor) and t.dim() == 1 and t.is_floating_point() else None


@torch.no_grad()
def randomize_norms(model: nn.Module, example: tuple, seed: int = 0) -> list[str]:
    """Give every norm non-trivial, sane numbers; returns notes.

    Every norm's affine (BatchNorm, LayerNorm, GroupNorm, RMSNorm, timm's and transformers' own norm
    classes): weight = 1 + N(0, 0.2^2), bias ~ N(0, 0.1^2). BatchNorm statistics are then set from
    the input each BatchNorm really sees on ``example``, in one eval-mode forward, layer by layer
    (a pre-hook): var = measured var * U(0.5, 1.5), mean = measured mean + N(0, 0.1^2) * std. Set
    layer by layer, the perturbations upstream are already in what each BatchNorm measures, so its
    output stays near unit scale however deep the net; statistics measured in one go and perturbed
    afterwards (or drawn as N(0, 0.1^2) / U(0.5, 1.5)) compound: a random RepVGG-A0 then reaches
    1e27. Where measuring fails, the statistics are drawn that way all the same.
    """
    notes = []
    g = torch.Generator().manual_seed(seed)
    stats_set: set[int] = set()
    for m in model.modules():
        if not _is_norm(m):
            continue
        weight, bias = _vector(m, "weight"), _vector(m, "bias")
        if weight is not None:
            weight.copy_(1 + 0.2 * torch.randn(weight.shape, generator=g, dtype=weight.dtype))
        if bias is not None:
            bias.copy_(0.1 * torch.randn(bias.shape, generator=g, dtype=bias.dtype))

    def measure(bn: nn.Module, args: tuple) -> None:
        x = args[0].double()
        dims = [d for d in range(x.dim()) if d != 1]
        var, mean = torch.var_mean(x, dim=dims, unbiased=False)
        # floor: a channel that is nearly constant on the example (a pooled feature seen by 4 samples,
        # a channel that is mostly its mean) would otherwise amplify upstream changes without bound
        var = torch.maximum(var, 0.05 * x.square().mean(dims)) + 1e-5
        var = var * (torch.rand(var.shape, generator=g, dtype=var.dtype) + 0.5)
        mean = mean + 0.1 * var.sqrt() * torch.randn(mean.shape, generator=g, dtype=mean.dtype)
        bn.running_var.copy_(var)
        bn.running_mean.copy_(mean)
        stats_set.add(id(bn))

    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and m.track_running_stats and m.running_mean is not None]
    hooks = [bn.register_forward_pre_hook(measure) for bn in bns]
    try:
        if bns:
            model(*example)
    except Exception as error:  # noqa: BLE001 - fall back to drawn statistics
        notes.append(f"BatchNorm statistics drawn, not measured ({type(error).__name__})")
    finally:
        for hook in hooks:
            hook.remove()
    unused = 0
    for m in model.modules():
        mean, var = _vector(m, "running_mean"), _vector(m, "running_var")
        if _is_norm(m) and mean is not None and var is not None and id(m) not in stats_set:
            unused += isinstance(m, nn.modules.batchnorm._BatchNorm)
            var.copy_(torch.rand(var.shape, generator=g, dtype=var.dtype) + 0.5)
            mean.copy_(torch.randn(mean.shape, generator=g, dtype=mean.dtype) * 0.1)
    if unused and not notes:
        notes.append(f"{unused} BatchNorms not reached by the example: statistics drawn")
    return notes


# --------------------------------------------------------------------------------------------- building

def _runs(model: nn.Module, args: tuple) -> bool:
    return _failure(model, args) is None


def _failure(model: nn.Module, args: tuple) -> str | None:
    """Why the model does not run on args with a finite output (None: it does)."""
    try:
        with torch.no_grad():
            out = model(*args)
    except Exception as error:  # noqa: BLE001 - any failure means: not at this size
        return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"
    if not all(torch.isfinite(t).all() for t in float_leaves(out)):
        return "the output is not finite"
    return None


def float_leaves(out: object) -> list[torch.Tensor]:
    """The floating tensors of an output (tensors, tuples, dicts, transformers' ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        return [t for v in out.values() for t in float_leaves(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in float_leaves(v)]
    return []


def _image_inputs(channels: int, seed: int = 1) -> Callable[[int, tuple[int, int] | int], tuple]:
    def make(batch: int, size: tuple[int, int] | int) -> tuple:
        h, w = size if isinstance(size, tuple) else (size, size)
        return (torch.randn(batch, channels, h, w, generator=torch.Generator().manual_seed(seed + batch)),)
    return make


def _other_size(model: nn.Module, inputs: Callable, size: tuple[int, int]) -> tuple[int, int] | None:
    """A second size the model accepts (batch 3), to check the result is not tied to the example's."""
    h, w = size
    for other in ((h + 32, w + 32), (2 * h, 2 * w), (h - 16, w - 16)):
        if min(other) >= 16 and _runs(model, inputs(3, other)):
            return other
    return None


def _pick_size(build: Callable[[dict], nn.Module], native: tuple[int, int], channels: int,
               size_kwarg: str | None) -> tuple[nn.Module, tuple[int, int], str]:
    """The model (seeded build) and the smallest size it runs at: SMALL_SIZES with the default
    build, then the first small size with the size given to the constructor (ViTs with a fixed
    position embedding), then the native size."""
    inputs = _image_inputs(channels)
    torch.manual_seed(0)
    model = build({}).eval()
    for s in SMALL_SIZES:
        if s < max(native) and _runs(model, inputs(2, (s, s))):
            return model, (s, s), ""
    if size_kwarg is not None:
        s = SMALL_SIZES[0]
        try:
            torch.manual_seed(0)
            small = build({size_kwarg: s}).eval()
        except Exception:  # noqa: BLE001 - the constructor does not take it
            small = None
        if small is not None and _runs(small, inputs(2, (s, s))):
            return small, (s, s), f"built with {size_kwarg}={s}"
    failure = _failure(model, inputs(2, native))
    if failure is not None:
        raise RuntimeError(f"the model does not run at {SMALL_SIZES} nor at its native size {native}: {failure}")
    return model, native, "native size"


def _build_timm(arch: str) -> Prepared:
    import timm

    cfg = timm.models.get_pretrained_cfg(arch)
    c, h, w = (cfg.input_size if cfg is not None and cfg.input_size else (3, 224, 224))
    model, size, note = _pick_size(lambda kw: timm.create_model(arch, pretrained=False, **kw), (h, w), c, "img_size")
    return _image(model, size, c, note)


def _build_torchvision(arch: str) -> Prepared:
    import torchvision

    # quantized and detection models are in other modules; these are the classifiers
    model, size, note = _pick_size(lambda kw: torchvision.models.get_model(arch, weights=None, **kw),
                                   (224, 224), 3, "image_size")
    return _image(model, size, 3, note)


def _image(model: nn.Module, size: tuple[int, int], channels: int, note: str) -> Prepared:
    inputs = _image_inputs(channels)
    notes = [note] if note else []
    notes += randomize_norms(model, inputs(CALIBRATION_BATCH, size))
    failure = _failure(model, inputs(2, size))
    if failure is not None:
        raise RuntimeError(f"after randomizing its norms: {failure}")
    other = _other_size(model, inputs, size)
    return Prepared(model, inputs, size, other, notes)


def _text_inputs(vocab: int, seed: int = 1) -> Callable[[int, int], tuple]:
    def make(batch: int, length: int) -> tuple:
        g = torch.Generator().manual_seed(seed + batch)
        return (torch.randint(0, vocab, (batch, length), generator=g),)
    return make


def _build_hf(arch: str) -> Prepared:
    """Small configs: two layers, width 64 (random weights; nothing is downloaded)."""
    import transformers as tf

    torch.manual_seed(0)
    small = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128)
    tools: dict[str, Callable[[nn.Module], nn.Module]] = {}
    if arch in ("gpt2", "gpt2_lora"):
        model = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=1000, n_positions=128,
                                                 use_cache=False))
        if arch == "gpt2_lora":
            import peft

            config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
            model = peft.get_peft_model(model, config)
            g = torch.Generator().manual_seed(2)
            with torch.no_grad():  # PEFT zero-initializes lora_B: a trained adapter is not zero
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.copy_(0.05 * torch.randn(p.shape, generator=g))
            tools["peft merge_and_unload"] = lambda m: m.merge_and_unload()
        inputs, size, other = _text_inputs(1000), 16, 24
    elif arch == "bert":
        model = tf.BertForSequenceClassification(tf.BertConfig(vocab_size=1000, max_position_embeddings=128, **small))
        inputs, size, other = _text_inputs(1000), 16, 24
    elif arch == "vit":
        model = tf.ViTForImageClassification(tf.ViTConfig(image_size=32, patch_size=8, **small))
        inputs, size, other = _image_inputs(3), (32, 32), None  # the position embedding fixes the size
    else:
        raise ValueError(f"unknown hf model {arch!r}")
    model.eval()
    notes = randomize_norms(model, inputs(CALIBRATION_BATCH, size))
    return Prepared(model, inputs, size, other, notes, tools)


def prepare(name: str) -> Prepared:
    source, arch = name.split(":", 1)
    builders = {"timm": _build_timm, "tv": _build_torchvision, "hf": _build_hf}
    if source not in builders:
        raise ValueError(f"unknown source {source!r} in {name!r} (timm, tv or hf)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return builders[source](arch)


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def describe_size(size: tuple[int, int] | int | None) -> str:
    if size is None:
        return "-"
    return f"{size[0]}x{size[1]}" if isinstance(size, tuple) else f"len {size}"


__all__ = ["CI_MODELS", "float_leaves", "Prepared", "all_models", "prepare", "resolve", "randomize_norms", "timm_smallest",
           "torchvision_models", "hf_models", "parameters", "describe_size"]
