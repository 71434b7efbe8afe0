#!/usr/bin/env bash
# The README's test command: set up the machine, then run the whole suite (real-weight tests included).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
# The suite's peak in the temporary folder is about 5 GB (converted real models); warn before it starts.
tmp="${TMPDIR:-/tmp}"
free_mb=$(df -Pm "$tmp" | awk 'NR == 2 {print $4}')
if [ "$free_mb" -lt 6000 ]; then
  echo "warning: $tmp has ${free_mb} MB free; the tests need about 5000 MB there at their peak" >&2
fi
exec .venv/bin/python -m pytest "$@"
