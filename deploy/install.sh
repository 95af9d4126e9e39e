#!/usr/bin/env bash
# Install a fastsfu wheel into its own venv: the steps CI runs on the repaired wheel
# (scripts/wheel_smoke.sh), deploy/Dockerfile runs in its runtime stage, and an operator runs
# on a host for deploy/fastsfu.service.
# Usage: deploy/install.sh WHEEL [PREFIX]  (PREFIX: /opt/fastsfu; the server is PREFIX/bin/fastsfu)
set -euo pipefail
wheel=${1:?usage: deploy/install.sh WHEEL [PREFIX]}
prefix=${2:-/opt/fastsfu}
PYTHON=${PYTHON:-python3}

"$PYTHON" -m venv "$prefix"
"$prefix/bin/pip" install --quiet --disable-pip-version-check "$wheel"
"$prefix/bin/fastsfu" --version
