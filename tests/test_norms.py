"""ln_to_rmsnorm on hand-written and HF transformers: converted where Pre-LN, skipped with the reason elsewhere."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Interpreter

import fxopt
from fxopt.equivalence import check_pass
from tests.transformer_blocks import TiedLM, ViT


def _norm_inputs(result: GraphModule, inputs: tuple) -> list[torch.Tensor]:
    """The value reaching every F.layer_norm of the result (codegen emits RMSNorms as that kernel)."""
    seen: list[torch.Tensor] = []

    class Recorder(Interpreter):
        def call_function(self, target, args, kwargs):
            if target is F.layer_norm:
                seen.append(args[0])
            return super().call_function(target, args, kwargs)

    with torch.no_grad():
        Recorder(result).run(*inputs)
    return seen


def _assert_converted(model: torch.nn.Module, inputs: tuple, norms: int) -> GraphModule:
    """Converted: one stream rewrite, every norm an RMSNorm (its input zero-mean), equivalent."""
    result = fxopt.optimize(model, inputs, passes=["ln_to_rmsnorm"])
    stats = result.report.passes[0]
    assert stats.applied == 1 and not stats.skipped and not stats.rolled_back, str(result.report)
    seen = _norm_inputs(result, inputs)
    assert len(seen) == norms
    for x in seen:  # zero-mean input: the LayerNorm kernel computes exactly the RMSNorm there
        assert x.mean(-1).abs().max() <= 1e-5 * x.abs().max()
    assert fxopt.verify(model, result, inputs).passed
    return result


def _skip_reasons(model: torch.nn.Module, inputs: tuple) -> str:
    result = fxopt.optimize(model, inputs, passes=["ln_to_rmsnorm"])
    return " ".join(reason for _, reason in result.report.passes[0].skipped)


def test_check_pass_ln_to_rmsnorm():
    assert check_pass("ln_to_rmsnorm", max_examples=15).instances == 15


def test_vit_with_layer_scale_and_cls_token():
    torch.manual_seed(0)
    model = ViT(layer_scale=True).eval()
    result = _assert_converted(model, (torch.randn(2, 3, 8, 8),), norms=5)
    assert "mul" not in result.code  # LayerScale folded into the output projections


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
    result = fxopt.optimize(model, _ids(), passes=["ln_to_rmsnorm"])
    reasons = " ".join(reason for _, reason in result.report.passes[0].skipped)
    assert "Post-LN" in reasons
    # only the embedding sum (read by the embedding LayerNorm alone) may be converted; the encoder is not
    assert result.report.passes[0].applied <= 1
    assert result.report.verification.passed
