#!/bin/bash
# A/B of two mailgw builds under one SMTP workload: the commit REV (checked out into a scratch
# git worktree) against this work tree, same config, runs interleaved old/new, per-pair figures
# and medians. For changes whose effect is smaller than the run-to-run noise of a matrix run
# against Postfix: both builds see the same machine state, pair by pair.
#
#   bench/ab.sh REV [--relay] [--workers N] [--pairs N] [-n MESSAGES] [-c CONCURRENCY] [-m PER_CONN]
#                   [--pin]
#
# Defaults: --workers 2 --pairs 5 -n 3000 -c 32 -m 1 (2 KiB messages). Durable accept into a
# Maildir, or with --relay through the queue to Postfix's smtp-sink (started if not running).
# Per run: delivered msgs/s, p50 latency, mailgw's CPU ms/msg (process tree) and the main
# process's own share, the generator's CPU, host busy % and other processes' CPU (the noise).
# Ports 2561 (REV) and 2562 (work tree). Everything it started is stopped on exit.
# --pin: for both builds alike, every thread of mailgw's process tree (main and its SMTP
#   workers) is pinned to CPU 0 (taskset -a -p -c 0, once it serves; later children inherit
#   it) and mailbench runs under taskset -c 1. With --workers N all N+1 mailgw processes share
#   CPU 0: the workers then add isolation, not CPU. smtp-sink (--relay) is not pinned.
#   Default: nothing pinned (server and generator share both CPUs).
#
# Env: BENCH=/work/shared/bench  PYTHON=python3
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
BENCH=${BENCH:-/work/shared/bench}
PYTHON=${PYTHON:-python3}
# shellcheck source=lib.sh
. "$HERE/lib.sh"
[ $# -ge 1 ] || { sed -n '2,20p' "$0"; exit 2; }
REV=$1; shift
RELAY=0; WORKERS=2; PAIRS=5; COUNT=3000; CONC=32; PER=1; PIN=0
while [ $# -gt 0 ]; do
  case "$1" in
    --relay) RELAY=1; shift ;;
    --pin) PIN=1; shift ;;
    --workers) WORKERS=$2; shift 2 ;;
    --pairs) PAIRS=$2; shift 2 ;;
    -n) COUNT=$2; shift 2 ;;
    -c) CONC=$2; shift 2 ;;
    -m) PER=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

T=$(mktemp -d /tmp/mailgw-ab.XXXXXX)
SERVERS=()
cleanup() {
  local rc=$?
  set +e
  stop_servers
  git -C "$REPO" worktree remove --force "$T/old" 2>/dev/null
  git -C "$REPO" worktree prune
  rm -rf "$T"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

git -C "$REPO" worktree add --detach "$T/old" "$REV" >/dev/null
MODE=(); [ "$RELAY" = 1 ] && MODE=(--relay)
for spec in "old:$T/old:2561" "new:$REPO:2562"; do
  IFS=: read -r name tree port <<< "$spec"
  "$tree/bench/smtp_accept.sh" "${MODE[@]}" --serve 3000 --workers "$WORKERS" --port "$port" \
      > "$T/$name.log" 2>&1 &
  SERVERS+=($!)
  for _ in $(seq 1 300); do grep -q '^serving' "$T/$name.log" && break; sleep 0.1; done
  grep -q '^serving' "$T/$name.log" || { cat "$T/$name.log"; exit 1; }
done

main_pid() {  # name -> mailgw's main PID, from the pid file that smtp_accept.sh --serve printed
  cut -d' ' -f1 "$(grep -o -- '--pidfile [^ ]*' "$T/$1.log" | head -1 | cut -d' ' -f2)" | tr -d ' \n'
}
GEN=()
if [ "$PIN" = 1 ]; then
  command -v taskset > /dev/null || { echo "--pin needs taskset (util-linux)" >&2; exit 1; }
  [ "$(nproc)" -ge 2 ] || { echo "--pin needs 2 CPUs" >&2; exit 1; }
  for name in old new; do
    # the workers are forked at start-up: wait (bounded) until all are there, then pin the tree
    for _ in $(seq 1 100); do
      [ "$(tree_pids "$(main_pid "$name")" | wc -l)" -gt "$WORKERS" ] && break; sleep 0.1
    done
    pin_tree 0 "$(main_pid "$name")"
  done
  GEN=(taskset -c 1)
fi
affinity() { echo "affinity $1: mailgw $(tree_affinity "$(main_pid old)") (old)," \
                  "$(tree_affinity "$(main_pid new)") (new); mailbench ${GEN[*]:-unpinned}"; }

PINNED="not pinned"; [ "$PIN" = 1 ] && PINNED="pinned: mailgw CPU 0, mailbench CPU 1"
echo "A/B: old = $REV ($(git -C "$REPO" rev-parse --short "$REV")), new = work tree at" \
     "$(git -C "$REPO" rev-parse --short HEAD) (+ $(git -C "$REPO" status --porcelain -- mailgw | wc -l) changed paths" \
     "under mailgw/); $( [ "$RELAY" = 1 ] && echo relay || echo 'durable accept'), smtp_workers $WORKERS," \
     "$COUNT x 2 KiB, C=$CONC, M=$PER, $PAIRS pairs; $PINNED; load $(cut -d' ' -f1-3 /proc/loadavg)"
affinity "at start"

run_one() {   # name port -> one JSON line: mailbench's result + the main process's own CPU ms/msg
  local name=$1 port=$2 log=$T/$1.log pidfile main until cpu0 cpu1
  pidfile=$(grep -o -- '--pidfile [^ ]*' "$log" | head -1 | cut -d' ' -f2)
  main=$(cut -d' ' -f1 "$pidfile")
  if [ "$RELAY" = 1 ]; then
    until=(--until-counter-file "$(grep -o -- '--counter-file [^ ;]*' "$log" | head -1 | cut -d' ' -f2)")
  else
    until=(--until-maildir "$(grep -o -- '--maildir [^ ]*' "$log" | head -1 | cut -d' ' -f2)")
  fi
  cpu0=$(awk '{print $14 + $15}' "/proc/$main/stat")
  out=$(timeout 600 "${GEN[@]}" "$PYTHON" "$BENCH/mailbench.py" smtp --port "$port" -n "$COUNT" -s 2048 -c "$CONC" \
          -m "$PER" --to sink@gw.test "${until[@]}" --cpu-pidfile "$pidfile" | tail -n1)
  cpu1=$(awk '{print $14 + $15}' "/proc/$main/stat")
  "$PYTHON" -c 'import json,sys,os; r=json.loads(sys.argv[1])["result"]; r["main_cpu_ms_per_msg"]=(int(sys.argv[3])-int(sys.argv[2]))*1000/os.sysconf("SC_CLK_TCK")/r["ok"]; r["name"]=sys.argv[4]; print(json.dumps(r))' \
    "$out" "$cpu0" "$cpu1" "$name"
}

for _ in $(seq 1 "$PAIRS"); do
  run_one old 2561
  run_one new 2562
done | "$PYTHON" -c '
import json, statistics, sys
runs = {"old": [], "new": []}
keys = [("delivered_msgs_per_s", "msgs/s", "%.0f"), ("lat_p50_ms", "p50 ms", "%.2f"),
        ("server_cpu_ms_per_msg", "CPU ms/msg", "%.3f"), ("main_cpu_ms_per_msg", "main ms/msg", "%.3f"),
        ("host_busy_pct", "busy %", "%.0f"), ("other_cpu_s", "other CPU s", "%.2f")]
for line in sys.stdin:
    r = json.loads(line)
    r["client_ms_per_msg"] = r["client_cpu_s"] * 1000 / r["ok"]
    runs[r["name"]].append(r)
    print(r["name"], "  ".join(f"{label} " + fmt % r[key] for key, label, fmt in keys),
          "  generator ms/msg %.3f" % r["client_ms_per_msg"])
for name, rs in runs.items():
    print(f"median {name}:", "  ".join(f"{label} " + fmt % statistics.median(r[key] for r in rs)
                                       for key, label, fmt in keys[:4]))
'
affinity "at end"
