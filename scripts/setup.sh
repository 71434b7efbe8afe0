#!/usr/bin/env bash
# Idempotent set-up of a fresh machine: Debian packages (espeak-ng, sox for test speech; chromium for the demo's
# browser test, driven by Playwright, which cannot download its own browser here) and the venv at
# .venv from requirements.txt. Re-installs only when requirements.txt changed. Sourced by the run scripts.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

need_apt=()
for tool in espeak-ng sox chromium; do
  command -v "$tool" >/dev/null 2>&1 || need_apt+=("$tool")
done
if ((${#need_apt[@]})); then
  echo "setup: installing Debian packages ${need_apt[*]}" >&2
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

stamp="$root/.venv/.requirements.sha256"
want="$(sha256sum "$root/requirements.txt" | cut -d' ' -f1)"
if [[ ! -x "$root/.venv/bin/python" || "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
  echo "setup: creating .venv from requirements.txt (about 2 minutes)" >&2
  python3 -m venv "$root/.venv"
  "$root/.venv/bin/pip" install -q --disable-pip-version-check --no-deps -r "$root/requirements.txt"
  echo "$want" >"$stamp"
fi
