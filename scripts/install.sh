#!/usr/bin/env bash
# Install fedlora into the current Python environment.
#   bash scripts/install.sh          # the package
#   bash scripts/install.sh test     # the package and its test tools
# torch goes first and pinned: 2.13.0 is a CPU wheel these machines have on
# disk, and once it is installed no dependency may replace it (pip keeps an
# installed version that satisfies "torch>=2.2").
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "torch==2.13.0"
extra=""
[ "${1:-}" = "test" ] && extra="[test]"
python -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -e ".${extra}"
