#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs the Python environment,
# Redis and the Kubernetes test-cluster tools (all cached outside the checkout),
# then runs pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source hack/env.sh
hack/install-redis.sh
hack/cluster-tools.sh
exec python -m pytest "$@"
