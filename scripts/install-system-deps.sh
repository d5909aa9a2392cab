#!/usr/bin/env bash
# Debian packages the tests need: sqlite3 (the CLI shell plays an application),
# openssh-server, openssh-sftp-server, openssh-client (sftp:// repositories are
# tested against a real sshd that the tests start themselves on loopback, as the
# current user, with keys they generate), etcd-server (the failover lease across
# machines, tested against an etcd the tests start on loopback), resource-agents,
# libxml2-utils and curl (the OCF resource agent, checked with ocf-tester), strace
# (kills a restore at each of its file operations), prometheus (promtool checks the
# sample alert rules in contrib/), systemd (systemd-analyze verifies the sample unit),
# chromium (the dashboard is tested, and its screenshots taken, in a real headless browser).
# Idempotent: installs only what is missing; says what to do when it cannot.
set -euo pipefail

# package -> a file that proves it is installed
declare -A NEEDS=(
  [sqlite3]=/usr/bin/sqlite3
  [openssh-server]=/usr/sbin/sshd
  [openssh-client]=/usr/bin/ssh-keygen
  [openssh-sftp-server]=/usr/lib/openssh/sftp-server
  [etcd-server]=/usr/bin/etcd
  [resource-agents]=/usr/sbin/ocf-tester
  [libxml2-utils]=/usr/bin/xmllint
  [curl]=/usr/bin/curl
  [strace]=/usr/bin/strace
  [prometheus]=/usr/bin/promtool
  [systemd]=/usr/bin/systemd-analyze
  [chromium]=/usr/bin/chromium
)

missing=()
for pkg in "${!NEEDS[@]}"; do
  [ -x "${NEEDS[$pkg]}" ] || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0

fail() {
  echo "error: could not install Debian package(s): ${missing[*]} ($1)" >&2
  echo "  install them yourself (as root: apt-get update && apt-get install -y ${missing[*]}) and rerun \`make setup\`" >&2
  exit 1
}

command -v apt-get >/dev/null 2>&1 || fail "apt-get not found: not a Debian-like system"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null || fail "not root and no password-less sudo"
  SUDO="sudo -n"
fi

echo "installing Debian packages: ${missing[*]}"
# The tests start their own sshd and etcd; never let the packages start system ones.
# policy-rc.d answering 101 is Debian's documented way to forbid service starts.
added_policy=""
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
  $SUDO chmod 755 /usr/sbin/policy-rc.d
  added_policy=1
fi
cleanup() { [ -z "$added_policy" ] || $SUDO rm -f /usr/sbin/policy-rc.d; }
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null || fail "apt-get update failed"
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || fail "apt-get install failed"

for pkg in "${missing[@]}"; do
  [ -x "${NEEDS[$pkg]}" ] || fail "$pkg installed but ${NEEDS[$pkg]} is still missing"
done
echo "installed: ${missing[*]}"
