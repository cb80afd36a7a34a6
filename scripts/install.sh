#!/usr/bin/env bash
# Installs exactly what uv.lock holds into a virtual environment (make install, the Dockerfile).
#
#   scripts/install.sh VENV [uv sync options...]
#
# The installer is itself locked: the uv version named in uv.lock is installed with the
# environment's own pip first, then `uv sync --locked` installs every locked package, checks
# each against the lock's hashes, and removes anything the lock does not name. It never takes a
# newer release than the lock holds (`make lock` writes a new lock), and it fails, naming the
# fix, if pyproject.toml asks for something the lock does not hold.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:?usage: scripts/install.sh VENV [uv sync options...]}
shift
python=${PYTHON:-python3}

locked_uv=$("$python" - <<'PY'
import tomllib

with open("uv.lock", "rb") as lock:
    packages = tomllib.load(lock)["package"]
print(next(p["version"] for p in packages if p["name"] == "uv"))
PY
)
# uv trusts the certificate authorities pip is told to (a TLS proxy's, say; compose's python
# image sets PIP_CERT to the building machine's bundle).
if [ -z "${SSL_CERT_FILE:-}" ] && [ -n "${PIP_CERT:-}" ]; then
  export SSL_CERT_FILE=$PIP_CERT
fi
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
if [ "$("$venv/bin/uv" --version 2>/dev/null | cut -d' ' -f2)" != "$locked_uv" ]; then
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "uv==$locked_uv"
fi
# --compile-bytecode: uv, unlike pip, leaves the packages uncompiled, and where the bytecode
# cannot be written back (PYTHONDONTWRITEBYTECODE, as CI machines and images often set, or the
# image's read-only /opt/substrate) every process compiled them all again at each start: 0.26 s
# of substratectl's 0.59 s, measured here.
UV_PROJECT_ENVIRONMENT=$venv "$venv/bin/uv" sync --locked --quiet --compile-bytecode \
  --python "$venv/bin/python" "$@"
