#!/usr/bin/env bash
# The README's first command: set up the machine, then the embedded default end to end on CPU
# (convert the real small models, build the tiny QA set, train the 3-stage curriculum, compare).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
exec .venv/bin/python -m ltu_jax.tiny "$@"
