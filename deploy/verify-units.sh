#!/usr/bin/env bash
# Check the systemd units in deploy/systemd with `systemd-analyze verify`.
#
# verify also checks that every ExecStart binary exists, so the units are copied to a
# temporary directory with /opt/kiosk-vitals/venv/bin/ rewritten to this checkout's
# virtual environment (override with VENV_BIN=/path/to/venv/bin).
#
# systemd-analyze reports unknown keys and unparsable values as warnings and still
# exits 0, so any output at all counts as a failure here.
#
# Needs: systemd-analyze (Debian/Ubuntu package "systemd").
# Exit status: 0 all units clean, 1 a unit has a problem, 2 cannot run.
set -euo pipefail

repo_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
units_dir="${repo_dir}/deploy/systemd"
venv_bin="${VENV_BIN:-${repo_dir}/.venv/bin}"
installed_bin="/opt/kiosk-vitals/venv/bin"

if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "verify-units: systemd-analyze not found (apt-get install systemd)" >&2
    exit 2
fi
for script in kiosk-agent vitals-bridge; do
    if [[ ! -x "${venv_bin}/${script}" ]]; then
        echo "verify-units: ${venv_bin}/${script} missing (pip install -e .)" >&2
        exit 2
    fi
done

work_dir="$(mktemp -d)"
trap 'rm -rf -- "${work_dir}"' EXIT

shopt -s nullglob
units=("${units_dir}"/*.service)
if ((${#units[@]} == 0)); then
    echo "verify-units: no units in ${units_dir}" >&2
    exit 2
fi
cp -- "${units[@]}" "${work_dir}/"
sed -i "s|${installed_bin}/|${venv_bin}/|g" "${work_dir}"/*.service

status=0
output="$(systemd-analyze verify --man=no "${work_dir}"/*.service 2>&1)" || status=$?
if ((status != 0)) || [[ -n "${output}" ]]; then
    # Show the repository's file names, not the temporary copies.
    printf '%s\n' "${output//${work_dir}/${units_dir}}" >&2
    echo "verify-units: FAILED (systemd-analyze exit status ${status})" >&2
    exit 1
fi
echo "verify-units: ${#units[@]} units OK ($(systemd-analyze --version | head -n 1))"
