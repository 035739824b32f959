#!/bin/bash
# Mailbox benchmark (issues 4 and 5): mailgw's POP3 and IMAP next to Dovecot, in one
# interleaved run, on mailboxes filled through mailgw's own SMTP relay listener.
#
#   bench/mailbox.sh [--reps N] [--out PREFIX] [--peers "postfix dovecot"] [--no-peers]
#                    [--no-tls-targets] [--idle N] [--pop3-messages K] [--imap-messages K]
#                    [--keep-data]
#   bench/mailbox.sh --serve SECONDS        only mailgw (for profile_smtp.py / py-spy /
#                                           imap_idle_memory.py), stopped on exit
#
# What it does (every step bounded in time; everything it started is stopped on exit):
#   1. scratch data dir /tmp/mailgw-mbox.XXXXXX, mailgw.toml with listeners on 127.0.0.1:
#      relay 2560, pop3 1160, pop3s 1195, imap 1163, imaps 1193 (ports: --port-base, below);
#      local domain gw.test; user alice@gw.test (password secret).
#      Dovecot's peer config runs WITHOUT TLS (ssl = no, disable_plaintext_auth = no), so for
#      the like-for-like comparison mailgw gets [pop3] / [imap] allow_plaintext_auth = true
#      (the default is false). The TLS targets (mailgw-tls: pop3s / imaps, implicit TLS) are
#      measured in the same run, for the cost of TLS; they have no Dovecot counterpart.
#      [imap] max_connections = max_connections_per_ip = 1100 (defaults 1000 / 50) so that
#      imap_idle_memory.py can hold 1,000 connections from 127.0.0.1.
#   2. starts mailgw: PYTHONPATH=REPO twistd -n --pidfile D/mailgw.pid mailgw --config D/mailgw.toml
#   3. starts the peers not already running (default "postfix dovecot": Dovecot's mailbox is
#      filled through Postfix). Stock twistd POP3 is not in the default set: with Nagle on it
#      does ~23 msgs/s, i.e. ~90 s per run of 2,000 messages (see /work/shared/bench/README.md).
#   4. peers/run_matrix.py --only pop3,imap --pop3-peers dovecot --imap-peers dovecot
#        --target-pop3 mailgw=1160:user=alice@gw.test:pass=secret:fill=2560:maildir=M:pid=P
#        --target-pop3 mailgw-tls=1195:user=alice@gw.test:pass=secret:pid=P:tls
#        --target-imap mailgw=1163:user=alice@gw.test:pass=secret:fill=2560:maildir=M:pid=P
#        --target-imap mailgw-tls=1193:user=alice@gw.test:pass=secret:pid=P:tls
#      (M = D/data/mail/gw.test/alice; the TLS targets read the same mailbox, which the
#      plain target has filled just before). POP3: 2,000 x 4 KiB, LIST + UIDL + RETR all;
#      IMAP: 10,000 x 4 KiB, SELECT, FETCH meta, FETCH BODY.PEEK[], UID SEARCH HEADER,
#      STORE +FLAGS; a cold run then N reps, interleaved.
#   5. with --idle N: bench/imap_idle_memory.py -n N against the imaps listener (TLS),
#      mailgw's VmRSS before / after (PREFIX.idle.json).
#   6. PREFIX.{txt,jsonl,summary.json,ratios.json,env.txt}.
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
PEERS="postfix dovecot"
OUT=""
KEEP=0
SERVE=""
TLS_TARGETS=1
IDLE=""
POP3_K=2000
IMAP_K=10000
BASE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --reps) REPS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --peers) PEERS=$2; shift 2 ;;
    --no-peers) PEERS=""; shift ;;
    --no-tls-targets) TLS_TARGETS=0; shift ;;
    --idle) IDLE=$2; shift 2 ;;
    --pop3-messages) POP3_K=$2; shift 2 ;;
    --imap-messages) IMAP_K=$2; shift 2 ;;
    --port-base) BASE=$2; shift 2 ;;   # adds BASE to every port (e.g. 10 -> 2570, 1170, ...)
    --keep-data) KEEP=1; shift ;;
    --serve) SERVE=$2; shift 2 ;;
    -h|--help) sed -n '2,40p' "$0"; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
B=${BASE:-0}
SMTP_PORT=$((2560 + B)); POP3_PORT=$((1160 + B)); POP3S_PORT=$((1195 + B))
IMAP_PORT=$((1163 + B)); IMAPS_PORT=$((1193 + B))
[ -n "$OUT" ] || OUT="$HERE/results/mailbox-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$(dirname "$OUT")"

matrix_pop3_peers() { local r=(); for p in $PEERS; do case $p in dovecot) r+=(dovecot);; twistd) r+=(twistd-mail);; esac; done; (IFS=,; echo "${r[*]:-none}"); }
matrix_imap_peers() { local r=(); for p in $PEERS; do case $p in dovecot) r+=(dovecot);; esac; done; (IFS=,; echo "${r[*]:-none}"); }

D=$(mktemp -d /tmp/mailgw-mbox.XXXXXX)
MAILGW_PID=""
STARTED_PEERS=()
SLEEP_PID=""

trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- 1. config and user
cat > "$D/mailgw.toml" <<EOF
# written by bench/mailbox.sh
[server]
hostname = "mx.gw.test"
local_domains = ["gw.test"]
trusted_networks = ["127.0.0.0/8"]
data_dir = "$D/data"

# Dovecot's peer config has ssl = no and disable_plaintext_auth = no: for the like-for-like
# comparison mailgw accepts USER/PASS and LOGIN on the plain listeners too (default false).
[pop3]
allow_plaintext_auth = true

[imap]
allow_plaintext_auth = true
# imap_idle_memory.py holds 1,000 connections from 127.0.0.1 (defaults 1000 / 50)
max_connections = 1100
max_connections_per_ip = 1100

[[listeners]]
role = "relay"
endpoint = "tcp:$SMTP_PORT:interface=127.0.0.1"

[[listeners]]
role = "pop3"
endpoint = "tcp:$POP3_PORT:interface=127.0.0.1"

[[listeners]]
role = "pop3s"
endpoint = "tcp:$POP3S_PORT:interface=127.0.0.1"

[[listeners]]
role = "imap"
endpoint = "tcp:$IMAP_PORT:interface=127.0.0.1"

[[listeners]]
role = "imaps"
endpoint = "tcp:$IMAPS_PORT:interface=127.0.0.1"
EOF
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
echo secret | timeout 60 "$PYTHON" -m mailgw.cli users add alice@gw.test --config "$D/mailgw.toml"
timeout 60 "$PYTHON" -m mailgw.cli check --config "$D/mailgw.toml"

# ---- 2. mailgw
for p in $SMTP_PORT $POP3_PORT $POP3S_PORT $IMAP_PORT $IMAPS_PORT; do
  if port_open "$p"; then echo "port $p is already in use (try --port-base N)" >&2; exit 1; fi
done
ulimit -n 4096 2>/dev/null || true   # mailgw inherits it: 1,000 IDLE sockets + Maildir files
(cd "$D" && exec setsid "$TWISTD" -n --pidfile "$D/mailgw.pid" --logfile "$D/mailgw.log" \
    mailgw --config "$D/mailgw.toml" < /dev/null > "$D/stdout.log" 2>&1) &
MAILGW_PID=$!
for _ in $(seq 1 200); do
  port_open "$IMAPS_PORT" && break
  kill -0 "$MAILGW_PID" 2>/dev/null || { cat "$D/stdout.log" "$D/mailgw.log" 2>/dev/null; exit 1; }
  sleep 0.1
done
port_open "$IMAPS_PORT" || { echo "mailgw did not open $IMAPS_PORT" >&2; exit 1; }
[ "$(tr -d ' \n' < "$D/mailgw.pid")" = "$MAILGW_PID" ] || { echo "pidfile mismatch" >&2; exit 1; }
MAILDIR="$D/data/mail/gw.test/alice"
echo "mailgw pid $MAILGW_PID: relay $SMTP_PORT pop3 $POP3_PORT pop3s $POP3S_PORT imap $IMAP_PORT imaps $IMAPS_PORT, data $D/data"
if [ -n "$SERVE" ]; then
  echo "serving: --pidfile $D/mailgw.pid, Maildir $MAILDIR; log $D/mailgw.log;" \
       "stopping after $SERVE s (or kill -TERM $$)"
  sleep "$SERVE" & SLEEP_PID=$!
  wait "$SLEEP_PID" || true
  exit 0
fi

# ---- 3. peers
for p in $PEERS; do
  if peer_alive "$p"; then echo "peer $p already running: left running at exit"
  else STARTED_PEERS+=("$p"); fi
done
if [ ${#STARTED_PEERS[@]} -gt 0 ]; then
  timeout 300 "$BENCH/peers/start-peers.sh" "${STARTED_PEERS[@]}"
fi

# ---- environment
{
  echo "date: $(date -u +%FT%TZ)"
  echo "mode: mailbox (POP3 + IMAP), plaintext targets with allow_plaintext_auth = true (as Dovecot's peer: ssl = no)$( [ "$TLS_TARGETS" = 1 ] && echo '; mailgw-tls = implicit TLS (pop3s/imaps)')"
  echo "nproc: $(nproc)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
  echo "mem: $(free -g | awk '/Mem:/{print $2 " GiB"}')"
  echo "kernel: $(uname -r)"
  echo "fs of $D: $(df -T "$D" | awk 'NR==2{print $1, $2}')"
  echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "python: $("$PYTHON" -V 2>&1)"
  echo "twisted: $("$PYTHON" -c 'import twisted; print(twisted.__version__)')"
  echo "dovecot: $(dovecot --version 2>/dev/null || echo '?')"
  echo "mailgw git: $(git -C "$REPO" rev-parse --short HEAD) (+ uncommitted changes: $(git -C "$REPO" status --porcelain | wc -l) paths)"
  echo "mailgw source sha256: $(cd "$REPO" && find mailgw twisted/plugins -name '*.py' -o -name '*.toml' | sort | xargs cat | sha256sum | cut -c1-16)"
  echo "mailgw uncommitted in mailgw/: $(git -C "$REPO" status --porcelain -- mailgw twisted | tr '\n' ' ')"
  echo "pop3 K: $POP3_K  imap K: $IMAP_K  reps: $REPS"
} | tee "$OUT.env.txt"

# ---- 4. the matrix
COMMON="user=alice@gw.test:pass=secret:pid=$D/mailgw.pid"
ARGS=(--target-pop3 "mailgw=$POP3_PORT:$COMMON:fill=$SMTP_PORT:maildir=$MAILDIR"
      --target-imap "mailgw=$IMAP_PORT:$COMMON:fill=$SMTP_PORT:maildir=$MAILDIR")
if [ "$TLS_TARGETS" = 1 ]; then
  ARGS+=(--target-pop3 "mailgw-tls=$POP3S_PORT:$COMMON:tls"
         --target-imap "mailgw-tls=$IMAPS_PORT:$COMMON:tls")
fi
echo "run_matrix: --reps $REPS --only pop3,imap --pop3-peers $(matrix_pop3_peers) --imap-peers $(matrix_imap_peers) ${ARGS[*]}"
(cd "$BENCH" && timeout 3000 "$PYTHON" peers/run_matrix.py --out "$D/matrix" --reps "$REPS" \
    --only pop3,imap --pop3-peers "$(matrix_pop3_peers)" --imap-peers "$(matrix_imap_peers)" \
    --pop3-messages "$POP3_K" --imap-messages "$IMAP_K" "${ARGS[@]}") | tee "$OUT.txt"
for ext in jsonl summary.json ratios.json; do cp "$D/matrix.$ext" "$OUT.$ext"; done

# ---- 5. IDLE memory
if [ -n "$IDLE" ]; then
  timeout 300 "$PYTHON" "$HERE/imap_idle_memory.py" --port "$IMAPS_PORT" --tls -n "$IDLE" \
      --login alice@gw.test:secret --pidfile "$D/mailgw.pid" | tee "$OUT.idle.json"
fi

echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT.env.txt"
echo "mailgw log: $(cat "$D"/mailgw.log* | grep -c 'Traceback' || true) tracebacks" | tee -a "$OUT.txt"
echo "results: $OUT.{txt,jsonl,summary.json,ratios.json,env.txt}$( [ -n "$IDLE" ] && echo ',idle.json')"
