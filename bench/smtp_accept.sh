#!/bin/bash
# SMTP benchmark: mailgw next to the reference peers, in the same run.
#
#   bench/smtp_accept.sh [--relay] [--reps N] [--out PREFIX] [--io-threads N] [--workers N] [--port P]
#                        [--peers "postfix aiosmtpd twistd"] [--no-peers] [--keep-data]
#   bench/smtp_accept.sh [--relay] --serve SECONDS [--io-threads N] [--port P] [--config-append FILE]
#       only steps 1-2: run mailgw alone for at most SECONDS (for bench/profile_smtp.py),
#       print its pid file and Maildir, stop it on exit (or on Ctrl-C / SIGTERM to this script);
#       with --relay also smtp-sink if it is not running yet (mailgw relays to it)
#   --workers N: [server] smtp_workers = N (SMTP worker processes; default: the config's default, 0)
#   --config-append FILE: TOML appended to the generated mailgw.toml (experiments, e.g. a
#       [queue] table with max_per_domain; copied into PREFIX.env.txt). Not for published runs.
#
# Default: durable accept (local delivery into a Maildir). --relay (= bench/smtp_relay.sh):
#   relaying. gw.test, the generator's recipient domain, is then NOT local to mailgw
#   (local_domains = ["local.gw.test"]), and [queue.smarthost] is 127.0.0.1:2626, tls "none"
#   = Postfix smtp-sink. Peers (default): "postfix-relay smtp-sink" = Postfix relay instance on
#   2526 -> the same smtp-sink, and smtp-sink measured directly (the ceiling). The target gets
#   the run_matrix key `sink`: a run ends when smtp-sink's counter has counted every message
#   (delivered msgs/s). Default port 2550 (2540 without --relay).
#
# What it does (every step bounded in time; everything it started is stopped on exit):
#   1. makes a scratch data dir /tmp/mailgw-bench.XXXXXX with a config (relay listener on
#      127.0.0.1:PORT, trusted_networks 127.0.0.0/8, local domain gw.test; --relay: local
#      domain local.gw.test plus the smarthost) and, without --relay, the users sink@gw.test,
#      alice@gw.test (password secret);
#   2. starts mailgw:  PYTHONPATH=REPO twistd -n --pidfile D/mailgw.pid mailgw --config D/mailgw.toml
#   3. starts the peers that are not running yet with /work/shared/bench/peers/start-peers.sh
#      (start-peers.sh names: postfix = Postfix on 2525, aiosmtpd = aiosmtpd-fsync on 2527,
#      twistd = stock twistd mail on 2528, postfix-relay = Postfix relay on 2526,
#      smtp-sink = smtp-sink on 2626; start-peers.sh starts only the names it is given);
#   4. probes fsync cost (mailbench.py fsync, on the data dir's file system);
#   5. runs peers/run_matrix.py --only smtp --smtp-peers postfix,aiosmtpd-fsync,twistd-mail
#      --target-smtp mailgw=PORT:pid=D/mailgw.pid:rcpt=sink@gw.test:maildir=D/data/mail/gw.test/sink
#      (--relay: --smtp-peers 'postfix-relay,smtp-sink(direct)'
#       --target-smtp mailgw=PORT:pid=D/mailgw.pid:rcpt=sink@gw.test:sink);
#   6. copies OUT.jsonl / .summary.json / .ratios.json / .txt (+ fsync probe, env) to PREFIX.*;
#   7. on exit (trap): stops mailgw by its PID and the peers *this script* started
#      (peers/stop-peers.sh NAME, which kills by its own pid files), removes the data dir.
#
# Env: BENCH=/work/shared/bench  PYTHON=python3  TWISTD=twistd
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
BENCH=${BENCH:-/work/shared/bench}
PYTHON=${PYTHON:-python3}
TWISTD=${TWISTD:-twistd}
# shellcheck source=lib.sh
. "$HERE/lib.sh"

REPS=3
PORT=""
IO_THREADS=""
WORKERS=""
PEERS=""
PEERS_SET=0
RELAY=0
OUT=""
KEEP=0
SERVE=""
APPEND=""
while [ $# -gt 0 ]; do
  case "$1" in
    --reps) REPS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --io-threads) IO_THREADS=$2; shift 2 ;;
    --workers) WORKERS=$2; shift 2 ;;
    --port) PORT=$2; shift 2 ;;
    --peers) PEERS=$2; PEERS_SET=1; shift 2 ;;
    --no-peers) PEERS=""; PEERS_SET=1; shift ;;
    --relay) RELAY=1; shift ;;
    --keep-data) KEEP=1; shift ;;
    --serve) SERVE=$2; shift 2 ;;
    --config-append) APPEND=$2; shift 2 ;;
    -h|--help) sed -n '2,40p' "$0"; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
if [ "$RELAY" = 1 ]; then
  [ -n "$PORT" ] || PORT=2550
  [ "$PEERS_SET" = 1 ] || PEERS="postfix-relay smtp-sink"
  [ -n "$OUT" ] || OUT="$HERE/results/smtp-relay-$(date +%Y%m%d-%H%M%S)"
  LOCAL_DOMAIN=local.gw.test   # so that the generator's sink@gw.test is relayed
else
  [ -n "$PORT" ] || PORT=2540
  [ "$PEERS_SET" = 1 ] || PEERS="postfix aiosmtpd twistd"
  [ -n "$OUT" ] || OUT="$HERE/results/smtp-$(date +%Y%m%d-%H%M%S)"
  LOCAL_DOMAIN=gw.test
fi
mkdir -p "$(dirname "$OUT")"

# start-peers.sh name -> run_matrix.py name
matrix_name() {
  case "$1" in
    postfix) echo postfix ;; aiosmtpd) echo aiosmtpd-fsync ;; twistd) echo twistd-mail ;;
    aiosmtpd-nofsync) echo aiosmtpd-nofsync ;; postfix-relay) echo postfix-relay ;;
    smtp-sink) echo "smtp-sink(direct)" ;;
    *) echo "unsupported peer $1" >&2; return 1 ;;
  esac
}

D=$(mktemp -d /tmp/mailgw-bench.XXXXXX)
MAILGW_PID=""
STARTED_PEERS=()
SLEEP_PID=""

trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- 1. config and users
{
  echo "# written by bench/smtp_accept.sh$( [ "$RELAY" = 1 ] && echo ' --relay' )"
  echo "[server]"
  echo "hostname = \"mx.gw.test\""
  echo "local_domains = [\"$LOCAL_DOMAIN\"]"
  echo "# Trusted clients may relay without AUTH and are exempt from [smtp] max_connections_per_ip"
  echo "# (as Postfix exempts \$mynetworks), so the generator's 32 connections from 127.0.0.1 are"
  echo "# admitted with the default limits."
  echo "trusted_networks = [\"127.0.0.0/8\"]"
  echo "data_dir = \"$D/data\""
  [ -n "$IO_THREADS" ] && echo "io_threads = $IO_THREADS"
  [ -n "$WORKERS" ] && echo "smtp_workers = $WORKERS"
  if [ "$RELAY" = 1 ]; then
    echo
    echo "# everything non-local goes to Postfix smtp-sink (counts, stores nothing); the rest of"
    echo "# [queue] (max_deliveries, max_per_domain, retry_schedule, timeouts) at its defaults"
    echo "[queue.smarthost]"
    echo "host = \"127.0.0.1\""
    echo "port = 2626"
    echo "tls = \"none\""
  fi
  echo
  echo "[[listeners]]"
  echo "role = \"relay\""
  echo "endpoint = \"tcp:$PORT:interface=127.0.0.1\""
  if [ -n "$APPEND" ]; then
    echo
    echo "# appended from $APPEND (--config-append)"
    cat "$APPEND"
  fi
} > "$D/mailgw.toml"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
if [ "$RELAY" = 0 ]; then
  for u in sink@gw.test alice@gw.test; do
    echo secret | timeout 60 "$PYTHON" -m mailgw.cli users add "$u" --config "$D/mailgw.toml"
  done
fi
timeout 60 "$PYTHON" -m mailgw.cli check --config "$D/mailgw.toml"

# ---- 2. mailgw
if port_open "$PORT"; then
  echo "port $PORT is already in use" >&2; exit 1
fi
(cd "$D" && exec setsid "$TWISTD" -n --pidfile "$D/mailgw.pid" --logfile "$D/mailgw.log" \
    mailgw --config "$D/mailgw.toml" < /dev/null > "$D/stdout.log" 2>&1) &
MAILGW_PID=$!   # `exec` keeps the PID: this is twistd itself
for _ in $(seq 1 200); do
  port_open "$PORT" && break
  kill -0 "$MAILGW_PID" 2>/dev/null || { cat "$D/stdout.log" "$D/mailgw.log" 2>/dev/null; exit 1; }
  sleep 0.1
done
port_open "$PORT" || { echo "mailgw did not open $PORT" >&2; exit 1; }
[ "$(tr -d ' \n' < "$D/mailgw.pid")" = "$MAILGW_PID" ] || { echo "pidfile mismatch" >&2; exit 1; }
echo "mailgw pid $MAILGW_PID on 127.0.0.1:$PORT, data $D/data"
if [ -n "$SERVE" ]; then
  if [ "$RELAY" = 1 ]; then
    if peer_alive smtp-sink; then
      echo "smtp-sink already running: left running at exit"
    else
      STARTED_PEERS+=(smtp-sink)
      timeout 120 "$BENCH/peers/start-peers.sh" smtp-sink
    fi
    echo "serving (relay to smtp-sink): --pidfile $D/mailgw.pid --port $PORT" \
         "--counter-file /tmp/peers/sink/count.log; spool $D/data/queue/active"
  else
    mkdir -p "$D/data/mail/gw.test/sink"
    echo "serving: --pidfile $D/mailgw.pid --port $PORT --maildir $D/data/mail/gw.test/sink"
  fi
  echo "log: $D/mailgw.log; stopping after $SERVE s (or kill -TERM $$)"
  sleep "$SERVE" & SLEEP_PID=$!
  wait "$SLEEP_PID" || true
  exit 0
fi

# ---- 3. peers (only those not already running are started, and only those are stopped)
MATRIX_PEERS=()
for p in $PEERS; do
  MATRIX_PEERS+=("$(matrix_name "$p")")
  if peer_alive "$p"; then
    echo "peer $p already running: left running at exit"
  else
    STARTED_PEERS+=("$p")
  fi
done
if [ ${#STARTED_PEERS[@]} -gt 0 ]; then
  timeout 300 "$BENCH/peers/start-peers.sh" "${STARTED_PEERS[@]}"
fi
if [ "$RELAY" = 1 ] && ! peer_alive smtp-sink; then
  echo "--relay needs smtp-sink running (add it to --peers)" >&2; exit 1
fi

# ---- 4. environment and fsync probe (on the file system mailgw writes to)
{
  echo "date: $(date -u +%FT%TZ)"
  echo "mode: $( [ "$RELAY" = 1 ] && echo 'relay (smarthost 127.0.0.1:2626 smtp-sink)' || echo 'durable accept (local Maildir)' )"
  echo "nproc: $(nproc)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
  echo "mem: $(free -g | awk '/Mem:/{print $2 " GiB"}')"
  echo "kernel: $(uname -r)"
  echo "fs of $D: $(df -T "$D" | awk 'NR==2{print $1, $2}')"
  echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "python: $("$PYTHON" -V 2>&1)"
  echo "twisted: $("$PYTHON" -c 'import twisted; print(twisted.__version__)')"
  echo "mailgw git: $(git -C "$REPO" rev-parse --short HEAD) (+ uncommitted changes: $(git -C "$REPO" status --porcelain | wc -l) paths)"
  # the code twistd imported at start: a hash over mailgw/ and twisted/plugins/ as they are now
  echo "mailgw source sha256: $(cd "$REPO" && find mailgw twisted/plugins -name '*.py' -o -name '*.toml' | sort | xargs cat | sha256sum | cut -c1-16)"
  echo "mailgw uncommitted in mailgw/: $(git -C "$REPO" status --porcelain -- mailgw twisted | tr '\n' ' ')"
  echo "uncommitted in the SMTP/queue/store path (smtp/ queue/ store/ durable.py tap.py): $(git -C "$REPO" status --porcelain -- mailgw/smtp mailgw/queue mailgw/store mailgw/durable.py mailgw/tap.py twisted | tr '\n' ' ')"
  echo "io_threads: ${IO_THREADS:-default}"
  echo "smtp_workers: ${WORKERS:-default}"
  [ -n "$APPEND" ] && echo "config appended from $APPEND: $(tr '\n' ' ' < "$APPEND")"
  true
} | tee "$OUT.env.txt"
timeout 120 "$PYTHON" "$BENCH/mailbench.py" fsync --dir "$D" -n 500 -s 2048 --repeat 3 \
    | tee "$OUT.fsync.json"

# ---- 5. the matrix
PEER_CSV=$(IFS=,; echo "${MATRIX_PEERS[*]}")
if [ "$RELAY" = 1 ]; then
  TARGET="mailgw=$PORT:pid=$D/mailgw.pid:rcpt=sink@gw.test:sink"
else
  TARGET="mailgw=$PORT:pid=$D/mailgw.pid:rcpt=sink@gw.test:maildir=$D/data/mail/gw.test/sink"
  mkdir -p "$D/data/mail/gw.test/sink"   # so the first clear_maildir has something to look at
fi
echo "run_matrix: --reps $REPS --only smtp --smtp-peers '$PEER_CSV' --target-smtp $TARGET"
(cd "$BENCH" && timeout 3000 "$PYTHON" peers/run_matrix.py --out "$D/matrix" --reps "$REPS" \
    --only smtp --smtp-peers "$PEER_CSV" --target-smtp "$TARGET") | tee "$OUT.txt"

# ---- 6. keep the results (small files)
for ext in jsonl summary.json ratios.json; do cp "$D/matrix.$ext" "$OUT.$ext"; done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT.env.txt"
tracebacks=$(cat "$D"/mailgw.log* | grep -c 'Traceback' || true)
echo "mailgw log: $(cat "$D"/mailgw.log* | grep -c ': accepted ' || true) accepted, $tracebacks tracebacks" \
    | tee -a "$OUT.txt"
if [ "$RELAY" = 1 ]; then
  # what the queue runner did, and what is left in the spool (should be nothing)
  echo "mailgw queue: $(cat "$D"/mailgw.log* | grep -c 'status=sent' || true) sent," \
       "$(cat "$D"/mailgw.log* | grep -c 'status=deferred' || true) deferred," \
       "$(cat "$D"/mailgw.log* | grep -c 'status=bounced' || true) bounced;" \
       "left in the spool: $(find "$D/data/queue/active" -name '*.env' | wc -l) envelopes" \
      | tee -a "$OUT.txt"
fi
echo "results: $OUT.{txt,jsonl,summary.json,ratios.json,env.txt,fsync.json}"
