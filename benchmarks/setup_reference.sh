#!/usr/bin/env bash
# Install the authors' reference implementation (PyPI apiprompting 0.1.0rc2, its CLIP half) for
# benchmarks/clip_vs_reference.py.
#
#   bash benchmarks/setup_reference.sh [VENV]
#
# VENV an existing virtual environment (e.g. the project's .venv): the reference and what its CLIP half
#      imports are added to it.
# VENV a path that does not exist yet (default: ~/.cache/api-prompting/reference-venv): a new venv is
#      made there with `python3 -m venv` (set PYTHON to pick the interpreter), this project is installed
#      into it (pip install -e .), then the reference.
#
# The reference goes in with --no-deps: its declared dependencies name the authors' LLaVA fork, which is
# not needed here (clip_vs_reference.py imports only api_clip). Its CLIP half needs einops and ftfy
# (vendored open_clip fork), opencv-python-headless (api_clip/main.py imports cv2), requests, tqdm,
# regex, torchvision and huggingface_hub (already there with open_clip_torch); psutil is not needed.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-${HOME}/.cache/api-prompting/reference-venv}"

if [[ ! -x "${venv}/bin/python" ]]; then
    echo "creating ${venv}"
    "${PYTHON:-python3}" -m venv "${venv}"
    "${venv}/bin/python" -m pip install --upgrade pip
    "${venv}/bin/python" -m pip install -e "${repo_root}"
fi

"${venv}/bin/python" -m pip install --no-deps "apiprompting==0.1.0rc2"
"${venv}/bin/python" -m pip install einops ftfy opencv-python-headless requests tqdm regex

"${venv}/bin/python" - <<'EOF'
import importlib.util
import sys
from pathlib import Path

spec = importlib.util.find_spec("apiprompting")
sys.path.insert(0, str(Path(spec.origin).parent))
import api_clip.hook  # noqa: E402,F401
import api_clip.main  # noqa: E402,F401

print(f"reference CLIP half importable from {Path(spec.origin).parent / 'api_clip'}")
EOF
echo "run: ${venv}/bin/python ${repo_root}/benchmarks/clip_vs_reference.py"
