#!/usr/bin/env bash
# CI step: the lmms-eval route (`lmms-eval --model tokred`) in an environment of its own, offline,
# on a tiny saved model and tiny local tasks (tests/test_lmms_eval_plugin.py). lmms-eval's declared
# requirements pull a CUDA torchvision on CPU machines, so it is installed with --no-deps plus what
# its evaluation path imports (docs/recipes/lmms-eval.md), everything under constraints-eval.txt.
#
# `bash .ci/lmms-eval.sh VERSION` (what .ci/next-release.sh lmms-eval runs) tries another lmms-eval
# release instead, in .venv-lmms-next.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-lmms
start=$SECONDS
if [ $# -ge 1 ]; then  # a candidate release
  VENV=.venv-lmms-next
fi
rm -rf "$VENV"
python3 -m venv "$VENV"
CONSTRAINTS=constraints-eval.txt
if [ $# -ge 1 ]; then
  grep -vE '^lmms-eval==' constraints-eval.txt > "$VENV/constraints.txt"
  echo "lmms-eval==$1" >> "$VENV/constraints.txt"
  CONSTRAINTS=$VENV/constraints.txt
fi
"$VENV/bin/pip" install -q -c "$CONSTRAINTS" torch transformers pluggy pydantic pillow tokenizers rich \
    accelerate datasets evaluate loguru pytablewriter pytz sacrebleu tenacity pyyaml jinja2 filelock pytest
"$VENV/bin/pip" install -q -c "$CONSTRAINTS" --no-deps lmms-eval -e . -e plugins/todre -e plugins/star
echo "== lmms-eval environment built in $((SECONDS - start)) s"
"$VENV/bin/python" -c "import lmms_eval.evaluator, importlib.metadata as m; print('lmms-eval', m.version('lmms-eval'), 'transformers', m.version('transformers'))"
# Here a skip would mean a broken install, not a missing optional dependency: refuse it.
"$VENV/bin/pytest" -q -p no:cacheprovider -rs tests/test_lmms_eval_plugin.py 2>&1 | tee "$VENV/pytest.log"
if grep -q "SKIPPED" "$VENV/pytest.log"; then
  echo "lmms-eval tests were skipped in the lmms-eval environment: failing" >&2
  exit 1
fi
echo "== lmms-eval step took $((SECONDS - start)) s"
