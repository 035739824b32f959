#!/bin/bash
# Durable accept with and without SMTP worker processes, next to Postfix, in ONE interleaved run:
# what `[server] smtp_workers` buys on this machine, workload by workload.
#
#   bench/smtp_workers.sh [--reps N] [--workers N] [--out PREFIX] [--relay]
#
# What it does (bounded; everything it started is stopped on exit):
#   1. two mailgw instances, each by `bench/smtp_accept.sh --serve` (scratch data dir, same
#      config apart from smtp_workers): `mailgw-w0` on 127.0.0.1:2540 (smtp_workers = 0) and
#      `mailgw-wN` on 127.0.0.1:2541 (smtp_workers = N, default 2). --relay: both relay to
#      smtp-sink (ports 2550 / 2551) and the peer is postfix-relay.
#   2. Postfix (start-peers.sh postfix, or postfix-relay + smtp-sink), if not running yet.
#   3. peers/run_matrix.py --only smtp --smtp-peers postfix --target-smtp mailgw-w0=... 
#      --target-smtp mailgw-wN=... : the same four workloads as smtp_accept.sh.
#   4. PREFIX.{txt,jsonl,summary.json,ratios.json}; tables: python3 bench/md_tables.py PREFIX
#
# Env: BENCH=/work/shared/bench  PYTHON=python3
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
BENCH=${BENCH:-/work/shared/bench}
PYTHON=${PYTHON:-python3}
# shellcheck source=lib.sh
. "$HERE/lib.sh"
REPS=3
WORKERS=2
OUT=""
RELAY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --reps) REPS=$2; shift 2 ;;
    --workers) WORKERS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --relay) RELAY=1; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -n "$OUT" ] || OUT="$HERE/results/smtp-workers-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$(dirname "$OUT")"
T=$(mktemp -d /tmp/mailgw-workers.XXXXXX)
SERVERS=()
STARTED_PEERS=()

cleanup() {
  local rc=$?
  set +e
  stop_servers
  [ ${#STARTED_PEERS[@]} -gt 0 ] && "$BENCH/peers/stop-peers.sh" "${STARTED_PEERS[@]}"
  rm -rf "$T"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ "$RELAY" = 1 ]; then
  BASE=2550; MODE=--relay; PEERS="smtp-sink postfix-relay"; MATRIX_PEER=postfix-relay
else
  BASE=2540; MODE=""; PEERS="postfix"; MATRIX_PEER=postfix
fi
for p in $PEERS; do
  peer_alive "$p" || STARTED_PEERS+=("$p")
done
[ ${#STARTED_PEERS[@]} -gt 0 ] && timeout 300 "$BENCH/peers/start-peers.sh" "${STARTED_PEERS[@]}"

TARGETS=()
for spec in "0:$BASE" "$WORKERS:$((BASE + 1))"; do
  w=${spec%%:*}; port=${spec##*:}
  "$HERE/smtp_accept.sh" $MODE --serve 3000 --workers "$w" --port "$port" > "$T/w$w.log" 2>&1 &
  SERVERS+=($!)
  for _ in $(seq 1 300); do grep -q '^serving' "$T/w$w.log" && break; sleep 0.1; done
  grep -q '^serving' "$T/w$w.log" || { cat "$T/w$w.log"; exit 1; }
  pidfile=$(grep -o -- '--pidfile [^ ]*' "$T/w$w.log" | head -1 | cut -d' ' -f2)
  if [ "$RELAY" = 1 ]; then
    TARGETS+=(--target-smtp "mailgw-w$w=$port:pid=$pidfile:rcpt=sink@gw.test:sink")
  else
    maildir=$(grep -o -- '--maildir [^ ]*' "$T/w$w.log" | head -1 | cut -d' ' -f2)
    TARGETS+=(--target-smtp "mailgw-w$w=$port:pid=$pidfile:rcpt=sink@gw.test:maildir=$maildir")
  fi
done
{
  echo "date: $(date -u +%FT%TZ)"
  echo "mode: $( [ "$RELAY" = 1 ] && echo relay || echo 'durable accept' ); smtp_workers 0 vs $WORKERS"
  echo "mailgw git: $(git -C "$HERE/.." rev-parse --short HEAD) (+ uncommitted: $(git -C "$HERE/.." status --porcelain -- mailgw | wc -l) paths under mailgw/)"
  echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$OUT.env.txt"
echo "run_matrix: --reps $REPS --only smtp --smtp-peers $MATRIX_PEER ${TARGETS[*]}"
(cd "$BENCH" && timeout 3000 "$PYTHON" peers/run_matrix.py --out "$T/matrix" --reps "$REPS" \
    --only smtp --smtp-peers "$MATRIX_PEER" "${TARGETS[@]}") | tee "$OUT.txt"
for ext in jsonl summary.json ratios.json; do cp "$T/matrix.$ext" "$OUT.$ext"; done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT.env.txt"
echo "results: $OUT.{txt,jsonl,summary.json,ratios.json,env.txt}"
