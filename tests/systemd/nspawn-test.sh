#!/usr/bin/env bash
# tests/systemd/nspawn-test.sh -- echod.service and echod.socket under a real
# systemd: boots a Debian 12 root filesystem with systemd as PID 1 in
# systemd-nspawn, installs echod into it with `make install`, and checks
# start, echo, privileges, reload, journal priorities, Restart=, stop and
# socket activation. Each check prints one PASS or FAIL line; the script
# exits 1 if any check failed.
#
# Usage (as root):  make test-systemd      or      tests/systemd/nspawn-test.sh
#
# Environment:
#   ECHOD_BIN          the echod binary to install
#                      (default $CARGO_TARGET_DIR/release/echod, else
#                      target/release/echod; `make test-systemd` builds it)
#   ECHOD_STAND_IN=1   install tests/systemd/stand-in-echod.py as the binary
#                      instead: a Python imitation of echod's systemd
#                      contract, to test the units and this harness alone
#   ECHOD_TEST_CACHE   where the root filesystem is cached
#                      (default /var/cache/echod-test)
#   ECHOD_TEST_KEEP=1  keep the work directory (console log) after the run
#
# It skips (exit 0, "SKIP:" on stderr) only when not run as root or when
# systemd-nspawn cannot be installed. See tests/systemd/README.md for how it
# works and what was learnt on the way.
set -uo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
SUITE=bookworm
MIRROR=http://deb.debian.org/debian
PACKAGES=systemd,systemd-sysv,dbus,procps,iproute2,python3
CACHE=${ECHOD_TEST_CACHE:-/var/cache/echod-test}
NAME=echod-test-$$
WORKERS=2

FAILS=0
PASSES=0
NSPAWN_PID=
CPID=
WORK=
CGROUPS=()
T0=$(date +%s.%N)

say() { printf '%s\n' "$*"; }
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1fs", b - a }'; }
pass() { PASSES=$((PASSES + 1)); say "PASS: $*"; }
fail() { FAILS=$((FAILS + 1)); say "FAIL: $*"; }
skip() { say "SKIP: $*" >&2; exit 0; }
die() { fail "$*"; exit 1; }
# check NAME COMMAND...: one PASS/FAIL line for a command's exit status.
check() {
    local what=$1
    shift
    if "$@"; then pass "$what"; else fail "$what"; fi
}
is_pid() { [[ $1 =~ ^[0-9]+$ ]] && [ "$1" -gt 1 ]; }
# equals ACTUAL EXPECTED: for check, with the actual value in the output.
equals() { [ "$1" = "$2" ] || { say "    got '$1', expected '$2'"; return 1; }; }
# wait_for SECONDS COMMAND...: poll every 0.1 s until COMMAND succeeds.
wait_for() {
    local n=$(($1 * 10))
    shift
    while [ $n -gt 0 ]; do
        "$@" && return 0
        sleep 0.1
        n=$((n - 1))
    done
    return 1
}

# --- Prerequisites -----------------------------------------------------------

[ "$(id -u)" -eq 0 ] || skip "nspawn test needs root (systemd-nspawn, cgroups, debootstrap)"

need=()
command -v systemd-nspawn >/dev/null || need+=(systemd-container)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v zstd >/dev/null || need+=(zstd)
if [ ${#need[@]} -gt 0 ]; then
    say "installing ${need[*]} (apt-get, --no-install-recommends)"
    if ! { timeout 180 apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive timeout 300 apt-get install -y -qq \
            --no-install-recommends "${need[@]}"; } >/dev/null 2>&1; then
        command -v systemd-nspawn >/dev/null ||
            skip "systemd-nspawn is missing and apt-get could not install systemd-container"
        die "apt-get could not install ${need[*]}"
    fi
fi
command -v systemd-nspawn >/dev/null || skip "systemd-nspawn is missing"
for tool in nsenter timeout flock tar make; do
    command -v $tool >/dev/null || die "$tool is missing"
done

STAND_IN=${ECHOD_STAND_IN:-0}
if [ "$STAND_IN" = 1 ]; then
    BIN=$REPO/tests/systemd/stand-in-echod.py
    say "NOTE: testing the stand-in $BIN, not echod"
else
    BIN=${ECHOD_BIN:-${CARGO_TARGET_DIR:-$REPO/target}/release/echod}
fi
[ -x "$BIN" ] || die "no executable $BIN: run \`cargo build --release --bin echod\` (or make test-systemd)"

# --- The root filesystem, built once and cached --------------------------------
# The cache key covers everything that goes into debootstrap, so a changed
# package list builds a new root instead of reusing a stale one. The root is
# kept unpacked and booted with --volatile=overlay, so no run ever writes to
# it (every write goes to a tmpfs) and no run pays for unpacking it: on a
# loaded disk, unpacking 200 MB took 15 s, and removing it as long again.
# The compressed tarball beside it is the portable copy (`tar -I zstd -xf`).

KEY=$(printf '%s\n' "$SUITE" minbase "$PACKAGES" "$MIRROR" "$(uname -m)" | sha256sum | cut -c1-16)
ROOT=$CACHE/rootfs-$SUITE-$KEY
TARBALL=$ROOT.tar.zst
mkdir -p "$CACHE"
# Runs share the cache under a shared lock; building it takes the lock
# exclusively (flock converts by unlocking first, so two runs that both want
# to build cannot deadlock; the second finds the root built).
exec 9>"$CACHE/lock"
flock -s -w 900 9 || die "cannot lock $CACHE/lock"
[ -d "$ROOT" ] || flock -x -w 900 9 || die "another run holds $CACHE/lock"
if [ ! -d "$ROOT" ] && [ -s "$TARBALL" ]; then
    rm -rf "$ROOT.tmp" && mkdir "$ROOT.tmp" &&
        timeout 300 tar -C "$ROOT.tmp" -I zstd -xf "$TARBALL" &&
        mv "$ROOT.tmp" "$ROOT" || die "cannot unpack $TARBALL"
fi
if [ ! -d "$ROOT" ]; then
    command -v debootstrap >/dev/null || die "debootstrap is missing"
    say "building the root filesystem (debootstrap $SUITE, once; about a minute)"
    t=$(date +%s.%N)
    build=$CACHE/build.$$
    # Under the exclusive lock no other run builds: whatever a killed build
    # left behind can go.
    rm -rf "$CACHE"/build.* "$ROOT.tmp"
    if ! timeout 900 debootstrap --variant=minbase --include="$PACKAGES" \
        "$SUITE" "$build" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1; then
        rm -rf "$build"
        die "debootstrap failed (see $CACHE/debootstrap.log)"
    fi
    # Empty machine-id: systemd generates a transient one at every boot.
    : >"$build/etc/machine-id"
    rm -rf "$build"/var/cache/apt/archives/*.deb "$build"/var/lib/apt/lists/*
    timeout 300 tar -C "$build" -I 'zstd -T0 -3' -cf "$TARBALL.tmp" . &&
        mv "$TARBALL.tmp" "$TARBALL" || die "cannot write $TARBALL"
    mv "$build" "$ROOT" || die "cannot move $build to $ROOT"
    say "root filesystem cached in $ROOT ($(du -sh "$ROOT" | cut -f1); $TARBALL $(du -h "$TARBALL" | cut -f1); $(elapsed "$t"))"
fi
flock -s 9

# --- Cleanup, whatever happens -------------------------------------------------

cleanup() {
    local rc=$? p d
    trap - EXIT INT TERM
    if is_pid "${NSPAWN_PID:-}" && kill -0 "$NSPAWN_PID" 2>/dev/null; then
        # SIGTERM to nspawn halts the container cleanly (it sends SIGRTMIN+3
        # to the container's systemd).
        kill -TERM "$NSPAWN_PID" 2>/dev/null
        for _ in $(seq 300); do
            kill -0 "$NSPAWN_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -0 "$NSPAWN_PID" 2>/dev/null && kill -KILL "$NSPAWN_PID" 2>/dev/null
        wait "$NSPAWN_PID" 2>/dev/null
    fi
    # Anything left in our cgroups is ours: kill it by pid, then remove the
    # cgroups depth-first.
    for d in "${CGROUPS[@]}"; do
        [ -d "$d" ] || continue
        for p in $(find "$d" -name cgroup.procs -exec cat {} + 2>/dev/null); do
            is_pid "$p" && kill -KILL "$p" 2>/dev/null
        done
    done
    for d in "${CGROUPS[@]}"; do
        [ -d "$d" ] || continue
        for _ in $(seq 50); do
            find "$d" -depth -type d -exec rmdir {} + 2>/dev/null
            [ -d "$d" ] || break
            sleep 0.1
        done
        [ -d "$d" ] && say "warning: could not remove cgroup $d"
    done
    # What nspawn leaves under /run when /run is not a tmpfs (no systemd on
    # the host): its propagation directory.
    rmdir "/run/systemd/nspawn/propagate/$NAME" 2>/dev/null
    if [ -n "$WORK" ] && [ -d "$WORK" ]; then
        if [ "${ECHOD_TEST_KEEP:-0}" = 1 ]; then
            say "kept $WORK"
        else
            rm -rf --one-file-system "$WORK"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'say "interrupted"; exit 130' INT TERM

WORK=$(mktemp -d /var/tmp/echod-nspawn.XXXXXX)
STAGE=$WORK/stage
mkdir -m 0755 "$STAGE"

# --- Install echod, as an administrator would ------------------------------------
# make install into a staging directory here, copied into the running
# container before the tests (the cached root stays pristine).

t=$(date +%s.%N)
# -o: install the binary as it is, even if sources changed since it was
# built (make test-systemd has just built it; others may be editing src/).
REAL_BIN=$(realpath "${ECHOD_BIN:-${CARGO_TARGET_DIR:-$REPO/target}/release/echod}")
if timeout 120 make -s -C "$REPO" install DESTDIR="$STAGE" PREFIX=/usr/local \
    ECHOD_BIN="$REAL_BIN" -o "$REAL_BIN" >"$WORK/install.log" 2>&1; then
    pass "make install DESTDIR=<staging dir> ($(elapsed "$t"))"
else
    cat "$WORK/install.log"
    die "make install DESTDIR=<staging dir>"
fi
[ "$STAND_IN" = 1 ] && install -m 0755 "$BIN" "$STAGE/usr/local/bin/echod"
# The test's configuration: the shipped file on port 7, with fewer workers
# and a short drain so that stops are quick, and the workers in SCHED_BATCH
# from the start, so that the unit's seccomp filter is seen to allow the
# call that sets it.
sed -i -e "s/^#workers = .*/workers = $WORKERS/" \
    -e 's/^#shutdown_timeout = .*/shutdown_timeout = "3s"/' \
    -e 's/^#sched_policy = .*/sched_policy = "batch"/' "$STAGE/etc/echod.toml"
grep -q "^workers = $WORKERS" "$STAGE/etc/echod.toml" || die "cannot set workers in etc/echod.toml"
grep -q '^sched_policy = "batch"' "$STAGE/etc/echod.toml" ||
    die "cannot set sched_policy in etc/echod.toml"
grep -q '^listen = \["0.0.0.0:7", "\[::\]:7"\]' "$STAGE/etc/echod.toml" ||
    die "etc/echod.toml no longer listens on port 7"

# The echo client, run inside the container's network namespace.
cat >"$STAGE/usr/local/bin/echo-client" <<'EOF'
#!/usr/bin/python3
"""echo-client HOST PORT [BYTES]: send random bytes, expect them back."""
import os, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
size = int(sys.argv[3]) if len(sys.argv) > 3 else 100000
data = os.urandom(size)
with socket.create_connection((host, port), timeout=10) as s:
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    got = bytearray()
    while len(got) < size:
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
if bytes(got) != data:
    sys.exit(f"{host}:{port}: sent {size} bytes, got {len(got)} back, "
             f"{'equal' if bytes(got) == data[:len(got)] else 'different'} so far")
print(f"{host}:{port}: {size} bytes echoed")
EOF
chmod 0755 "$STAGE/usr/local/bin/echo-client"

# --- Boot ------------------------------------------------------------------------

# Our own cgroup, so that the container's systemd builds its tree below it
# and not in the host's root cgroup.
if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
    CGROUPS=("/sys/fs/cgroup/ct-$NAME")
else
    for h in systemd unified; do
        [ -d "/sys/fs/cgroup/$h" ] && CGROUPS+=("/sys/fs/cgroup/$h/ct-$NAME")
    done
fi
for d in "${CGROUPS[@]}"; do mkdir "$d" || die "cannot create cgroup $d"; done

t=$(date +%s.%N)
(
    for d in "${CGROUPS[@]}"; do echo "$BASHPID" >"$d/cgroup.procs"; done
    exec timeout -k 10 900 systemd-nspawn -q -D "$ROOT" -M "$NAME" \
        --volatile=overlay --boot --register=no --keep-unit --private-network \
        --console=read-only systemd.firstboot=off
) >"$WORK/console.log" 2>&1 &
NSPAWN_PID=$!

# The container's PID 1: the process in our cgroup whose innermost pid is 1.
for _ in $(seq 100); do
    for d in "${CGROUPS[@]:0:1}"; do
        for p in $(find "$d" -name cgroup.procs -exec cat {} + 2>/dev/null); do
            if [ "$(awk '/^NSpid:/ { print $NF }' "/proc/$p/status" 2>/dev/null)" = 1 ] &&
                [ "$(cat "/proc/$p/comm" 2>/dev/null)" = systemd ]; then
                CPID=$p
            fi
        done
    done
    [ -n "$CPID" ] && break
    kill -0 "$NSPAWN_PID" 2>/dev/null || break
    sleep 0.1
done
is_pid "$CPID" || { cat "$WORK/console.log"; die "the container did not start"; }

# c CMD...: run CMD inside the container (all its namespaces), bounded.
c() { timeout "${TMO:-30}" nsenter -t "$CPID" -a env -i PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$@"; }

# systemctl needs the manager's private socket, which appears a moment after
# PID 1 starts; then --wait blocks until start-up is over.
wait_for 30 c test -S /run/systemd/private
state=$(TMO=60 c systemctl is-system-running --wait 2>&1)
case $state in
running) pass "container booted, systemd is running ($(elapsed "$t"))" ;;
degraded)
    pass "container booted, systemd is degraded ($(elapsed "$t")); failed units:"
    c systemctl --failed --no-legend --plain | sed 's/^/    /'
    ;;
*)
    cat "$WORK/console.log"
    die "container boot: systemd is '$state'"
    ;;
esac

# Copy the installed files in, and have systemd read the new units, as after
# `make install` on a live system.
if tar -C "$STAGE" -cf - etc usr | c tar -C / --no-overwrite-dir -xf - &&
    c systemctl daemon-reload; then
    pass "installed into the container, daemon-reload"
else
    die "copying the installation into the container"
fi
check "systemd finds echod.service in /usr/local/lib/systemd/system" \
    equals "$(c systemctl show -P FragmentPath echod.service)" /usr/local/lib/systemd/system/echod.service

# --- Helpers on the service ----------------------------------------------------

prop() { c systemctl show -P "$2" "$1" 2>/dev/null; }
# The pids in echod.service's cgroup, whichever hierarchy the container has.
unit_pids() {
    local cg
    cg=$(prop echod.service ControlGroup)
    [ -n "$cg" ] || return 0
    c sh -c "for h in /sys/fs/cgroup/unified /sys/fs/cgroup/systemd /sys/fs/cgroup; do
                 [ -f \$h$cg/cgroup.procs ] && { cat \$h$cg/cgroup.procs; exit; }; done"
}
status_of() { c awk -v k="$2:" '$1 == k { $1 = ""; print substr($0, 2) }' "/proc/$1/status"; }
ppid_of() { status_of "$1" PPid; }
comm_of() { c cat "/proc/$1/comm" 2>/dev/null; }
# workers_of MAIN: the children of the master in the unit's cgroup.
workers_of() {
    local p
    for p in $(unit_pids); do
        [ "$p" != "$1" ] && [ "$(ppid_of "$p")" = "$1" ] && echo "$p"
    done
}
journal() { c journalctl -q --no-pager "$@"; }
echo_ok() {
    local out
    out=$(TMO=20 c echo-client "$1" "${2:-7}" 2>&1) && return 0
    say "    $out"
    return 1
}
is_active() { [ "$(c systemctl is-active "$1")" = active ]; }
main_pid() { prop echod.service MainPID; }

# --- 1. Start: returns only once echod is ready ---------------------------------

t=$(date +%s.%N)
if TMO=60 c systemctl start echod.service; then
    st=$(c systemctl is-active echod.service)
    if [ "$st" = active ]; then
        pass "systemctl start echod returned after READY=1, is-active=active ($(elapsed "$t"))"
    else
        fail "systemctl start echod returned, but is-active=$st (Type=notify should wait for READY=1)"
    fi
else
    fail "systemctl start echod ($(elapsed "$t"))"
    c systemctl status --no-pager -l echod.service | sed 's/^/    /'
    journal -u echod.service | tail -20 | sed 's/^/    /'
    exit 1
fi
MAIN=$(main_pid)
is_pid "$MAIN" || die "no MainPID after start ($MAIN)"
say "    MainPID=$MAIN StatusText=\"$(prop echod.service StatusText)\""

# --- 2. Echo on port 7, IPv4 and IPv6 -----------------------------------------------

check "echo on 127.0.0.1:7" echo_ok 127.0.0.1
if c sh -c 'ip -6 addr show dev lo | grep -q "inet6 ::1"'; then
    check "echo on [::1]:7" echo_ok ::1
else
    say "    (no IPv6 on the container's loopback: [::1]:7 not checked)"
fi

# --- 3. Unprivileged, sandboxed, named processes ------------------------------------

WORKER_PIDS=$(workers_of "$MAIN" | sort -n)
nworkers=$(echo "$WORKER_PIDS" | grep -c .)
ok=1
for p in $MAIN $WORKER_PIDS; do
    uid=$(status_of "$p" Uid)
    # Uid: real effective saved filesystem: all four non-zero.
    if echo "$uid" | awk '{ for (i = 1; i <= NF; i++) if ($i == 0) exit 1 }'; then :; else
        say "    pid $p ($(comm_of "$p")) runs as uid $uid"
        ok=0
    fi
done
[ "$nworkers" -eq "$WORKERS" ] || {
    say "    $nworkers workers, expected $WORKERS"
    ok=0
}
check "master and $nworkers workers run unprivileged (uid $(status_of "$MAIN" Uid | awk '{ print $1 }'))" [ $ok = 1 ]

ok=1
[ "$(comm_of "$MAIN")" = echod-master ] || { say "    master comm is '$(comm_of "$MAIN")'"; ok=0; }
for p in $WORKER_PIDS; do
    [ "$(comm_of "$p")" = echod-worker ] || { say "    worker $p comm is '$(comm_of "$p")'"; ok=0; }
done
check "process names: echod-master, echod-worker" [ $ok = 1 ]

# sched_policy = "batch" under the unit's SystemCallFilter=: each worker runs
# SCHED_BATCH (3, field 41 of /proc/PID/stat), the master SCHED_OTHER (0).
policy_of() { c sed 's/.*) //' "/proc/$1/stat" | awk '{ print $39 }'; }
if [ "$STAND_IN" = 1 ]; then
    say "SKIP: the stand-in does not set a scheduling policy"
else
    ok=1
    [ "$(policy_of "$MAIN")" = 0 ] || { say "    master policy is $(policy_of "$MAIN")"; ok=0; }
    for p in $WORKER_PIDS; do
        [ "$(policy_of "$p")" = 3 ] || { say "    worker $p policy is $(policy_of "$p")"; ok=0; }
    done
    check "sched_policy = \"batch\": workers SCHED_BATCH under the seccomp filter" [ $ok = 1 ]
fi

# The sandbox is in force: seccomp filter, no_new_privs, and no capability
# but CAP_NET_BIND_SERVICE (bit 10) even in the bounding set.
ok=1
for k in NoNewPrivs:1 Seccomp:2 CapBnd:0000000000000400 CapEff:0000000000000400; do
    v=$(status_of "$MAIN" "${k%%:*}")
    [ "$v" = "${k#*:}" ] || { say "    master ${k%%:*} is $v, expected ${k#*:}"; ok=0; }
done
check "sandbox enforced: NoNewPrivs, seccomp, only CAP_NET_BIND_SERVICE" [ $ok = 1 ]
say "    open-files limit: $(c awk '/^Max open files/ { print $4 " soft, " $5 " hard" }' "/proc/$MAIN/limits") (LimitNOFILE=65536; clamped where systemd lacks CAP_SYS_RESOURCE)"

# --- 4. Journal: priorities parsed from the <N> prefixes ---------------------------

# has_line ARGS...: the journal (ARGS select) has a line matching $MATCH.
# (grep reads all of it: with pipefail, `grep -q` could fail the pipeline by
# SIGPIPE-ing journalctl.)
has_line() { journal "$@" -o verbose | grep -e "$MATCH" >/dev/null; }
MATCH='PRIORITY=6' check "journal: info lines stored with PRIORITY=6" \
    wait_for 5 has_line -u echod.service -p info..info
MATCH='MESSAGE=.*listening on' check "journal: 'listening on' (or socket) line at info" \
    wait_for 5 has_line -u echod.service -p info..info
if journal -u echod.service -o cat | grep '^<[0-7]>' >/dev/null; then
    fail "journal: raw <N> prefixes stored in MESSAGE"
    journal -u echod.service -o cat | grep '^<[0-7]>' | head -3 | sed 's/^/    /'
else
    pass "journal: no raw <N> prefixes left in messages"
fi

# --- 5. Reload: same master, new generation of workers ------------------------------

c sed -i "s/^workers = $WORKERS/workers = $((WORKERS + 1))/" /etc/echod.toml
t=$(date +%s.%N)
if TMO=30 c systemctl reload echod.service; then
    pass "systemctl reload echod ($(elapsed "$t"))"
else
    fail "systemctl reload echod"
fi
new_generation() {
    local now
    now=$(workers_of "$MAIN" | sort -n)
    [ "$(echo "$now" | grep -c .)" -eq $((WORKERS + 1)) ] || return 1
    # No worker of the old generation is left.
    [ -z "$(comm -12 <(echo "$now") <(echo "$WORKER_PIDS"))" ]
}
check "reload: MainPID unchanged ($MAIN)" [ "$(main_pid)" = "$MAIN" ]
if wait_for 10 new_generation; then
    pass "reload: every worker replaced, $((WORKERS + 1)) new workers"
else
    fail "reload: workers not replaced: before [$(echo "$WORKER_PIDS" | tr '\n' ' ')] after [$(workers_of "$MAIN" | tr '\n' ' ')]"
fi
MATCH='reload: generation 2' check "journal: shows the reload (generation 2)" \
    wait_for 5 has_line -u echod.service
check "active after reload" is_active echod.service
check "echo after reload" echo_ok 127.0.0.1
WORKER_PIDS=$(workers_of "$MAIN" | sort -n)

# --- 6. A bad config at reload: logged at err, old config kept ----------------------

c sed -i 's/^workers = .*/workers = "lots"/' /etc/echod.toml
TMO=30 c systemctl reload echod.service
MATCH='PRIORITY=3' check "journal: bad-config reload logged with PRIORITY=3" \
    wait_for 5 has_line -u echod.service -p err..err
say "    $(journal -u echod.service -p err..err -o cat | tail -1)"
check "bad reload: still active, same MainPID" \
    [ "$(c systemctl is-active echod.service) $(main_pid)" = "active $MAIN" ]
check "bad reload: the old workers still serve" \
    equals "$(workers_of "$MAIN" | sort -n | tr '\n' ' ')" "$(echo "$WORKER_PIDS" | tr '\n' ' ')"
check "echo after bad reload" echo_ok 127.0.0.1

# Fork mode under the same sandbox: one child per connection.
c sed -i -e "s/^workers = .*/workers = $WORKERS/" -e 's/^#mode = .*/mode = "fork"/' /etc/echod.toml
TMO=30 c systemctl reload echod.service
fork_mode() { [ -z "$(workers_of "$MAIN")" ]; }
if [ "$STAND_IN" = 1 ]; then
    say "    (the stand-in has no fork mode: not checked)"
else
    check "reload to mode = \"fork\": the prefork workers retire" wait_for 10 fork_mode
    check "echo in fork mode" echo_ok 127.0.0.1
fi
c sed -i 's/^mode = "fork"/#mode = "prefork"/' /etc/echod.toml
TMO=30 c systemctl reload echod.service
has_workers() { [ "$(workers_of "$MAIN" | grep -c .)" -eq "$WORKERS" ]; }
check "reload back to prefork: $WORKERS workers" wait_for 10 has_workers

# --- 7. kill -9 of the master: Restart= brings it back, no orphans ------------------

MAIN=$(main_pid)
is_pid "$MAIN" || die "no MainPID before kill -9"
restarts=$(prop echod.service NRestarts)
c kill -KILL "$MAIN"
t=$(date +%s.%N)
restarted() {
    local m
    m=$(main_pid)
    is_pid "$m" && [ "$m" != "$MAIN" ] && is_active echod.service
}
if wait_for 20 restarted; then
    pass "kill -9 master: restarted, new MainPID $(main_pid) (was $MAIN), NRestarts $restarts -> $(prop echod.service NRestarts) ($(elapsed "$t"))"
else
    fail "kill -9 master: not restarted (MainPID $(main_pid), $(c systemctl is-active echod.service))"
fi
MAIN=$(main_pid)
only_new_tree() {
    local p
    for p in $(unit_pids); do
        [ "$p" = "$MAIN" ] || [ "$(ppid_of "$p")" = "$MAIN" ] || return 1
    done
}
if wait_for 10 only_new_tree; then
    pass "no orphans: the cgroup holds only the new master and its $(workers_of "$MAIN" | grep -c .) workers"
else
    fail "orphans in the cgroup: $(for p in $(unit_pids); do printf '%s(%s, ppid %s) ' "$p" "$(comm_of "$p")" "$(ppid_of "$p")"; done)"
fi
check "echo after restart" echo_ok 127.0.0.1

# --- 8. Stop: graceful, cgroup empty ---------------------------------------------------
# One idle client stays connected: a graceful stop waits for it up to
# shutdown_timeout (3 s here), then kills its worker, all within
# TimeoutStopSec= (40 s), so the stop still ends in success.

TMO=20 c python3 -c 'import socket
s = socket.create_connection(("127.0.0.1", 7), timeout=5)
s.sendall(b"x"); s.recv(1); s.settimeout(15)
while s.recv(1): pass' 2>/dev/null &
HOLD=$!
wait_for 5 c sh -c 'ss -Htn state established "( sport = :7 )" | grep -q .' ||
    say "    (the idle client did not connect)"
since=$(c date '+%Y-%m-%d %H:%M:%S')
t=$(date +%s.%N)
if TMO=60 c systemctl stop echod.service; then
    took=$(elapsed "$t")
    pass "systemctl stop echod with an idle client connected ($took)"
    if [ "$STAND_IN" = 1 ]; then
        say "    (the stand-in does not drain: drain time not checked)"
    else
        check "stop drained for shutdown_timeout (3s) before killing: took $took" \
            awk -v t="${took%s}" 'BEGIN { exit !(t >= 2.5 && t < 40) }'
    fi
else
    fail "systemctl stop echod"
fi
is_pid "$HOLD" && kill "$HOLD" 2>/dev/null
wait "$HOLD" 2>/dev/null
check "inactive after stop" equals "$(c systemctl is-active echod.service)" inactive
check "cgroup empty after stop" equals "$(unit_pids | tr '\n' ' ')" ""
MATCH='graceful stop' check "journal: the master stopped gracefully (SIGTERM to it alone)" \
    wait_for 5 has_line -u echod.service --since "$since"
result=$(prop echod.service Result)
check "stop result is success ($result)" [ "$result" = success ]

# --- 9. Socket activation --------------------------------------------------------------

since=$(c date '+%Y-%m-%d %H:%M:%S')
if TMO=30 c systemctl start echod.socket && is_active echod.socket; then
    pass "systemctl start echod.socket"
else
    fail "systemctl start echod.socket"
    journal -u echod.socket | tail -5 | sed 's/^/    /'
fi
check "echod.service not started before a connection" \
    equals "$(c systemctl is-active echod.service)" inactive
t=$(date +%s.%N)
check "socket activation: first connection starts echod and is echoed" echo_ok 127.0.0.1
# The first connection may be served before the master sends READY=1 (the
# workers run a moment before it does), so allow "activating" a moment.
check "socket activation: echod.service active" wait_for 5 is_active echod.service
if c sh -c 'ip -6 addr show dev lo | grep -q "inet6 ::1"'; then
    check "socket activation: echo on [::1]:7" echo_ok ::1
fi
MATCH='sockets from systemd' check "journal: echod uses the sockets from systemd" \
    wait_for 5 has_line -u echod.service --since "$since"
TMO=60 c systemctl stop echod.socket echod.service
check "stop socket + service: both inactive, cgroup empty" equals \
    "$(c systemctl is-active echod.socket echod.service | tr '\n' ' ')/$(unit_pids | tr '\n' ' ')" \
    "inactive inactive /"

# --- Summary ---------------------------------------------------------------------

journal -u echod.service -o short-monotonic >"$WORK/journal.log" 2>&1
if [ $FAILS -gt 0 ]; then
    say "---- journalctl -u echod (last 40 lines)"
    tail -40 "$WORK/journal.log"
fi
say "nspawn test: $PASSES passed, $FAILS failed ($(elapsed "$T0"))"
[ $FAILS -eq 0 ]
