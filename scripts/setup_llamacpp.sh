#!/usr/bin/env bash
# A venv in .venv-llamacpp with llama.cpp's Python binding (llama-cpp-python), for the GGUF export tests: an
# independent implementation that reads what `automodel export --format gguf` writes. Its own venv because the
# binding builds llama.cpp from source (gcc, g++ and cmake; about 5 minutes on 2 cores) and needs nothing of ours.
# Safe to run again: it only installs what is missing (checked by installed version, without importing it).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LLAMA_CPP_PYTHON_VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
has() { .venv-llamacpp/bin/python -c "import importlib.metadata as m, sys; sys.exit(m.version('$1') != '$2')" 2>/dev/null; }
[ -x .venv-llamacpp/bin/python ] || "$PYTHON" -m venv .venv-llamacpp
# CPU only, and for this machine's own instruction set (the default): a portable build is not needed for tests.
has llama_cpp_python "$LLAMA_CPP_PYTHON_VERSION" || CMAKE_ARGS="${CMAKE_ARGS:--DGGML_CUDA=OFF}" \
    .venv-llamacpp/bin/pip install -q "llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION}"
