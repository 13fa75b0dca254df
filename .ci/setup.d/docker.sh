#!/usr/bin/env bash
# System packages for the container executor's service tests (tests/services/test_container_executor.py).
#
# docker.io gives dockerd (+ containerd, runc); the tests start their own daemon on a private
# socket, so apt must start none: a policy-rc.d exiting 101 forbids service starts.
# podman (daemonless) runs with runc, already pulled in by docker.io; catatonit is its `--init`.
# busybox-static is the whole userland of the test image (imported with `docker import`).
set -euo pipefail

packages=(docker.io podman catatonit busybox-static)
missing=()
for pkg in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done
if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi

if ! grep -qs '^exit 101' /usr/sbin/policy-rc.d; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
fi
export DEBIAN_FRONTEND=noninteractive
# Other setup scripts (or an unattended upgrade) may hold the dpkg lock: wait for it.
apt-get -o DPkg::Lock::Timeout=600 update -qq
apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}"
