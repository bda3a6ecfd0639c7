# Shell functions shared by .ci/run and .ci/next-release.sh (sourced, not run).

readme_command() {  # the bash block that follows <!-- $1 --> in README.md
  python3 - "$1" <<'PY'
import re, sys
text = open("README.md").read()
match = re.search(r"<!-- " + re.escape(sys.argv[1]) + r"[^>]*-->\s*```bash\n(.*?)```", text, re.S)
if not match:
    sys.exit(f"README.md has no bash block after <!-- {sys.argv[1]} -->")
print(match.group(1).strip())
PY
}

release_sensitive_tests() {  # the paths of .ci/release-sensitive-tests.txt, globs expanded, on one line
  local line paths=()
  shopt -s nullglob  # a glob that matches nothing expands to nothing, not to itself
  while IFS= read -r line; do
    line=${line%%#*}
    line=${line//[[:space:]]/}
    [ -n "$line" ] || continue
    # shellcheck disable=SC2206  # the glob is meant to expand
    paths+=($line)
  done < .ci/release-sensitive-tests.txt
  shopt -u nullglob
  echo "${paths[*]}"
}

split_install_and_pytest() {  # $1: "python3 -m venv ... && pip install ... && .../pytest"; sets INSTALL and PYTEST
  INSTALL=${1% && *}
  PYTEST=${1##* && }
  if [ "$INSTALL && $PYTEST" != "$1" ] || [[ "$PYTEST" != *pytest* ]]; then
    echo "cannot split the README's test command into its install and its pytest: $1" >&2
    return 1
  fi
}
