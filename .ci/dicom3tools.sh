# Debian's dicom3tools for the DICOM SEG and SR tests (its `dciodvfy` checks an object against the
# standard's module definitions); sourced by .ci/run (bash, set -euo pipefail).

ci_dicom3tools_install() {
    if command -v dciodvfy >/dev/null; then
        return 0
    fi
    echo "dciodvfy not found: installing Debian's dicom3tools package" >&2
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends dicom3tools
    command -v dciodvfy >/dev/null || { echo "no dciodvfy after installing dicom3tools" >&2; return 1; }
}
