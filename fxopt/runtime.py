"""Functions the generated code calls besides torch's own, and the modules keep_class swaps in for them.

Each function uses nothing but ``torch`` (spelled in full, no other imports), so :func:`fxopt.save`
writes its source into the saved ``module.py``: a saved model still needs only torch.
"""

from __future__ import annotations

import torch


def zero_mean_rms_norm(
    input: torch.Tensor,
    normalized_shape: tuple[int, ...],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """RMSNorm (plus LayerNorm's bias) of an input that is zero-mean over ``normalized_shape``, run
    with the kernel that is fastest where it runs.

    On a zero-mean input LayerNorm computes exactly this. Eager CPU torch's LayerNorm kernel is the
    faster one (on (512, 768): layer_norm 48 us, rms_norm plus bias 84 us); under torch.compile
    (and torch.export) the RMSNorm decomposition is, since inductor fuses it without the mean's
    reduction (add + norm on (512, 768): 0.81x the time of add + layer_norm). Dynamo reads
    ``is_compiling()`` as a constant, so a compiled graph holds only the RMSNorm.
    """
    if torch.compiler.is_compiling():
        out = torch.nn.functional.rms_norm(input, normalized_shape, weight, eps)
        return out if bias is None else out + bias
    return torch.nn.functional.layer_norm(input, normalized_shape, weight, bias, eps)


class ZeroMeanRMSNorm(torch.nn.LayerNorm):
    """An nn.LayerNorm whose input ln_to_rmsnorm made zero-mean: the same parameters and state_dict,
    run with :func:`zero_mean_rms_norm`, so a model that keeps its class is compiled with the RMSNorm."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return zero_mean_rms_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
