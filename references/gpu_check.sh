#!/usr/bin/env bash
# The CUDA check (see references/benchmarks/gpu_check.py): one CUDA GPU, under 8 minutes.
#   bash references/gpu_check.sh [OUT_DIR]        -> OUT_DIR/gpu_check.json, exit 1 if any check fails
# Wheels in .whl/ (e.g. pycocotools for a machine without it) are installed first, offline.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-gpu_check_out}"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu_check_site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, \
'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
exec python3 references/benchmarks/gpu_check.py --device cuda --out "$OUT"
