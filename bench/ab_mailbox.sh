#!/bin/bash
# A/B of two mailgw builds under the mailbox workloads (POP3 and IMAP): the commit REV (checked
# out into a scratch git worktree) against this work tree, same config, runs interleaved
# old/new, per-pair figures, medians and the new/old ratio. bench/ab.sh's idea for mailbox.sh's
# workloads (no Dovecot here: both sides are mailgw).
#
#   bench/ab_mailbox.sh REV [--pairs N] [--pin] [--pop3-messages K] [--imap-messages K]
#                           [--size BYTES] [--port-base N] [--out PREFIX] [--keep-data]
#
# Defaults: --pairs 10 --pop3-messages 2000 --imap-messages 10000 --size 4096 (mailbox.sh's
# sizes): about 2 minutes on 2 vCPUs (2 min 10 s measured with --pin): ~1 min for start-up
# and the SMTP fills (12,000 messages per build), ~6 s per pair.
#   1. scratch dir /tmp/mailgw-abmbox.XXXXXX: REV's worktree in old/, and per build a data dir
#      data-old/ data-new/ with one mailgw.toml each, the same but for data_dir and ports: mailbox.sh's
#      plaintext part ([pop3] / [imap] allow_plaintext_auth = true, as for its like-for-like run
#      against Dovecot; no TLS listeners), listeners on 127.0.0.1 relay / pop3 / imap =
#      old 2581 / 1181 / 1185, new 2582 / 1182 / 1186 (--port-base N adds N); users
#      alice@gw.test (the POP3 mailbox) and bob@gw.test (the IMAP one), password secret, made
#      with each build's own `mailgw.cli users add`. (mailbox.sh --serve, which has
#      --port-base, is not reused: it opens TLS listeners too and serves one user; and this
#      way both builds get the same config whatever REV's bench/mailbox.sh writes.)
#   2. each build: PYTHONPATH=TREE setsid twistd -n --pidfile D/mailgw.pid mailgw --config
#      D/mailgw.toml, as mailbox.sh starts it (with --pin under taskset -c 0).
#   3. fills each mailbox once through that build's own relay listener (mailbench fill -c 8
#      -m 50, as run_matrix does) with the same command and --run-id for both builds, so the
#      messages are the same but for the headers each server adds and Message-ID / Date;
#      waits until the Maildir holds them. The bytes each side then serves are printed.
#   4. one cold run of each workload per build (printed, not in the medians), then N pairs:
#      POP3 = mailbench pop3 (USER/PASS, STAT, LIST, UIDL, RETR all: run_matrix's pop3) and
#      IMAP = mailbench imap (LOGIN, SELECT, FETCH 1:* meta, FETCH 1:* BODY.PEEK[],
#      UID SEARCH HEADER X-Mailbench-Seq "000777": 1 hit, STORE +FLAGS), each with --cpu-pidfile (mailgw's CPU); old first in
#      odd pairs, new first in even ones.
#   5. per run the figures mailbench gives; then per build the medians and new/old (ratio of
#      the medians; >1 = new faster for msgs/s, <1 = new faster / cheaper for s and CPU) with
#      the range of the per-pair ratios.
# --pin: both builds' mailgw (every process and thread: twistd is started under taskset) on
#   CPU 0, every mailbench on CPU 1. Default: nothing pinned.
# --out PREFIX: also PREFIX.txt (what is printed) and PREFIX.jsonl (every mailbench line with
#   build, workload, pair). --keep-data keeps the scratch dir (the worktree is removed).
# Everything it started is stopped by its PID on exit (also Ctrl-C / SIGTERM); scratch removed.
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
case "${1:-}" in ""|-h|--help) sed -n '2,41p' "$0"; exit 2 ;; esac
REV=$1; shift
PAIRS=10; PIN=0; POP3_K=2000; IMAP_K=10000; SIZE=4096; BASE=0; OUT=""; KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --pairs) PAIRS=$2; shift 2 ;;
    --pin) PIN=1; shift ;;
    --pop3-messages) POP3_K=$2; shift 2 ;;
    --imap-messages) IMAP_K=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    --port-base) BASE=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --keep-data) KEEP=1; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
for v in "$PAIRS" "$POP3_K" "$IMAP_K" "$SIZE" "$BASE"; do
  [[ "$v" =~ ^[0-9]+$ ]] || { echo "not a number: $v" >&2; exit 2; }
done
[ "$PAIRS" -ge 1 ] && [ "$PAIRS" -le 100 ] || { echo "--pairs: 1..100" >&2; exit 2; }
[ "$POP3_K" -ge 1 ] && [ "$IMAP_K" -ge 1 ] && [ "$POP3_K" -le 100000 ] && [ "$IMAP_K" -le 100000 ] \
  || { echo "--pop3-messages / --imap-messages: 1..100000" >&2; exit 2; }
if [ "$PIN" = 1 ]; then
  command -v taskset > /dev/null || { echo "--pin needs taskset (util-linux)" >&2; exit 1; }
  [ "$(nproc)" -ge 2 ] || { echo "--pin needs 2 CPUs" >&2; exit 1; }
  SRV=(taskset -c 0); GEN=(taskset -c 1); PINNED="pinned: mailgw CPU 0, mailbench CPU 1"
else
  SRV=(); GEN=(); PINNED="not pinned"
fi
[ -n "$OUT" ] && mkdir -p "$(dirname "$OUT")"

T=$(mktemp -d /tmp/mailgw-abmbox.XXXXXX)
declare -A PID=() TREE=() RELAY_PORT=() POP3_PORT=() IMAP_PORT=()
TREE[old]=$T/old;  RELAY_PORT[old]=$((2581 + BASE)); POP3_PORT[old]=$((1181 + BASE)); IMAP_PORT[old]=$((1185 + BASE))
TREE[new]=$REPO;   RELAY_PORT[new]=$((2582 + BASE)); POP3_PORT[new]=$((1182 + BASE)); IMAP_PORT[new]=$((1186 + BASE))

stop_mailgw() {   # name: TERM, KILL after 10 s, by its PID
  local pid=${PID[$1]:-}
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid"
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
  echo "mailgw $1 (pid $pid) stopped"
}
cleanup() {
  local rc=$?
  set +e
  stop_mailgw old; stop_mailgw new
  git -C "$REPO" worktree remove --force "$T/old" 2>/dev/null
  git -C "$REPO" worktree prune
  if [ "$KEEP" = 1 ]; then echo "data kept in $T"; else rm -rf "$T"; fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for name in old new; do
  for p in ${RELAY_PORT[$name]} ${POP3_PORT[$name]} ${IMAP_PORT[$name]}; do
    if port_open "$p"; then echo "port $p is already in use (try --port-base N)" >&2; exit 1; fi
  done
done
git -C "$REPO" worktree add --detach "$T/old" "$REV" > /dev/null

# ---- 1-2. config, users, mailgw (the same config for both builds but for data_dir and ports)
start_build() {   # name
  local name=$1 d=$T/data-$1 tree=${TREE[$1]}
  mkdir -p "$d"
  cat > "$d/mailgw.toml" <<EOF
# written by bench/ab_mailbox.sh ($name build)
[server]
hostname = "mx.gw.test"
local_domains = ["gw.test"]
trusted_networks = ["127.0.0.0/8"]
data_dir = "$d/data"

# as bench/mailbox.sh for its like-for-like run against Dovecot (ssl = no)
[pop3]
allow_plaintext_auth = true

[imap]
allow_plaintext_auth = true

[[listeners]]
role = "relay"
endpoint = "tcp:${RELAY_PORT[$name]}:interface=127.0.0.1"

[[listeners]]
role = "pop3"
endpoint = "tcp:${POP3_PORT[$name]}:interface=127.0.0.1"

[[listeners]]
role = "imap"
endpoint = "tcp:${IMAP_PORT[$name]}:interface=127.0.0.1"
EOF
  for u in alice@gw.test bob@gw.test; do
    echo secret | PYTHONPATH=$tree timeout 60 "$PYTHON" -m mailgw.cli users add "$u" \
        --config "$d/mailgw.toml" > /dev/null
  done
  PYTHONPATH=$tree timeout 60 "$PYTHON" -m mailgw.cli check --config "$d/mailgw.toml" > "$d/check.log" 2>&1 \
    || { echo "mailgw check failed ($name build):"; cat "$d/check.log"; return 1; }
  (cd "$d" && PYTHONPATH=$tree exec setsid "${SRV[@]}" "$TWISTD" -n --pidfile "$d/mailgw.pid" \
      --logfile "$d/mailgw.log" mailgw --config "$d/mailgw.toml" < /dev/null > "$d/stdout.log" 2>&1) &
  PID[$name]=$!   # `exec` (and setsid, taskset) keep the PID: this is twistd itself
  for _ in $(seq 1 200); do
    port_open "${IMAP_PORT[$name]}" && port_open "${POP3_PORT[$name]}" && port_open "${RELAY_PORT[$name]}" && break
    kill -0 "${PID[$name]}" 2>/dev/null || { echo "mailgw $name exited:"; cat "$d/stdout.log" "$d/mailgw.log" 2>/dev/null | tail -30; return 1; }
    sleep 0.1
  done
  port_open "${IMAP_PORT[$name]}" || { echo "mailgw $name did not open its ports" >&2; return 1; }
  [ "$(tr -d ' \n' < "$d/mailgw.pid")" = "${PID[$name]}" ] || { echo "pidfile mismatch ($name)" >&2; return 1; }
}
start_build old
start_build new

out() { if [ -n "$OUT" ]; then tee -a "$OUT.txt"; else cat; fi; }
[ -n "$OUT" ] && : > "$OUT.txt" && : > "$OUT.jsonl"
{
  echo "A/B mailbox: old = $REV ($(git -C "$REPO" rev-parse --short "$REV")), new = work tree at" \
       "$(git -C "$REPO" rev-parse --short HEAD) (+ $(git -C "$REPO" status --porcelain -- mailgw | wc -l)" \
       "changed paths under mailgw/); POP3 $POP3_K x $SIZE B, IMAP $IMAP_K x $SIZE B, plaintext," \
       "$PAIRS pairs; $PINNED; load $(cut -d' ' -f1-3 /proc/loadavg)"
  for name in old new; do
    echo "  $name: pid ${PID[$name]}, relay ${RELAY_PORT[$name]} pop3 ${POP3_PORT[$name]}" \
         "imap ${IMAP_PORT[$name]}; $(tree_affinity "${PID[$name]}")"
  done
} | out

# ---- 3. fill (the same messages for both builds)
RUN_ID=abmbox$(date +%s | tail -c 7)
for name in old new; do
  d=$T/data-$name
  for spec in "alice:$POP3_K" "bob:$IMAP_K"; do
    user=${spec%%:*}; k=${spec#*:}
    md=$d/data/mail/gw.test/$user
    t0=$SECONDS
    r=$(timeout 900 "${GEN[@]}" "$PYTHON" "$BENCH/mailbench.py" fill --port "${RELAY_PORT[$name]}" \
          -n "$k" -s "$SIZE" -c 8 -m 50 --to "$user@gw.test" --run-id "$RUN_ID" \
          --until-maildir "$md" --deadline 800 | tail -n1) || true
    have=$(( $(ls "$md/new" 2>/dev/null | wc -l) + $(ls "$md/cur" 2>/dev/null | wc -l) ))
    echo "fill $name $user@: $have of $k in the Maildir ($((SECONDS - t0)) s)" | out
    [ "$have" = "$k" ] || { echo "fill failed: $r" | out; exit 1; }
  done
done

# ---- 4. cold runs, then the pairs
RC=0
# UID SEARCH HEADER X-Mailbench-Seq: run_matrix's "000777" (1 hit), or the middle one if fewer
SEARCH=$(printf '%06d' $(( IMAP_K > 777 ? 777 : IMAP_K / 2 )))
run() {   # name kind pair -> one JSON line
  local name=$1 kind=$2 pair=$3 port user r extra
  if [ "$kind" = pop3 ]; then port=${POP3_PORT[$name]}; user=alice; extra=()
  else port=${IMAP_PORT[$name]}; user=bob; extra=(--search-value "$SEARCH"); fi
  r=$(timeout 900 "${GEN[@]}" "$PYTHON" "$BENCH/mailbench.py" "$kind" --port "$port" "${extra[@]}" \
        --login "$user@gw.test:secret" --cpu-pidfile "$T/data-$name/mailgw.pid" --deadline 800 | tail -n1) || true
  "$PYTHON" -c 'import json, sys
r = json.loads(sys.argv[1]) if sys.argv[1].startswith("{") else {"result": {"fatal": "no JSON: " + sys.argv[1][:200]}}
r["meta"] = {"build": sys.argv[2], "kind": sys.argv[3], "pair": sys.argv[4]}
print(json.dumps(r))' "$r" "$name" "$kind" "$pair"
}
{
  for name in old new; do run "$name" pop3 cold; run "$name" imap cold; done
  for i in $(seq 1 "$PAIRS"); do
    if [ $((i % 2)) = 1 ]; then order="old new"; else order="new old"; fi
    for kind in pop3 imap; do
      for name in $order; do run "$name" "$kind" "$i"; done
    done
  done
} | if [ -n "$OUT" ]; then tee -a "$OUT.jsonl"; else cat; fi | "$PYTHON" -c "$(cat <<'PY'
import json, statistics, sys
KEYS = {"pop3": [("msgs_per_s", "msgs/s", "%.0f"), ("retr_msgs_per_s", "RETR/s", "%.0f"),
                 ("list_s", "LIST s", "%.3f"), ("uidl_s", "UIDL s", "%.3f"), ("retr_s", "RETR s", "%.3f"),
                 ("seconds", "total s", "%.3f"), ("server_cpu_ms_per_msg", "CPU ms/msg", "%.3f")],
        "imap": [("select_s", "SELECT s", "%.3f"), ("fetch_meta_s", "FETCH meta s", "%.3f"),
                 ("fetch_body_s", "FETCH body s", "%.3f"), ("search_s", "SEARCH s", "%.3f"),
                 ("store_s", "STORE s", "%.3f"), ("seconds", "total s", "%.3f"),
                 ("server_cpu_ms_per_msg", "CPU ms/msg", "%.3f")]}
NOISE = [("host_busy_pct", "busy %", "%.0f"), ("other_cpu_s", "other CPU s", "%.2f")]
CHECK = {"pop3": ("messages", "bytes", "size_mismatches"),
         "imap": ("exists", "fetch_body_bytes", "search_hits")}
runs = {}
failed = 0
for line in sys.stdin:
    rec = json.loads(line)
    m, r = rec["meta"], rec.get("result", {})
    kind = m["kind"]
    if "fatal" in r:
        failed += 1
        print(f"{kind} {m['build']} pair {m['pair']}: FAILED {r['fatal']}", flush=True)
        continue
    label = "cold  " if m["pair"] == "cold" else "pair " + m["pair"]
    print(f"{kind} {m['build']} {label}:",
          "  ".join(f"{lab} " + (fmt % r[k] if r.get(k) is not None else "-") for k, lab, fmt in KEYS[kind] + NOISE),
          " (" + " ".join(f"{k} {r.get(k)}" for k in CHECK[kind]) + ")", flush=True)
    if m["pair"] != "cold":
        runs.setdefault(kind, {}).setdefault(m["build"], {})[m["pair"]] = r
for kind in ("pop3", "imap"):
    by = runs.get(kind, {})
    old, new = by.get("old", {}), by.get("new", {})
    if not old or not new:
        print(f"{kind}: no complete pairs"); continue
    def median(rs, k):
        vals = [r[k] for r in rs.values() if r.get(k) is not None]
        return statistics.median(vals) if vals else float("nan")
    med = {b: {k: median(rs, k) for k, _, _ in KEYS[kind] + NOISE}
           for b, rs in (("old", old), ("new", new))}
    for b in ("old", "new"):
        print(f"median {kind} {b}:", "  ".join(f"{lab} " + fmt % med[b][k] for k, lab, fmt in KEYS[kind]))
    both = sorted(set(old) & set(new), key=int)
    parts = []
    for k, lab, _ in KEYS[kind]:
        ratio = med["new"][k] / med["old"][k] if med["old"][k] else float("nan")
        per = [new[p][k] / old[p][k] for p in both if old[p].get(k) and new[p].get(k) is not None]
        rng = f" [{min(per):.2f}-{max(per):.2f}]" if len(per) > 1 else ""
        parts.append(f"{lab} {ratio:.3f}{rng}")
    print(f"new/old {kind}:", "  ".join(parts), f"({len(both)} pairs)")
    sizes = {b: {r.get(CHECK[kind][1]) for r in rs.values()} for b, rs in (("old", old), ("new", new))}
    print(f"  {kind} {CHECK[kind][1]} served: old {sorted(sizes['old'])}, new {sorted(sizes['new'])}")
sys.exit(1 if failed else 0)
PY
)" | out || RC=1
{
  for name in old new; do
    echo "affinity at end $name: $(tree_affinity "${PID[$name]}");" \
         "log: $(cat "$T/data-$name"/mailgw.log* 2>/dev/null | grep -c Traceback || true) tracebacks"
  done
  echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
} | out
exit $RC
