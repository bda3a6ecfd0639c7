#!/usr/bin/env bash
# CI step: the lmms-eval route (`lmms-eval --model tokred`) in an environment of its own, offline,
# on a tiny saved model and tiny local tasks (tests/test_lmms_eval_plugin.py). lmms-eval's declared
# requirements pull a CUDA torchvision on CPU machines, so it is installed with --no-deps plus what
# its evaluation path imports (docs/recipes/lmms-eval.md), everything under constraints-eval.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .venv-lmms
start=$SECONDS
python3 -m venv .venv-lmms
.venv-lmms/bin/pip install -q -c constraints-eval.txt torch transformers pluggy pydantic pillow tokenizers rich \
    accelerate datasets evaluate loguru pytablewriter pytz sacrebleu tenacity pyyaml jinja2 filelock pytest
.venv-lmms/bin/pip install -q -c constraints-eval.txt --no-deps lmms-eval -e . -e plugins/todre -e plugins/star
echo "== lmms-eval environment built in $((SECONDS - start)) s"
.venv-lmms/bin/python -c "import lmms_eval.evaluator, importlib.metadata as m; print('lmms-eval', m.version('lmms-eval'), 'transformers', m.version('transformers'))"
# Here a skip would mean a broken install, not a missing optional dependency: refuse it.
.venv-lmms/bin/pytest -q -p no:cacheprovider -rs tests/test_lmms_eval_plugin.py 2>&1 | tee .venv-lmms/pytest.log
if grep -q "SKIPPED" .venv-lmms/pytest.log; then
  echo "lmms-eval tests were skipped in the lmms-eval environment: failing" >&2
  exit 1
fi
echo "== lmms-eval step took $((SECONDS - start)) s"
