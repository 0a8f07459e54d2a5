"""The rewrite library: one file per pass family. Importing a module registers its passes;
the default pipeline runs them in the order imported here."""

from . import remove_noops, fold_bn, fold_constants, reparam_conv, merge_lora  # noqa: F401  (registration)
from . import ln_to_rmsnorm  # noqa: F401, E402  (registration)
from . import reparam_quant  # noqa: F401, E402  (registration; not default)
from . import smooth_quant  # noqa: F401, E402  (registration; not default)
from . import fold_norm_affine, fold_repbn  # noqa: F401, E402  (registration)
