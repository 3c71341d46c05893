#!/bin/sh
# Runs inside the Xen lab's dom0, chrooted into the host's (read-only) root: starts the C
# xenstored and xen-init-dom0 from the host's xen-utils, then runs the pytest selection
# named in guest.env with its output, junit XML and exit code in the results share.
# Started by xenlab/init; the host side is xenlab/lab.py.
set -u
RESULTS=/tmp/xenlab-results
set -a  # the XENLAB_* settings reach the tests (test_domu.py reads the domU's files)
. "$RESULTS/guest.env"
set +a
XEN_BIN=/usr/lib/xen-4.17/bin
export HOME=/tmp PATH=/usr/sbin:/usr/bin:/sbin:/bin PYTHONDONTWRITEBYTECODE=1
export AIOXEN_XENLAB_GUEST=1 HYPOTHESIS_STORAGE_DIRECTORY=/tmp/hypothesis

up() { cut -d' ' -f1 /proc/uptime; }
say() { echo "xenlab: $*" | tee -a "$RESULTS/guest.log"; }

say "guest script at $(up)s; kernel $(uname -r); $(cat /proc/xen/capabilities 2>/dev/null)"
mkdir -p /run/xenstored /run/xen /run/lock /var/lib/xen /var/log/xen
"$XEN_BIN/xenstored" --pid-file /run/xenstored.pid >>"$RESULTS/guest.log" 2>&1
i=0
while [ ! -S /run/xenstored/socket ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
"$XEN_BIN/xen-init-dom0" >>"$RESULTS/guest.log" 2>&1 || say "xen-init-dom0 FAILED"
say "xenstored up at $(up)s: domid=$(xenstore-read domid 2>&1) name=$(xenstore-read name 2>&1)"
ls -l /dev/xen >>"$RESULTS/guest.log" 2>&1
# The console daemon `xl create` needs for a domU; domU consoles are logged to results/.
mkdir -p "$RESULTS/consoles"
"$XEN_BIN/xenconsoled" --pid-file=/run/xenconsoled.pid --log=guest \
    --log-dir="$RESULTS/consoles" >>"$RESULTS/guest.log" 2>&1 || say "xenconsoled FAILED"

cd "$XENLAB_TREE" || { say "no tree at $XENLAB_TREE"; exit 1; }
say "pytest $XENLAB_PYTEST_ARGS at $(up)s"
eval "set -- $XENLAB_PYTEST_ARGS"  # shell-quoted by lab.py
timeout "$XENLAB_PYTEST_TIMEOUT" "$XENLAB_PYTHON" -m pytest -p no:cacheprovider -rA --durations=15 \
    --junitxml="$RESULTS/junit.xml" "$@" >"$RESULTS/pytest.log" 2>&1
rc=$?
echo "$rc" >"$RESULTS/pytest.rc"
say "pytest exited $rc at $(up)s; summary:"
grep -E '^(=+ .*(passed|failed|error|skipped|no tests ran).* =+|FAILED |ERROR )' \
    "$RESULTS/pytest.log" | tail -n 40
sync
exit "$rc"
