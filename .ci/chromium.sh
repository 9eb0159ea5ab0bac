# Debian's Chromium for the browser tests; sourced by .ci/run (bash, set -euo pipefail).
#
# The tests drive it with Playwright for Python (a test dependency in pyproject.toml), launched with
# this executable: browsers cannot be downloaded here, so `playwright install` is never run.

ci_chromium_install() {
    if [[ -x /usr/bin/chromium ]]; then
        return 0
    fi
    echo "Chromium not found: installing Debian's chromium package" >&2
    apt-get update
    # With its recommended packages: the fonts the pages are rendered with come among them.
    DEBIAN_FRONTEND=noninteractive apt-get install -y chromium
    [[ -x /usr/bin/chromium ]] || { echo "no /usr/bin/chromium after installing chromium" >&2; return 1; }
}
