#!/usr/bin/env bash
# Prints the path of a Python >= 3.12 interpreter, or fails with a message.
# Order: python3.13 / python3.12 on PATH, then interpreters under `pyenv root`.
# Each candidate is run, because a pyenv shim can exist for a version that is not active.
set -u
is_new_enough() {
  "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1
}
for name in python3.13 python3.12; do
  if command -v "$name" >/dev/null 2>&1 && is_new_enough "$name"; then
    "$name" -c 'import sys; print(sys.executable)'
    exit 0
  fi
done
if command -v pyenv >/dev/null 2>&1; then
  root="$(pyenv root)"
  for candidate in $(ls -d "$root"/versions/3.*/bin/python3 2>/dev/null | sort -V -r); do
    if is_new_enough "$candidate"; then
      echo "$candidate"
      exit 0
    fi
  done
fi
echo "memjax needs Python >= 3.12 (see docs/design.md, Tests and versions): none found as python3.13/python3.12" \
     "on PATH nor under \`pyenv root\`. Install one (e.g. \`pyenv install 3.12\`) and retry." >&2
exit 1
