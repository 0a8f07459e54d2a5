"""ln_to_rmsnorm on hand-written and HF transformers: converted where Pre-LN, skipped with the reason elsewhere."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Interpreter

import fxopt
from fxopt.equivalence import check_pass
from fxopt.runtime import zero_mean_rms_norm
from tests.generated import optimize_to_graph
from tests.transformer_blocks import TiedLM, ViT


def _norm_inputs(result: GraphModule, inputs: tuple) -> list[torch.Tensor]:
    """The value reaching every RMSNorm codegen emitted (fxopt.runtime.zero_mean_rms_norm)."""
    seen: list[torch.Tensor] = []

    class Recorder(Interpreter):
        def call_function(self, target, args, kwargs):
            if target is zero_mean_rms_norm:
                seen.append(args[0])
            return super().call_function(target, args, kwargs)

    with torch.no_grad():
        Recorder(result).run(*inputs)
    return seen


def _assert_converted(model: torch.nn.Module, inputs: tuple, norms: int) -> GraphModule:
    """Converted: one stream rewrite, every norm an RMSNorm (its input zero-mean), equivalent."""
    result = optimize_to_graph(model, inputs, passes=["ln_to_rmsnorm"])
    stats = result.report.passes[0]
    assert stats.applied == 1 and not stats.skipped and not stats.rolled_back, str(result.report)
    seen = _norm_inputs(result, inputs)
    assert len(seen) == norms
    for x in seen:  # zero-mean input: the LayerNorm kernel computes exactly the RMSNorm there
        assert x.mean(-1).abs().max() <= 1e-5 * x.abs().max()
    assert fxopt.verify(model, result, inputs).passed
    return result


def _skip_reasons(model: torch.nn.Module, inputs: tuple) -> str:
    result = optimize_to_graph(model, inputs, passes=["ln_to_rmsnorm"])
    return " ".join(reason for _, reason in result.report.passes[0].skipped)


def test_check_pass_ln_to_rmsnorm():
    assert check_pass("ln_to_rmsnorm", max_examples=15).instances == 15


def test_vit_with_layer_scale_and_cls_token():
    torch.manual_seed(0)
    model = ViT(layer_scale=True).eval()
    result = _assert_converted(model, (torch.randn(2, 3, 8, 8),), norms=5)
    assert "mul" not in result.code  # LayerScale folded into the output projections


def test_eager_runs_the_layernorm_kernel_and_compiled_graphs_hold_only_rmsnorm():
    """On the zero-mean stream both kernels are the RMSNorm: eager torch's LayerNorm is the faster,
    inductor's fused RMSNorm is (fxopt.runtime); a compiled graph must not compute the mean."""
    torch.manual_seed(0)
    model, x = ViT(layer_scale=False, depth=2).eval(), torch.randn(2, 3, 8, 8)
    result = _assert_converted(model, (x,), norms=5)
    graphs: list[torch.fx.GraphModule] = []

    def keep_graph(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(result, backend=keep_graph, fullgraph=True)
    assert fxopt.verify(model, compiled, (x,)).passed
    called = [getattr(n.target, "__name__", "") for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert called.count("rms_norm") == 5 and "layer_norm" not in called, called


def test_layer_scale_is_folded_before_recentring():
    """Centring the projection and scaling after would leave the stream non-zero-mean (notes: error 3.0)."""
    torch.manual_seed(1)
    model = ViT(layer_scale=True, depth=1).eval()
    with torch.no_grad():
        model.blocks[0].gamma1.uniform_(0.1, 5.0)
    _assert_converted(model, (torch.randn(3, 3, 8, 8),), norms=3)


def test_tied_head_is_untied_and_keeps_the_original_weight():
    torch.manual_seed(0)
    model = TiedLM().eval()
    ids = torch.randint(0, 50, (2, 6))
    result = _assert_converted(model, (ids,), norms=5)
    assert any("untied embed.weight" in note for note in result.report.notes)
    weights = [t for t in result.state_dict().values() if t.shape == model.embed.weight.shape]
    assert any(torch.equal(w, model.embed.weight) for w in weights)  # the head's copy
    assert any(w.mean(1).abs().max() < 1e-6 for w in weights)  # the embedding's re-centred copy


def test_embedding_layernorm_stops_the_stream():
    torch.manual_seed(0)
    assert "writes into the residual stream" in _skip_reasons(ViT(embed_norm=True).eval(), (torch.randn(2, 3, 8, 8),))


def test_raw_hidden_states_output_is_skipped():
    torch.manual_seed(0)
    reasons = _skip_reasons(TiedLM(return_hidden=True).eval(), (torch.randint(0, 50, (2, 6)),))
    assert "raw hidden states" in reasons


def test_not_in_the_default_pipeline():
    assert "ln_to_rmsnorm" not in [p.name for p in fxopt.pattern.default_passes()]


# ---------------------------------------------------------------------------------------------
# ln_to_crmsnorm: the zero-mean stream stored in d - 1 channels


def _assert_compressed(model: torch.nn.Module, inputs: tuple) -> GraphModule:
    """Converted: one stream rewrite, every norm a CRMSNorm absorbed by the Linears that read it, equivalent."""
    result = optimize_to_graph(model, inputs, passes=["ln_to_crmsnorm"])
    stats = result.report.passes[0]
    assert stats.applied == 1 and not stats.skipped and not stats.rolled_back, str(result.report)
    assert not _norm_inputs(result, inputs) and "norm" not in str(list(result.state_dict())), result.code
    assert fxopt.verify(model, result, inputs, examples=5).passed
    return result


def test_check_pass_ln_to_crmsnorm():
    assert check_pass("ln_to_crmsnorm", max_examples=10).instances == 10


def test_crmsnorm_vit_stream_is_compressed():
    torch.manual_seed(0)
    model = ViT(layer_scale=True).eval()
    # norm1's reader also reads its shape (b, t, d = x.shape); the final norm reaches the head through [:, 0]
    weights = _assert_compressed(model, (torch.randn(2, 3, 8, 8),)).state_dict()
    assert weights["patch.weight"].shape[0] == 31 and weights["cls_token"].shape[-1] == 31
    assert weights["blocks.0.attn.proj.weight"].shape[0] == 31 and weights["blocks.1.fc2.bias"].shape == (31,)
    assert weights["blocks.0.attn.qkv.weight"].shape == (96, 31) and weights["head.weight"].shape == (10, 31)


def test_crmsnorm_tied_head_gets_its_own_compressed_weight():
    torch.manual_seed(0)
    model = TiedLM().eval()
    result = _assert_compressed(model, (torch.randint(0, 50, (2, 6)),))
    assert any("untied embed.weight" in note for note in result.report.notes)
    assert any("own copy of embed.weight" in note for note in result.report.notes)
    tables = [w for w in result.state_dict().values() if w.shape == (50, 31)]  # the embedding's and the head's
    centred = model.embed.weight - model.embed.weight.mean(1, keepdim=True)
    assert len(tables) == 2 and sum(torch.allclose(t, centred[:, :31], atol=1e-6) for t in tables) == 1


class _OneBlock(torch.nn.Module):
    """A one-block Pre-LN model; ``runtime_view`` reshapes the block's update to a hidden size read
    from a weight's shape at run time; ``relu`` puts one between norm1 and its Linear; ``direct``
    makes the branch a single Linear (norm1 -> Linear -> stream); ``norm_out`` returns the final
    norm's output, with no head."""

    def __init__(self, d: int, runtime_view: bool = False, relu: bool = False, direct: bool = False,
                 norm_out: bool = False):
        super().__init__()
        self.embed, self.pos = torch.nn.Embedding(7, d), torch.nn.Parameter(torch.randn(d))
        self.norm1, self.fc, self.proj = torch.nn.LayerNorm(d), torch.nn.Linear(d, 2 * d), torch.nn.Linear(2 * d, d)
        self.mix = torch.nn.Linear(d, d)
        self.norm2, self.head = torch.nn.LayerNorm(d), torch.nn.Linear(d, 3)
        self.runtime_view, self.relu, self.direct, self.norm_out = runtime_view, relu, direct, norm_out

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids) + self.pos
        normalized = self.norm1(h)
        if self.direct:
            update = self.mix(normalized)
        else:
            update = self.proj(F.gelu(self.fc(normalized.relu() if self.relu else normalized)))
        if self.runtime_view:
            update = update.view(ids.shape[0], ids.shape[1], self.proj.weight.shape[0])
        out = self.norm2(h + update)
        return out if self.norm_out else self.head(out)


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        (_OneBlock(1), "hidden size is 1"),
        (_OneBlock(4, runtime_view=True), "takes the hidden size from getitem"),
        # where a norm has a reader that is not a Linear, the stream would be decompressed: not exact in float
        (_OneBlock(4, relu=True), "output is read by relu"),
        (_OneBlock(4, norm_out=True), "read by the model output"),
        (_OneBlock(4, direct=True), "writes back into it directly"),
    ],
    ids=["one_channel", "runtime_hidden_size", "norm_read_by_relu", "norm_is_the_output", "linear_reads_and_writes"],
)
def test_crmsnorm_skips_with_the_reason(model, reason):
    result = optimize_to_graph(model.eval(), (torch.randint(0, 7, (2, 3)),), passes=["ln_to_crmsnorm"])
    reasons = " ".join(r for _, r in result.report.passes[0].skipped)
    assert result.report.passes[0].applied == 0 and reason in reasons, reasons


def test_crmsnorm_one_block_is_converted_and_compiles_without_graph_breaks():
    torch.manual_seed(0)
    model, ids = _OneBlock(6).eval(), torch.randint(0, 7, (2, 3))
    result = _assert_compressed(model, (ids,))
    compiled = torch.compile(result, fullgraph=True, backend="eager")  # fullgraph: a graph break raises
    with torch.no_grad():
        assert torch.equal(compiled(ids), result(ids))


def test_crmsnorm_is_not_in_the_default_pipeline():
    assert "ln_to_crmsnorm" not in [p.name for p in fxopt.pattern.default_passes()]


# ---------------------------------------------------------------------------------------------
# HF transformers models from tiny configs, random weights, no downloads

transformers = pytest.importorskip("transformers")


def _ids() -> tuple[torch.Tensor]:
    return (torch.randint(0, 50, (2, 8)),)


def test_hf_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=16, use_cache=False)
    result = _assert_converted(transformers.GPT2LMHeadModel(config).eval(), _ids(), norms=5)
    assert any("untied" in note for note in result.report.notes)  # GPT-2 ties wte and lm_head


def test_hf_opt():
    torch.manual_seed(0)
    config = transformers.OPTConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, ffn_dim=64,
                                    vocab_size=50, max_position_embeddings=16, word_embed_proj_dim=32, use_cache=False)
    _assert_converted(transformers.OPTForCausalLM(config).eval(), _ids(), norms=5)


def test_hf_vit():
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=64)
    _assert_converted(transformers.ViTForImageClassification(config).eval(), (torch.randn(2, 3, 16, 16),), norms=5)


def test_hf_bert_post_ln_is_skipped():
    torch.manual_seed(0)
    config = transformers.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                     intermediate_size=64, vocab_size=50, max_position_embeddings=16)
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    result = optimize_to_graph(model, _ids(), passes=["ln_to_rmsnorm"])
    reasons = " ".join(reason for _, reason in result.report.passes[0].skipped)
    assert "Post-LN" in reasons
    # only the embedding sum (read by the embedding LayerNorm alone) may be converted; the encoder is not
    assert result.report.passes[0].applied <= 1
    assert result.report.verification.passed


def test_hf_gpt2_crmsnorm():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=16, use_cache=False)
    model = transformers.GPT2LMHeadModel(config).eval()
    # block norms reach their Conv1D (addmm) through a view; ln_f reaches the tied head through view and alias
    weights = _assert_compressed(model, _ids()).state_dict()
    assert weights["transformer.h.0.attn.c_attn.weight"].shape == (31, 96)
    assert weights["transformer.h.1.mlp.c_proj.weight"].shape == (128, 31)
    assert weights["transformer.wpe.weight"].shape == (16, 31)


def test_hf_bert_crmsnorm_is_skipped():
    torch.manual_seed(0)
    config = transformers.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                     intermediate_size=64, vocab_size=50, max_position_embeddings=16)
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    result = optimize_to_graph(model, _ids(), passes=["ln_to_crmsnorm"])
    reasons = " ".join(reason for _, reason in result.report.passes[0].skipped)
    assert result.report.passes[0].applied == 0
    assert "Post-LN" in reasons and "decompressed there" in reasons  # the embedding LayerNorm feeds the encoder
