#!/usr/bin/env bash
# scripts/bench.sh -- `make bench`: echod against a tokio reference server,
# the same loads on the same machine, alternating, several rounds; prints a
# Markdown table of the medians and the ratio echod / reference.
#
# Starts, per round: echod in prefork mode (workers = nproc), echod in fork
# mode (for the connection-rate load only), echod with the io_uring worker
# (after the other two, every round), echod with busy_poll = "50us" (for
# two ping-pong loads only), echod with balance = false (ping-pong x50 and
# stream only, the loads where placement shows), echod with splice = false
# (stream only, the load that splices), echod with sched_policy = "other"
# (the ping-pong loads side by side only) and examples/tokio_echo.rs, each on
# 127.0.0.1:0 (the port is read from its log). Then, side by side, the
# CPU loads run against echod and the reference at the same moment (two
# echod-bench processes started together), so that both servers see the same
# machine: the ratio of each such pair is kept, and the table gives the
# median of those ratios. Every process it starts is
# stopped by PID on exit (trap): SIGINT to echod (fast stop), SIGTERM to the
# reference, SIGKILL to whatever of their process trees is left after 10 s.
# Never pkill/killall.
#
# Environment (defaults in brackets):
#   ROUNDS [3]      rounds; each runs every load against every server
#   DURATION [5]    measured seconds per load
#   WARMUP [1]      warm-up seconds per load
#   HOLD [10000]    connections in the hold load
#   HOLD_IDLE [2]   seconds the hold connections stay idle
#   THREADS [nproc] echod-bench client threads
#   PAIRS [2]       side-by-side repeats of each load per round
#   BENCH_OUT [$CARGO_TARGET_DIR/bench or target/bench]
#                   where results.jsonl (every run) and table.md are kept
#   NO_BUILD        set to skip `cargo build`
#
# Exit status: 0 when every load ran clean against every server, 1 otherwise
# (the table is printed either way).

set -euo pipefail

cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
WARMUP=${WARMUP:-1}
HOLD=${HOLD:-10000}
HOLD_IDLE=${HOLD_IDLE:-2}
THREADS=${THREADS:-$(nproc)}
PAIRS=${PAIRS:-2}
target=${CARGO_TARGET_DIR:-target}
out=${BENCH_OUT:-$target/bench}

started_at=$SECONDS

if [ -z "${NO_BUILD:-}" ]; then
    cargo build --release --bins --example tokio_echo
fi
bench=$target/release/echod-bench
echod=$target/release/echod
reference=$target/release/examples/tokio_echo
for bin in "$bench" "$echod" "$reference"; do
    [ -x "$bin" ] || { echo "bench: $bin is missing; build failed?" >&2; exit 1; }
done

# The hold load needs one descriptor per connection, in the client and in
# the server; raise the soft limit to the hard one for both.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

tmp=$(mktemp -d "${TMPDIR:-/tmp}/echod-bench.XXXXXX")
mkdir -p "$out"
results=$out/results.jsonl
: >"$results"
failures=0

# --- Process handling ---------------------------------------------------------

# The PIDs of the servers this script started and has not stopped yet.
live_pids=()

# The PIDs of the process tree under $1, from the ppid field of every
# /proc/PID/stat (which needs no CONFIG_PROC_CHILDREN); $1 first.
tree_pids() {
    local f line ppid pid rest queue=("$1") p c
    local -A kids=()
    for f in /proc/[0-9]*/stat; do
        { read -r line <"$f"; } 2>/dev/null || continue
        rest=${line##*) } # the fields after the command name
        read -r _ ppid _ <<<"$rest"
        pid=${f#/proc/}
        kids[$ppid]+=" ${pid%/stat}"
    done
    while ((${#queue[@]})); do
        p=${queue[0]}
        queue=("${queue[@]:1}")
        echo "$p"
        for c in ${kids[$p]:-}; do
            queue+=("$c")
        done
    done
}

# stop_server PID SIGNAL: asks politely, waits up to 10 s, then kills what is
# left of the tree by PID.
stop_server() {
    local pid=$1 sig=$2 tree i
    tree=$(tree_pids "$pid")
    kill -s "$sig" "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    for p in $tree; do
        kill -s KILL "$p" 2>/dev/null || true
    done
    wait "$pid" 2>/dev/null || true
    local keep=()
    for p in "${live_pids[@]}"; do
        [ "$p" = "$pid" ] || keep+=("$p")
    done
    live_pids=("${keep[@]+"${keep[@]}"}")
}

# The PIDs of echod-bench clients running in the background (side by side).
client_pids=()

cleanup() {
    local pid
    for pid in "${client_pids[@]+"${client_pids[@]}"}"; do
        kill -s KILL "$pid" 2>/dev/null || true
    done
    for pid in "${live_pids[@]+"${live_pids[@]}"}"; do
        stop_server "$pid" INT
    done
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start_server NAME CMD...: starts CMD with its output in $tmp/NAME.log and
# sets server_pid and server_port (parsed from "listening on 127.0.0.1:PORT").
# Returns 1 when the server dies or reports no port within 20 s.
start_server() {
    local name=$1 log=$tmp/$1-round$round.log i
    shift
    # Created before the start, so no old content is ever read as the port.
    : >"$log"
    "$@" >>"$log" 2>&1 &
    server_pid=$!
    live_pids+=("$server_pid")
    server_port=
    for ((i = 0; i < 200; i++)); do
        server_port=$(sed -n 's/.*listening on 127\.0\.0\.1:\([0-9][0-9]*\).*/\1/p' "$log" | head -n 1)
        [ -n "$server_port" ] && break
        if ! kill -0 "$server_pid" 2>/dev/null; then
            break
        fi
        sleep 0.1
    done
    if [ -z "$server_port" ]; then
        echo "bench: $name did not start; its log:" >&2
        sed 's/^/    /' "$log" >&2
        stop_server "$server_pid" KILL
        return 1
    fi
    # echod logs "ready" once its workers run; wait for it (bounded) so the
    # hold load's memory baseline includes them.
    for ((i = 0; i < 50; i++)); do
        grep -q 'ready' "$log" && break
        case $name in echod*) ;; *) break ;; esac
        sleep 0.1
    done
}

# launch PREFIX NAME COMMAND...: start_server, then PREFIX_pid and
# PREFIX_port name the server; if it did not start, PREFIX_port stays empty
# (every load against it is skipped) and the failure is counted.
launch() {
    local prefix=$1
    shift
    if start_server "$@"; then
        printf -v "${prefix}_pid" %s "$server_pid"
        printf -v "${prefix}_port" %s "$server_port"
    else
        failures=$((failures + 1))
    fi
}

echod_config() { # MODE [IO] [BUSY_POLL] [BALANCE] [SPLICE] [SCHED] -> path of a config file
    local file=$tmp/echod-$1-${2:-epoll}-${3:-0s}-${4:-true}-${5:-true}-${6:-auto}.toml
    cat >"$file" <<EOF
listen = ["127.0.0.1:0"]
mode = "$1"
io = "${2:-epoll}"
busy_poll = "${3:-0s}"
balance = ${4:-true}
splice = ${5:-true}
sched_policy = "${6:-auto}"
workers = $(nproc)
# The hold load keeps $HOLD connections open at once.
max_connections = $((HOLD + 1000))
[log]
target = "stderr"
level = "info"
EOF
    echo "$file"
}

# --- Loads --------------------------------------------------------------------

# field JSON KEY: the raw value of KEY in echod-bench's flat JSON object.
field() {
    sed -n "s/.*\"$2\":\"\{0,1\}\([^,\"}]*\).*/\1/p" <<<"$1"
}

# stalls JSON: says so when the client was not run for a while (the machine
# froze or was overloaded): that run's figures are suspect for both servers.
stalls() {
    local n
    n=$(field "$1" client_stalls)
    if [ -n "$n" ] && [ "$n" != null ] && [ "$n" -gt 0 ]; then
        echo "bench: round $round: the client was not run for up to $(field "$1" client_stall_max_s) s ($n times)" >&2
    fi
}

# measure LOAD SERVER PORT PID ARGS...: runs echod-bench, keeps its JSON.
measure() {
    local load=$1 server=$2 port=$3 pid=$4 json rc=0
    shift 4
    json=$("$bench" "$@" -a "127.0.0.1:$port" --server-pid "$pid" --json) || rc=$?
    printf '{"round":%d,"load":"%s","server":"%s","rc":%d,"result":%s}\n' \
        "$round" "$load" "$server" "$rc" "${json:-null}" >>"$results"
    if [ "$rc" -ne 0 ]; then
        failures=$((failures + 1))
        echo "bench: round $round: $load against $server failed (exit $rc): $(field "$json" first_error)" >&2
    fi
    stalls "$json"
    printf '  %-13s %-12s %s\n' "$load" "$server" \
        "$(field "$json" msgs_per_s) msgs/s  $(field "$json" mb_per_s) MB/s  p99 $(field "$json" rtt_p99_us) us  cpu $(field "$json" server_cpu_us_per_msg) us/msg  held $(field "$json" held)" >&2
}

timed=(-d "$DURATION" --warmup "$WARMUP" -t "$THREADS")

# run_loads SERVER PORT PID: every load but connrate and hold.
run_loads() {
    local s=$1 port=$2 pid=$3
    measure pingpong50 "$s" "$port" "$pid" pingpong -c 50 -l 64 "${timed[@]}"
    measure pingpong500 "$s" "$port" "$pid" pingpong -c 500 -l 64 "${timed[@]}"
    measure pingpong1 "$s" "$port" "$pid" pingpong -c 1 -l 64 "${timed[@]}"
    measure stream "$s" "$port" "$pid" stream -c 4 -l 65536 "${timed[@]}"
}

# Side by side: half the client threads for each of the two servers.
pair_threads=$(((THREADS + 1) / 2))
paired=(-d "$DURATION" --warmup "$WARMUP" -t "$pair_threads")

# measure_pair LOAD SERVER PORT PID ARGS...: runs the same echod-bench load
# against SERVER and the reference at the same moment and keeps both JSONs,
# marked with the pair they belong to ("pair":SERVER) and its repeat within
# the round ("repeat":N, from $repeat), as load "pair-LOAD".
measure_pair() {
    local load=$1 server=$2 port=$3 pid=$4 e t erc=0 trc=0 json s rc
    shift 4
    "$bench" "$@" -a "127.0.0.1:$port" --server-pid "$pid" --json >"$tmp/pair-e.json" &
    e=$!
    "$bench" "$@" -a "127.0.0.1:$ref_port" --server-pid "$ref_pid" --json >"$tmp/pair-t.json" &
    t=$!
    client_pids=("$e" "$t")
    wait "$e" || erc=$?
    wait "$t" || trc=$?
    client_pids=()
    local beside
    for s in "$server" tokio; do
        if [ "$s" = tokio ]; then
            json=$(cat "$tmp/pair-t.json") rc=$trc beside=$server
        else
            json=$(cat "$tmp/pair-e.json") rc=$erc beside=tokio
        fi
        printf '{"round":%d,"repeat":%d,"load":"pair-%s","server":"%s","pair":"%s","rc":%d,"result":%s}\n' \
            "$round" "$repeat" "$load" "$s" "$server" "$rc" "${json:-null}" >>"$results"
        if [ "$rc" -ne 0 ]; then
            failures=$((failures + 1))
            echo "bench: round $round: $load beside $server, against $s, failed (exit $rc): $(field "$json" first_error)" >&2
        fi
        stalls "$json"
        printf '  %-13s %-12s %s\n' "$load" "$s" \
            "(beside $beside) $(field "$json" msgs_per_s) msgs/s  $(field "$json" mb_per_s) MB/s  p99 $(field "$json" rtt_p99_us) us  cpu $(field "$json" server_cpu_us_per_msg) us/msg" >&2
    done
}

# run_pairs SERVER PORT PID [placement|stream|pingpong]: the side-by-side
# loads, $PAIRS times; with "placement", only the two where placement shows;
# with "stream", the stream alone; with "pingpong", the three ping-pong loads.
run_pairs() {
    local s=$1 port=$2 pid=$3 all=${4:-all}
    [ -n "$ref_port" ] || return 0
    for ((repeat = 1; repeat <= PAIRS; repeat++)); do
        [ "$all" = stream ] || measure_pair pingpong50 "$s" "$port" "$pid" pingpong -c 50 -l 64 "${paired[@]}"
        if [ "$all" = all ] || [ "$all" = pingpong ]; then
            measure_pair pingpong500 "$s" "$port" "$pid" pingpong -c 500 -l 64 "${paired[@]}"
            measure_pair pingpong1 "$s" "$port" "$pid" pingpong -c 1 -l 64 "${paired[@]}"
        fi
        [ "$all" = pingpong ] || measure_pair stream "$s" "$port" "$pid" stream -c 4 -l 65536 "${paired[@]}"
    done
}

echo "bench: $(nproc) CPUs, $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1), Linux $(uname -r)" >&2
echo "bench: $ROUNDS rounds, ${DURATION} s per load after ${WARMUP} s warm-up, $THREADS client threads" >&2

for ((round = 1; round <= ROUNDS; round++)); do
    echo "bench: round $round of $ROUNDS" >&2
    pre_port='' ref_port='' fork_port='' uring_port='' busy_port='' unbal_port='' plain_port='' other_port=''
    launch pre echod-prefork "$echod" --config "$(echod_config prefork)"
    launch ref tokio "$reference" 127.0.0.1:0
    launch fork echod-fork "$echod" --config "$(echod_config fork)"
    # The io_uring worker, measured beside the epoll one.
    launch uring echod-uring "$echod" --config "$(echod_config prefork io_uring)"
    # Busy polling, measured where it is meant to help (one connection) and
    # where it costs (many connections on CPUs shared with the client).
    launch busy echod-busy "$echod" --config "$(echod_config prefork epoll 50us)"
    # Without accept balancing: the kernel alone places the connections.
    launch unbal echod-unbal "$echod" --config "$(echod_config prefork epoll 0s false)"
    # Without splice: large messages read and written like small ones.
    launch plain echod-nosplice "$echod" --config "$(echod_config prefork epoll 0s true false)"
    # Wake-up preemption kept: every worker SCHED_OTHER whatever its load.
    launch other echod-other "$echod" --config "$(echod_config prefork epoll 0s true true other)"

    # Alternate which server goes first, so neither always runs on a machine
    # warmed (or tired) by the other.
    if ((round % 2)); then order=(echod tokio); else order=(tokio echod); fi
    # Hold first, while both servers are fresh: memory growth per connection
    # is measured from a server that has not held connections before.
    for s in "${order[@]}"; do
        if [ "$s" = echod ] && [ -n "$pre_port" ]; then
            measure hold echod "$pre_port" "$pre_pid" hold -n "$HOLD" -d "$HOLD_IDLE" -t "$THREADS"
        elif [ "$s" = tokio ] && [ -n "$ref_port" ]; then
            measure hold tokio "$ref_port" "$ref_pid" hold -n "$HOLD" -d "$HOLD_IDLE" -t "$THREADS"
        fi
    done
    for s in "${order[@]}" uring busy unbal plain; do
        if [ "$s" = plain ]; then
            [ -z "$plain_port" ] || measure stream echod-nosplice "$plain_port" "$plain_pid" stream -c 4 -l 65536 "${timed[@]}"
        elif [ "$s" = unbal ]; then
            [ -z "$unbal_port" ] || {
                measure pingpong50 echod-unbal "$unbal_port" "$unbal_pid" pingpong -c 50 -l 64 "${timed[@]}"
                measure stream echod-unbal "$unbal_port" "$unbal_pid" stream -c 4 -l 65536 "${timed[@]}"
            }
        elif [ "$s" = uring ]; then
            [ -z "$uring_port" ] || run_loads echod-uring "$uring_port" "$uring_pid"
        elif [ "$s" = busy ]; then
            [ -z "$busy_port" ] || {
                measure pingpong1 echod-busy "$busy_port" "$busy_pid" pingpong -c 1 -l 64 "${timed[@]}"
                measure pingpong50 echod-busy "$busy_port" "$busy_pid" pingpong -c 50 -l 64 "${timed[@]}"
            }
        elif [ "$s" = echod ] && [ -n "$pre_port" ]; then
            run_loads echod "$pre_port" "$pre_pid"
        elif [ "$s" = tokio ] && [ -n "$ref_port" ]; then
            run_loads tokio "$ref_port" "$ref_pid"
        fi
    done
    for s in "${order[@]}" uring fork; do
        case $s in
        uring) [ -z "$uring_port" ] || measure connrate echod-uring "$uring_port" "$uring_pid" connrate -c 8 -l 64 "${timed[@]}" ;;
        echod) [ -z "$pre_port" ] || measure connrate echod "$pre_port" "$pre_pid" connrate -c 8 -l 64 "${timed[@]}" ;;
        tokio) [ -z "$ref_port" ] || measure connrate tokio "$ref_port" "$ref_pid" connrate -c 8 -l 64 "${timed[@]}" ;;
        fork) [ -z "$fork_port" ] || measure connrate echod-fork "$fork_port" "$fork_pid" connrate -c 8 -l 64 "${timed[@]}" ;;
        esac
    done

    # Side by side, last: echod (epoll), then echod (io_uring), then echod
    # without balancing, then without splice, then with sched_policy =
    # "other", each beside the reference.
    [ -z "$pre_port" ] || run_pairs echod "$pre_port" "$pre_pid"
    [ -z "$uring_port" ] || run_pairs echod-uring "$uring_port" "$uring_pid"
    [ -z "$unbal_port" ] || run_pairs echod-unbal "$unbal_port" "$unbal_pid" placement
    [ -z "$plain_port" ] || run_pairs echod-nosplice "$plain_port" "$plain_pid" stream
    [ -z "$other_port" ] || run_pairs echod-other "$other_port" "$other_pid" pingpong

    [ -z "$pre_port" ] || stop_server "$pre_pid" INT
    [ -z "$fork_port" ] || stop_server "$fork_pid" INT
    [ -z "$uring_port" ] || stop_server "$uring_pid" INT
    [ -z "$busy_port" ] || stop_server "$busy_pid" INT
    [ -z "$unbal_port" ] || stop_server "$unbal_pid" INT
    [ -z "$plain_port" ] || stop_server "$plain_pid" INT
    [ -z "$other_port" ] || stop_server "$other_pid" INT
    [ -z "$ref_port" ] || stop_server "$ref_pid" TERM
done

# --- The table ----------------------------------------------------------------

# summary VALUE...: "MEDIAN MIN MAX" of the non-empty values, or "n/a".
summary() {
    printf '%s\n' "$@" | sed '/^$/d' | sort -g | awk '
        { v[NR] = $1 }
        END {
            if (NR == 0) { print "n/a"; exit }
            m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
            print m, v[1], v[NR]
        }'
}

# median LOAD SERVER KEY: "MEDIAN MIN MAX" of KEY over the clean runs, or
# "n/a".
median() {
    local line json values=()
    while IFS= read -r line; do
        case $line in *"\"load\":\"$1\",\"server\":\"$2\",\"rc\":0,"*) ;; *) continue ;; esac
        json=${line#*\"result\":}
        local v
        v=$(field "$json" "$3")
        [ -n "$v" ] && [ "$v" != null ] && values+=("$v")
    done <"$results"
    summary "${values[@]+"${values[@]}"}"
}

# fmt "MEDIAN MIN MAX" DECIMALS: the median, and the range when there is one.
fmt() {
    local m lo hi
    read -r m lo hi <<<"$1"
    if [ "$m" = n/a ]; then
        echo n/a
    elif [ "$lo" = "$hi" ]; then
        printf "%.${2}f" "$m"
    else
        printf "%.${2}f (%.${2}f-%.${2}f)" "$m" "$lo" "$hi"
    fi
}

# ratio "MEDIAN MIN MAX" "MEDIAN MIN MAX": the ratio of the medians.
ratio() {
    local a=${1%% *} b=${2%% *}
    if [ "$a" = n/a ] || [ "$b" = n/a ]; then
        echo n/a
    else
        awk -v a="$a" -v b="$b" 'BEGIN { if (b == 0) print "n/a"; else printf "%.2f", a / b }'
    fi
}

# row LABEL METRIC BETTER LOAD KEY DECIMALS [ECHOD_SERVER]
row() {
    local e t
    e=$(median "$4" "${7:-echod}" "$5")
    t=$(median "$4" tokio "$5")
    printf '| %s | %s | %s | %s | %s | %s |\n' "$1" "$2" "$(fmt "$e" "$6")" "$(fmt "$t" "$6")" "$(ratio "$e" "$t")" "$3"
}

# pair_ratio LOAD SERVER KEY: "MEDIAN MIN MAX" over the pairs (rounds and
# repeats) of the ratio SERVER / reference of KEY, each ratio taken from one
# side-by-side pair (the same moment), or "n/a".
pair_ratio() {
    local line json v r rep values=()
    local -A mine=() theirs=()
    while IFS= read -r line; do
        case $line in *"\"load\":\"pair-$1\","*"\"pair\":\"$2\",\"rc\":0,"*) ;; *) continue ;; esac
        r=${line#*\"round\":}
        rep=${line#*\"repeat\":}
        r=${r%%,*}.${rep%%,*}
        json=${line#*\"result\":}
        v=$(field "$json" "$3")
        if [ -z "$v" ] || [ "$v" = null ]; then continue; fi
        case $line in
        *"\"server\":\"tokio\","*) theirs[$r]=$v ;;
        *) mine[$r]=$v ;;
        esac
    done <"$results"
    for r in "${!mine[@]}"; do
        [ -n "${theirs[$r]:-}" ] || continue
        values+=("$(awk -v a="${mine[$r]}" -v b="${theirs[$r]}" 'BEGIN { if (b > 0) printf "%.4f", a / b }')")
    done
    summary "${values[@]+"${values[@]}"}"
}

# pair_row LABEL METRIC BETTER LOAD KEY
pair_row() {
    printf '| %s | %s | %s | %s | %s | %s | %s | %s |\n' "$1" "$2" \
        "$(fmt "$(pair_ratio "$4" echod "$5")" 2)" "$(fmt "$(pair_ratio "$4" echod-uring "$5")" 2)" \
        "$(fmt "$(pair_ratio "$4" echod-unbal "$5")" 2)" "$(fmt "$(pair_ratio "$4" echod-nosplice "$5")" 2)" \
        "$(fmt "$(pair_ratio "$4" echod-other "$5")" 2)" "$3"
}

table=$out/table.md
{
    echo "| load | metric | echod | tokio reference | echod / reference | better |"
    echo "| --- | --- | ---: | ---: | ---: | --- |"
    row "pingpong 64 B x 50 conns" "msgs/s" higher pingpong50 msgs_per_s 0
    row "pingpong 64 B x 50 conns" "server CPU us/msg" lower pingpong50 server_cpu_us_per_msg 2
    row "pingpong 64 B x 50 conns" "server context switches/msg" lower pingpong50 server_switches_per_msg 3
    row "pingpong 64 B x 500 conns" "msgs/s" higher pingpong500 msgs_per_s 0
    row "pingpong 64 B x 500 conns" "server CPU us/msg" lower pingpong500 server_cpu_us_per_msg 2
    row "pingpong 64 B x 1 conn" "p50 us" lower pingpong1 rtt_p50_us 1
    row "pingpong 64 B x 1 conn" "p99 us" lower pingpong1 rtt_p99_us 1
    row "pingpong 64 B x 1 conn" "server CPU us/msg" lower pingpong1 server_cpu_us_per_msg 2
    row "pingpong 64 B x 1 conn" "server context switches/msg" lower pingpong1 server_switches_per_msg 3
    row "stream 4 conns x 64 KiB" "MB/s" higher stream mb_per_s 0
    row "stream 4 conns x 64 KiB" "server CPU s/GB" lower stream server_cpu_s_per_gb 3
    row "connrate 8 workers (prefork)" "conn/s" higher connrate conns_per_s 0
    row "connrate 8 workers (prefork)" "server CPU us/conn" lower connrate server_cpu_us_per_msg 1
    row "connrate 8 workers (fork mode)" "conn/s" higher connrate conns_per_s 0 echod-fork
    row "connrate 8 workers (fork mode)" "server CPU us/conn" lower connrate server_cpu_us_per_msg 1 echod-fork
    row "pingpong 64 B x 50 conns (io_uring)" "server CPU us/msg" lower pingpong50 server_cpu_us_per_msg 2 echod-uring
    row "pingpong 64 B x 500 conns (io_uring)" "server CPU us/msg" lower pingpong500 server_cpu_us_per_msg 2 echod-uring
    row "pingpong 64 B x 1 conn (io_uring)" "p99 us" lower pingpong1 rtt_p99_us 1 echod-uring
    row "stream 4 conns x 64 KiB (io_uring)" "MB/s" higher stream mb_per_s 0 echod-uring
    row "stream 4 conns x 64 KiB (io_uring)" "server CPU s/GB" lower stream server_cpu_s_per_gb 3 echod-uring
    row "connrate 8 workers (io_uring)" "conn/s" higher connrate conns_per_s 0 echod-uring
    row "pingpong 64 B x 1 conn (busy_poll 50us)" "p50 us" lower pingpong1 rtt_p50_us 1 echod-busy
    row "pingpong 64 B x 1 conn (busy_poll 50us)" "p99 us" lower pingpong1 rtt_p99_us 1 echod-busy
    row "pingpong 64 B x 1 conn (busy_poll 50us)" "server CPU us/msg" lower pingpong1 server_cpu_us_per_msg 2 echod-busy
    row "pingpong 64 B x 1 conn (busy_poll 50us)" "server context switches/msg" lower pingpong1 server_switches_per_msg 3 echod-busy
    row "pingpong 64 B x 50 conns (busy_poll 50us)" "server CPU us/msg" lower pingpong50 server_cpu_us_per_msg 2 echod-busy
    row "pingpong 64 B x 50 conns (balance = false)" "msgs/s" higher pingpong50 msgs_per_s 0 echod-unbal
    row "pingpong 64 B x 50 conns (balance = false)" "server CPU us/msg" lower pingpong50 server_cpu_us_per_msg 2 echod-unbal
    row "pingpong 64 B x 50 conns (balance = false)" "server context switches/msg" lower pingpong50 server_switches_per_msg 3 echod-unbal
    row "stream 4 conns x 64 KiB (balance = false)" "MB/s" higher stream mb_per_s 0 echod-unbal
    row "stream 4 conns x 64 KiB (balance = false)" "server CPU s/GB" lower stream server_cpu_s_per_gb 3 echod-unbal
    row "stream 4 conns x 64 KiB (splice = false)" "MB/s" higher stream mb_per_s 0 echod-nosplice
    row "stream 4 conns x 64 KiB (splice = false)" "server CPU s/GB" lower stream server_cpu_s_per_gb 3 echod-nosplice
    row "hold $HOLD idle conns" "server RSS KiB/conn" lower hold rss_kib_per_conn 2
    row "hold $HOLD idle conns" "server PSS KiB/conn" lower hold pss_kib_per_conn 2
    echo
    echo "Side by side (the load against echod and the reference at the same moment, $pair_threads client threads each, $PAIRS pairs per round): median (min-max) over the $((ROUNDS * PAIRS)) pairs of each pair's ratio echod / reference."
    echo
    echo "| load | metric | echod / reference | echod (io_uring) / reference | echod (balance = false) / reference | echod (splice = false) / reference | echod (sched_policy = \"other\") / reference | better |"
    echo "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"
    pair_row "pingpong 64 B x 50 conns" "msgs/s" higher pingpong50 msgs_per_s
    pair_row "pingpong 64 B x 50 conns" "server CPU us/msg" lower pingpong50 server_cpu_us_per_msg
    pair_row "pingpong 64 B x 500 conns" "msgs/s" higher pingpong500 msgs_per_s
    pair_row "pingpong 64 B x 500 conns" "server CPU us/msg" lower pingpong500 server_cpu_us_per_msg
    pair_row "pingpong 64 B x 1 conn" "p50 us" lower pingpong1 rtt_p50_us
    pair_row "pingpong 64 B x 1 conn" "p99 us" lower pingpong1 rtt_p99_us
    pair_row "stream 4 conns x 64 KiB" "MB/s" higher stream mb_per_s
    pair_row "stream 4 conns x 64 KiB" "server CPU s/GB" lower stream server_cpu_s_per_gb
} >"$table"

elapsed=$((SECONDS - started_at))
echo
echo "echod benchmark: $(nproc) CPUs ($(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)), Linux $(uname -r)"
echo "medians (and min-max) of $ROUNDS rounds, ${DURATION} s per load after ${WARMUP} s warm-up, $THREADS client threads; took ${elapsed} s"
echo
cat "$table"
echo
echo "raw results: $results; table: $table"
if [ "$failures" -ne 0 ]; then
    # The servers' logs go with the temporary directory: keep them.
    rm -rf "$out/logs"
    mkdir -p "$out/logs"
    cp "$tmp"/*.log "$out/logs/" 2>/dev/null || true
    echo "bench: $failures failed runs or servers (excluded from the medians); see above; the servers' logs are in $out/logs" >&2
    exit 1
fi
