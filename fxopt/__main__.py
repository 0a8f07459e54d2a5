"""``python -m fxopt``: the demo (optimize a built-in ResNet-50-shaped model and print the report).

``python -m fxopt EXAMPLE`` demos another built-in example; ``python -m fxopt COMMAND ...`` runs
the ``fxopt`` command line (see ``fxopt --help``).
"""

from __future__ import annotations

import sys

from fxopt.cli import main
from fxopt.examples import EXAMPLES

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not argv or argv[0] in EXAMPLES:
        argv = ["demo", *argv]
    sys.exit(main(argv))
