#!/usr/bin/env bash
# Make a virtual environment with fxopt and the model zoo it is tested on, and print its python.
#
#   bash scripts/setup.sh            # torch 2.14.1 + torchvision 0.29.1, timm, transformers, peft
#   bash scripts/setup.sh 2.13.0     # torch 2.13.0 (CPU build), transformers, peft; no torchvision/timm
#
# torch goes in first and pinned: an unpinned torch pulls a CUDA build of several GB from the index
# (2.14.1 and 2.13.0 are taken from this machine's disk by pip). torchvision from PyPI does not
# import beside 2.13.0, so that environment has no timm and its timm/torchvision tests skip.
# The environment lives outside the checkout (FXOPT_VENVS, default ~/.cache/fxopt) so a fresh
# clone reuses it: pip then only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
torch_version="${1:-2.14.1}"
venv="${FXOPT_VENVS:-$HOME/.cache/fxopt}/torch-$torch_version"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv" >&2
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
case "$torch_version" in
  2.14.1) "${pip[@]}" "torch==2.14.1" "torchvision==0.29.1" >&2; zoo=(timm transformers peft) ;;
  2.13.0) "${pip[@]}" "torch==2.13.0" >&2; zoo=(transformers peft) ;;
  *) echo "setup.sh: torch $torch_version is not one CI tests (2.14.1 or 2.13.0)" >&2; exit 2 ;;
esac
"${pip[@]}" -e ".[test]" >&2
"${pip[@]}" "${zoo[@]}" >&2
echo "$venv/bin/python"
