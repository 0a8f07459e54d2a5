#!/usr/bin/env bash
# Install fxopt and what it needs into the current Python, CPU-only torch first (an unpinned torch
# would pull a multi-GB CUDA build). transformers and peft are optional: tests that need them skip.
set -euo pipefail
python3 -m pip install -q "torch==2.13.0"
python3 -m pip install -q -e ".[test]"
python3 -m pip install -q transformers peft || echo "transformers/peft not installed: their tests will skip"
