#!/usr/bin/env bash
# Run lmkernel's CUDA checks on an NVIDIA machine with no network (the device tool's box).
#
# Expects wheels in .whl/ (exllamav2, msgspec, trio, sniffio, outcome, lmkernel itself) and,
# optionally, a prebuilt exllamav2_ext*.so in .ext/ (else the extension is JIT-built: minutes).
# Writes logs (and the built extension, for next time) to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
for gz in .ext/*.so.gz; do [ -e "$gz" ] && gunzip -kf "$gz"; done
if ls .ext/exllamav2_ext*.so >/dev/null 2>&1; then
    export PYTHONPATH=$PWD/.ext:$PYTHONPATH
fi
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
export CPATH=$(python3 -c 'import os, nvidia; print(os.path.join(list(nvidia.__path__)[0], "cu13", "include"))')${CPATH:+:$CPATH}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export TORCH_EXTENSIONS_DIR=/tmp/torch_ext
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
start=$(date +%s)
python3 -c "import exllamav2, exllamav2.ext as e; print('exllamav2', exllamav2.__version__, 'jit', e.build_jit)" 2>&1 | tail -3
echo "import took $(( $(date +%s) - start )) s"
# Bring the built extension back (gzipped: files from the box are limited in size).
find /tmp/torch_ext -name 'exllamav2_ext*.so' -exec sh -c 'gzip -9c "$1" > "$2/$(basename "$1").gz"' _ {} "$OUT" \; 2>/dev/null
case "${1:-tests}" in
    tests) shift; python3 -m pytest -m cuda tests/backends/test_exllamav2.py -v -p no:cacheprovider -o filterwarnings=default "$@" 2>&1 | tee "$OUT/cuda-tests.log" ;;
    bench) shift; python3 benchmarks/exllamav2.py "$@" 2>&1 | tee -a "$OUT/bench.log" ;;
    lmkernel) shift; python3 -m lmkernel "$@" ;;
    python) shift; python3 "$@" ;;
esac
