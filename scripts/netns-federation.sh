#!/usr/bin/env bash
# A federation on one machine (as root): a namespace per host, each with its own address,
# started with the commands of docs/deployment.md. See tools/netns.py.
#   scripts/netns-federation.sh up DIR [--nodes 3]
#   scripts/netns-federation.sh run DIR model=tiny clients=3 clients_per_round=3 rounds=2
#   scripts/netns-federation.sh cut DIR node-1 ; scripts/netns-federation.sh restore DIR node-1
#   scripts/netns-federation.sh down DIR
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m tools.netns "$@"
