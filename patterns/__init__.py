"""The rewrite library: one file per pass family. Importing a module registers its passes;
the default pipeline runs the default ones in the order imported here."""

# noqa: F401 throughout: these imports register the passes
from . import remove_noops, fold_bn, fold_constants, reparam_conv, merge_lora  # noqa: F401
from . import ln_to_rmsnorm, reparam_quant, smooth_quant  # noqa: F401  (not in the default pipeline)
from . import fold_norm_affine, fold_repbn  # noqa: F401
from . import ln_to_crmsnorm  # noqa: F401  (not in the default pipeline)
