#!/usr/bin/env bash
# System packages for the ssh executor's service tests (tests/services/test_ssh_executor.py):
# the OpenSSH server (the client ships with Debian) and the dedicated login user the test sshd
# accepts. Idempotent: safe to run on every CI run and on a developer machine.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    echo "ssh.sh: must run as root (it installs packages and creates a user)" >&2
    exit 1
fi

if [ ! -x /usr/sbin/sshd ] || ! command -v ssh >/dev/null 2>&1; then
    # Keep apt from starting a system-wide sshd: the tests start their own on a free port.
    if ! grep -qs '^exit 101' /usr/sbin/policy-rc.d; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y --no-install-recommends openssh-server openssh-client
fi

# sshd refuses to start without its privilege-separation directory.
mkdir -p /run/sshd
chmod 755 /run/sshd

# The login user of the test sshd. `--password '*'` makes the account usable with keys only;
# a `!` password would lock it and sshd would refuse the login.
if ! id -u rulework-ssh >/dev/null 2>&1; then
    useradd --create-home --shell /bin/sh --password '*' rulework-ssh
fi
