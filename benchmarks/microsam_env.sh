#!/usr/bin/env bash
# Build the separate Python environment for bench_microsam.py (micro-sam's own training, for the
# side-by-side benchmark of issue 12). micro-sam is NOT a dependency of this project: it lives only
# in this environment. Usage:
#
#   bash benchmarks/microsam_env.sh [ENV_DIR]   # default: microsam_env beside the repository
#   ENV_DIR/bin/python benchmarks/bench_microsam.py --n_sub_iteration 1
#
# From the package registry only; about 7 GiB on disk (torch is the CUDA build, as in
# requirements.txt; micro-sam also pulls napari and PyQt6). The torch/torchvision pins match
# requirements.txt so both benchmarks run the same torch.
set -euo pipefail
cd "$(dirname "$0")"
ENV_DIR="${1:-../../microsam_env}"  # beside the repository

python3 -m venv "$ENV_DIR"
PY="$ENV_DIR/bin/python"
"$PY" -m pip install --upgrade pip
"$PY" -m pip install torch==2.14.1 torchvision==0.29.1
# torch-em decides the mixed precision (bf16 autocast on a CPU since 0.10.x): pinned with micro-sam.
"$PY" -m pip install micro-sam==1.8.14 torch-em==0.10.9
# vit_t (MobileSAM) needs the `mobile_sam` module, which micro-sam does not install (upstream points
# to a git checkout); the PyPI package mobilesam-mirror provides it, as in requirements.txt.
"$PY" -m pip install mobilesam-mirror==1.0.0 timm==1.0.31
"$PY" - <<'EOF'
import warnings
warnings.simplefilter("ignore")
import micro_sam, micro_sam.training, micro_sam.util, torch_em
from micro_sam.training import train_sam  # noqa: F401
assert micro_sam.util.VIT_T_SUPPORT, "mobile_sam is missing: vit_t cannot be built"
print(f"micro-sam {micro_sam.__version__}, torch-em {torch_em.__version__}: ready in {__import__('sys').prefix}")
EOF
