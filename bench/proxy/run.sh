#!/usr/bin/env bash
# The proxy benchmark of issue #6: the resilient proxy example (every layer on)
# side by side with nginx and with no proxy at all, in the same run.
#
#   bench/proxy/run.sh                      # everything, ~3 minutes on 2 cores
#   CONFIGS="direct proxy-memory nginx" DURATION=15 ROUNDS=2 bench/proxy/run.sh
#
# Configurations (CONFIGS, in this order by default):
#   direct        client -> examples/sse_upstream
#   proxy-memory  client -> examples/proxy --store memory -> upstream
#   nginx         client -> nginx (proxy_buffering off, HTTP/1.1) -> upstream
#   proxy-redb    client -> examples/proxy --store redb:TMPFILE -> upstream
#   proxy-bare    client -> examples/proxy --bare (the same hyper server and
#                 upstream client, no tower-sse layer: the ceiling for the
#                 layered proxy)
#   proxy-hyper, proxy-bare-hyper  proxy-memory and proxy-bare with hyper's
#                 client to the upstream (--upstream-client hyper) instead of
#                 tower-sse-reconnect's lean Http1Client
#   proxy-without-LAYERS  proxy-memory with LAYERS (comma-separated: health,
#                 persist, dedup, track) left out: what a layer costs
#
# For each, with STREAMS concurrent streams (one connection each, a distinct
# path each, so a distinct stream key each):
#   1. memory: the middlebox's RSS (VmRSS; nginx: master + workers) with
#      STREAMS idle open streams minus its RSS with none, divided by STREAMS;
#   2. throughput: the upstream sends as fast as it is read (rate=max);
#      events/s delivered to the client over DURATION s after WARMUP s, and
#      the middlebox's CPU time per event over that window (utime+stime from
#      /proc, all threads; nginx: master + workers);
#   3. latency: the upstream sends RATE events/s per stream, each stamped with
#      its send time; p50/p99 of receive time minus send time over DURATION s.
#      "added" is the difference to `direct` in the same round.
# With ROUNDS > 1 each cell is the median over rounds.
#
# The upstream writes BATCH events per body chunk (a server flushing per
# event is BATCH=1) and bounds each connection's socket send buffer at SNDBUF
# bytes (0: the kernel's autotuning, up to net.ipv4.tcp_wmem's 4 MiB). With
# autotuning, an upstream on this host queues about 1 MB per stream behind a
# middlebox slower than itself, over 1 GB for 1,000 streams, and its own CPU
# per event rises 3-5x (copies into cold socket memory) on the cores the
# middlebox shares: a cost of the one-host set-up that only the slower
# middleboxes paid. SNDBUF applies to every configuration alike.
#
# Everything listens on 127.0.0.1 only; every process started here is stopped
# on exit. Needs: cargo, nginx (Debian: apt-get install -y nginx) for the nginx
# row (skipped with a note if missing). Writes bench/proxy/results.md.
set -euo pipefail

STREAMS=${STREAMS:-1000}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
RATE=${RATE:-10}
PAYLOAD=${PAYLOAD:-64}
SNDBUF=${SNDBUF:-262144}
BATCH=${BATCH:-32}
ROUNDS=${ROUNDS:-1}
CONFIGS=${CONFIGS:-"direct proxy-memory nginx proxy-bare proxy-redb"}
IDLE_SETTLE=${IDLE_SETTLE:-2}

cd "$(dirname "$0")/../.."
ROOT=$(pwd)
OUT="$ROOT/bench/proxy/results.md"

# 1,000 streams take ~2,000 descriptors in a proxy; raise the limit as far as allowed.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

log "building (cargo build --release --examples)"
cargo build --release --examples >&2
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
BIN="$TARGET_DIR/release/examples"
for b in sse_upstream sse_load proxy; do
    [[ -x "$BIN/$b" ]] || { echo "missing $BIN/$b" >&2; exit 1; }
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/tower-sse-bench.XXXXXX")
PIDS=()

stop_pid() { # pid: TERM, then KILL after 3 s
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || return 0
    for i in $(seq 30); do
        kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Waits for a line matching $2 in file $1 (at most $3 s); prints it.
wait_line() {
    local file=$1 pattern=$2 secs=${3:-30} i line
    for i in $(seq $((secs * 10))); do
        if line=$(grep -m1 -E "$pattern" "$file" 2>/dev/null); then
            echo "$line"
            return 0
        fi
        sleep 0.1
    done
    echo "timed out waiting for /$pattern/ in $file:" >&2
    tail -5 "$file" >&2
    return 1
}

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# A port below the ephemeral range (so no outgoing connection holds it) that nothing listens on.
free_port() {
    local p low
    low=$(awk '{print $1}' /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
    for _ in $(seq 100); do
        p=$((10000 + RANDOM % (low - 10000)))
        if port_free "$p"; then echo "$p"; return 0; fi
    done
    return 1
}

wait_port() {
    local i
    for i in $(seq 100); do
        port_free "$1" || return 0
        sleep 0.1
    done
    echo "nothing listens on 127.0.0.1:$1" >&2
    return 1
}

# The process tree's RSS in KiB (the pid and its direct children: nginx workers).
rss_kb() {
    local total=0 p v
    for p in "$1" $(cat "/proc/$1/task/"*/children 2>/dev/null); do
        v=$(awk '/^VmRSS:/ {print $2}' "/proc/$p/status" 2>/dev/null || true)
        total=$((total + ${v:-0}))
    done
    echo "$total"
}

# The process tree's CPU time (utime + stime) in clock ticks.
cpu_ticks() {
    local total=0 p v
    for p in "$1" $(cat "/proc/$1/task/"*/children 2>/dev/null); do
        v=$(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || true)
        total=$((total + ${v:-0}))
    done
    echo "$total"
}
HZ=$(getconf CLK_TCK)

field() { # name line
    grep -o "\b$1=[^ ]*" <<<"$2" | head -1 | cut -d= -f2
}

load1() { cut -d' ' -f1 /proc/loadavg; }

COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
[[ -n $(git status --porcelain --untracked-files=no 2>/dev/null) ]] && COMMIT="$COMMIT (working tree modified)"
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)

# ---------------------------------------------------------------- upstream
"$BIN/sse_upstream" --listen 127.0.0.1:0 --rate "$RATE" --payload "$PAYLOAD" --sndbuf "$SNDBUF" \
    --batch "$BATCH" \
    >"$WORK/upstream.log" 2>&1 &
PIDS+=($!)
UPSTREAM=$(wait_line "$WORK/upstream.log" 'listening on' | awk '{print $NF}')
log "upstream at $UPSTREAM"

HAVE_NGINX=1
command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] || HAVE_NGINX=0
NGINX=$(command -v nginx 2>/dev/null || echo /usr/sbin/nginx)

MB_PID=""
MB_URL=""

start_proxy() { # store [extra proxy arguments]
    local store=$1 line
    shift
    RUST_LOG=warn "$BIN/proxy" --listen 127.0.0.1:0 --admin 127.0.0.1:0 \
        --upstream "http://$UPSTREAM" --store "$store" --keepalive 15 "$@" \
        >"$WORK/proxy.log" 2>&1 &
    MB_PID=$!
    PIDS+=("$MB_PID")
    line=$(wait_line "$WORK/proxy.log" 'listening on http://') || return 1
    MB_URL=$(sed -n 's/.*listening on \(http:\/\/[0-9.:]*\).*/\1/p' <<<"$line")
}

start_nginx() {
    local attempt
    for attempt in 1 2 3; do
        start_nginx_once && return 0
        log "nginx did not start (attempt $attempt):"
        tail -3 "$WORK/nginx.log" "$WORK/nginx/error.log" >&2 2>/dev/null || true
        stop_middlebox
    done
    return 1
}

start_nginx_once() {
    local port dir=$WORK/nginx user=""
    port=$(free_port) || return 1
    rm -rf "$dir"
    mkdir -p "$dir/tmp"
    [[ $EUID -eq 0 ]] && user="user root;"
    cat >"$dir/nginx.conf" <<EOF
$user
daemon off;
worker_processes auto;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 16384; }
http {
    access_log off;
    client_body_temp_path $dir/tmp/body;
    proxy_temp_path $dir/tmp/proxy;
    fastcgi_temp_path $dir/tmp/fastcgi;
    uwsgi_temp_path $dir/tmp/uwsgi;
    scgi_temp_path $dir/tmp/scgi;
    upstream sse { server $UPSTREAM; keepalive 64; }
    server {
        listen 127.0.0.1:$port;
        location / {
            proxy_pass http://sse;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 1h;
        }
    }
}
EOF
    "$NGINX" -p "$dir" -c "$dir/nginx.conf" >"$WORK/nginx.log" 2>&1 &
    MB_PID=$!
    PIDS+=("$MB_PID")
    MB_URL="http://127.0.0.1:$port"
    wait_port "$port" && kill -0 "$MB_PID" 2>/dev/null
}

stop_middlebox() {
    local children pid
    [[ -n $MB_PID ]] || return 0
    children=$(cat "/proc/$MB_PID/task/"*/children 2>/dev/null || true)
    stop_pid "$MB_PID"
    # nginx workers left behind if the master had to be killed.
    for pid in $children; do
        [[ $(cat "/proc/$pid/comm" 2>/dev/null) == nginx ]] && kill -KILL "$pid" 2>/dev/null
    done
    MB_PID=""
}

# Runs the load tool in measure mode; sets LINE (its result line) and TICKS
# (the middlebox's CPU ticks over the counting window, if there is a middlebox).
# The streams are opened held, then started together (sse_upstream's hold/go).
measure() { # url prefix query
    local out="$WORK/measure.out" pid c0=0 c1=0 token
    RSS_END=""
    token="t${RANDOM}${RANDOM}"
    : >"$out"
    "$BIN/sse_load" --url "$1" --streams "$STREAMS" --prefix "$2" --query "$3&hold=$token" \
        --go "http://$UPSTREAM/go?hold=$token" \
        --warmup "$WARMUP" --duration "$DURATION" >"$out" 2>>"$WORK/load.err" &
    pid=$!
    PIDS+=("$pid")
    if wait_line "$out" '^counting' 120 >/dev/null; then
        [[ -n $MB_PID ]] && c0=$(cpu_ticks "$MB_PID")
        if wait_line "$out" '^counted' $((${DURATION%.*} + 30)) >/dev/null; then
            [[ -n $MB_PID ]] && c1=$(cpu_ticks "$MB_PID") && RSS_END=$(rss_kb "$MB_PID")
        fi
    fi
    wait "$pid" || true
    LINE=$(tail -1 "$out")
    TICKS=$((c1 - c0))
}

# round config eps p50 p99 cpu_us rss_per_stream load1 ok eps_at_rate cpu_us_at_rate rss_mb_at_full_speed
RESULTS="$WORK/results.tsv"
: >"$RESULTS"
RAW="$WORK/raw.txt"
: >"$RAW"

run_config() { # round config
    local round=$1 cfg=$2 rss0 rss1 per="" cpu="" cpu_rate="" eps_rate="" line eps p50 p99 ok=yes l1 idle
    local rss_load=""
    l1=$(load1)
    case $cfg in
        direct) MB_URL="http://$UPSTREAM"; MB_PID="" ;;
        proxy-memory) start_proxy memory || return 1 ;;
        proxy-redb) rm -f "$WORK/events.redb"; start_proxy "redb:$WORK/events.redb" || return 1 ;;
        proxy-bare) start_proxy memory --bare || return 1 ;;
        proxy-hyper) start_proxy memory --upstream-client hyper || return 1 ;;
        proxy-bare-hyper) start_proxy memory --bare --upstream-client hyper || return 1 ;;
        proxy-without-*) start_proxy memory --without "${cfg#proxy-without-}" || return 1 ;;
        nginx) start_nginx || return 1 ;;
        *) echo "unknown config $cfg" >&2; return 1 ;;
    esac
    log "round $round: $cfg via $MB_URL (load average $l1)"

    if [[ -n $MB_PID ]]; then
        sleep 1
        rss0=$(rss_kb "$MB_PID")
        "$BIN/sse_load" --url "$MB_URL" --streams "$STREAMS" --prefix "/idle-$round/" \
            --query rate=0 --mode idle --duration $((IDLE_SETTLE + 3)) \
            >"$WORK/idle.out" 2>>"$WORK/load.err" &
        idle=$!
        PIDS+=("$idle")
        wait_line "$WORK/idle.out" '^ready' 60 >/dev/null || ok=no
        sleep "$IDLE_SETTLE"
        rss1=$(rss_kb "$MB_PID")
        wait "$idle" || ok=no
        per=$(awk -v a="$rss0" -v b="$rss1" -v n="$STREAMS" 'BEGIN { printf "%.1f", (b - a) / n }')
        echo "$cfg round $round idle: rss0=${rss0}KiB rss1=${rss1}KiB $(head -1 "$WORK/idle.out")" >>"$RAW"
        log "  memory: ${rss0} KiB idle, ${rss1} KiB with $STREAMS open streams: $per KiB/stream"
    fi

    measure "$MB_URL" "/max-$round/" rate=max
    line=$LINE
    echo "$cfg round $round max: $line" >>"$RAW"
    eps=$(field eps "$line")
    [[ $(field connected "$line") == "$STREAMS" ]] || ok=no
    if [[ -n $MB_PID && ${eps:-0} -gt 0 ]]; then
        cpu=$(awk -v t="$TICKS" -v hz="$HZ" -v e="$(field events "$line")" \
            'BEGIN { printf "%.2f", t / hz * 1e6 / e }')
    fi
    [[ -n $RSS_END ]] && rss_load=$(awk -v k="$RSS_END" 'BEGIN { printf "%.0f", k / 1024 }')
    log "  throughput: ${eps:-?} events/s${cpu:+, $cpu µs middlebox CPU/event}${rss_load:+, $rss_load MiB RSS}"

    measure "$MB_URL" "/rate-$round/" "rate=$RATE"
    line=$LINE
    echo "$cfg round $round rate=$RATE: $line" >>"$RAW"
    p50=$(field p50_us "$line")
    p99=$(field p99_us "$line")
    eps_rate=$(field eps "$line")
    [[ $(field connected "$line") == "$STREAMS" ]] || ok=no
    if [[ -n $MB_PID && ${eps_rate:-0} -gt 0 ]]; then
        cpu_rate=$(awk -v t="$TICKS" -v hz="$HZ" -v e="$(field events "$line")" \
            'BEGIN { printf "%.2f", t / hz * 1e6 / e }')
    fi
    log "  latency at $RATE ev/s/stream: p50 ${p50:-?} µs, p99 ${p99:-?} µs (${eps_rate:-?} events/s${cpu_rate:+, $cpu_rate µs middlebox CPU/event})"

    stop_middlebox
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$cfg" "${eps:-0}" "${p50:-0}" \
        "${p99:-0}" "${cpu:--}" "${per:--}" "$l1" "$ok" "${eps_rate:-0}" "${cpu_rate:--}" "${rss_load:--}" >>"$RESULTS"
    sleep 1
}

for round in $(seq "$ROUNDS"); do
    for cfg in $CONFIGS; do
        if [[ $cfg == nginx && $HAVE_NGINX -eq 0 ]]; then
            log "nginx not installed: skipping (Debian: apt-get install -y nginx)"
            continue
        fi
        if ! run_config "$round" "$cfg"; then
            log "round $round: $cfg failed; skipped"
            stop_middlebox
        fi
    done
done

# ---------------------------------------------------------------- report
median() { sort -n | awk '{ v[NR] = $1 } END { if (NR == 0) print "-"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
col() { # config column
    awk -F'\t' -v c="$1" -v k="$2" '$2 == c && $k != "-" { print $k }' "$RESULTS" | median
}
ms() { awk -v u="$1" 'BEGIN { if (u == "-") print "-"; else printf "%.2f ms", u / 1000 }'; }
us() { [[ $1 == - ]] && echo - || echo "$1 µs"; }
added() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "-" || b == "-") print "-"; else printf "%+.2f", (a - b) / 1000 }'; }

D_P50=$(col direct 4)
D_P99=$(col direct 5)
N_EPS=$(col nginx 3)
{
    echo "# Proxy benchmark (issue #6)"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $COMMIT, $(nproc) cores, $STREAMS concurrent streams" \
        "(one connection and one stream key each), ${DURATION} s counted after ${WARMUP} s warm-up per" \
        "phase, $ROUNDS round(s) (cells are medians), events of about $((PAYLOAD + 40)) bytes."
    echo "Command: \`STREAMS=$STREAMS DURATION=$DURATION WARMUP=$WARMUP RATE=$RATE PAYLOAD=$PAYLOAD" \
        "SNDBUF=$SNDBUF BATCH=$BATCH" \
        "ROUNDS=$ROUNDS CONFIGS=\"$CONFIGS\" bench/proxy/run.sh\`." \
        "Load average at start: $LOAD_START; at end: $(cut -d' ' -f1-3 /proc/loadavg)."
    echo
    echo "- *events/s (upstream at full speed)*: the upstream writes as fast as it is read;"
    echo "  events delivered to the client per second. *middlebox CPU/event*: the proxy's or"
    echo "  nginx's CPU time (user + system, all threads and workers) over the window, per event."
    echo "- *p50 / p99*: send-to-receive latency at $RATE events/s per stream; *added*: minus \`direct\`."
    echo "- *RSS per open stream*: (RSS with $STREAMS idle open streams − RSS with none) / $STREAMS."
    echo "  *RSS at full speed*: the middlebox's RSS at the end of the full-speed window (the proxy's"
    echo "  includes the memory store's history, budgeted at 256 MiB)."
    echo "- Every process shares the machine's cores with whatever else runs on it: see the load average."
    echo
    echo "| config | events/s (upstream at full speed) | % of nginx | middlebox CPU/event | events/s at $RATE/s/stream (offered $((STREAMS * RATE))) | p50 | p99 | added p50 / p99 vs direct (ms) | middlebox CPU/event | middlebox RSS per open stream | middlebox RSS at full speed | load avg at start | all streams up |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"
    for cfg in $CONFIGS; do
        grep -q -P "\t$cfg\t" "$RESULTS" || continue
        eps=$(col "$cfg" 3)
        p50=$(col "$cfg" 4)
        p99=$(col "$cfg" 5)
        cpu=$(col "$cfg" 6)
        per=$(col "$cfg" 7)
        eps_rate=$(col "$cfg" 10)
        cpu_rate=$(col "$cfg" 11)
        rss_load=$(col "$cfg" 12)
        l1=$(awk -F'\t' -v c="$cfg" '$2 == c { printf "%s%s", s, $8; s = " " }' "$RESULTS")
        oks=$(awk -F'\t' -v c="$cfg" '$2 == c && $9 != "yes" { bad = 1 } END { print bad ? "no" : "yes" }' "$RESULTS")
        pct=$(awk -v a="$eps" -v b="${N_EPS:--}" 'BEGIN { if (b == "-" || b == 0) print "-"; else printf "%.0f%%", 100 * a / b }')
        add="-"
        [[ $cfg != direct ]] && add="$(added "$p50" "$D_P50") / $(added "$p99" "$D_P99")"
        printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$cfg" "$(printf '%.0f' "$eps")" \
            "$pct" "$(us "$cpu")" "$(printf '%.0f' "$eps_rate")" "$(ms "$p50")" "$(ms "$p99")" "$add" \
            "$(us "$cpu_rate")" "$([[ $per == - ]] && echo - || echo "$per KiB")" \
            "$([[ $rss_load == - ]] && echo - || echo "$rss_load MiB")" "$l1" "$oks"
    done
    echo
    echo "Targets: proxy-memory ≥ 70% of nginx's events/s; proxy RSS per open stream ≤ 16 KiB."
    echo
    echo "<details><summary>raw load-tool output</summary>"
    echo
    echo '```'
    cat "$RAW"
    echo '```'
    echo
    echo "</details>"
} >"$OUT.tmp"
mv "$OUT.tmp" "$OUT"
cat "$OUT"
