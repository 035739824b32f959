# Shell helpers shared by the bench scripts (sourced, not run).
#
# The scripts that start mailgw set D (scratch dir), MAILGW_PID, STARTED_PEERS (peers
# they started), SLEEP_PID (--serve), KEEP and BENCH, then `trap cleanup EXIT`.

# A peer started by /work/shared/bench/peers/start-peers.sh is running.
peer_alive() {
  local f=/tmp/peers/pids/$1.pid
  [ -f "$f" ] && kill -0 "$(head -n1 "$f" | tr -d ' ')" 2>/dev/null
}

# Something accepts connections on 127.0.0.1:$1.
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# On exit: stop mailgw by its PID (TERM, KILL after 10 s) and only the peers this
# script started; remove the scratch dir unless --keep-data.
cleanup() {
  local rc=$?
  set +e
  [ -n "$SLEEP_PID" ] && kill "$SLEEP_PID" 2>/dev/null
  if [ -n "$MAILGW_PID" ] && kill -0 "$MAILGW_PID" 2>/dev/null; then
    kill -TERM "$MAILGW_PID"
    for _ in $(seq 1 100); do kill -0 "$MAILGW_PID" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$MAILGW_PID" 2>/dev/null && kill -KILL "$MAILGW_PID"
    echo "mailgw pid $MAILGW_PID stopped"
  fi
  if [ ${#STARTED_PEERS[@]} -gt 0 ]; then
    "$BENCH/peers/stop-peers.sh" "${STARTED_PEERS[@]}"
  fi
  if [ "$KEEP" = 1 ]; then echo "data kept in $D"; else rm -rf "$D"; fi
  exit $rc
}

# Stop the `--serve` runs this script started in the background (their PIDs in the array
# SERVERS) and wait for each: every one stops its own mailgw on TERM.
stop_servers() {
  local pid
  for pid in "${SERVERS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  for pid in "${SERVERS[@]}"; do wait "$pid" 2>/dev/null; done
}

# The PIDs of the process tree under $1 (itself first), from ps: mailgw's main and its
# SMTP workers (and any process they started).
tree_pids() {
  ps -e -o pid=,ppid= | awk -v root="$1" '
    { kids[$2] = kids[$2] " " $1 }
    END { q[1] = root; n = 1
          for (i = 1; i <= n; i++) { print q[i]; m = split(kids[q[i]], a, " ")
                                     for (j = 1; j <= m; j++) q[++n] = a[j] } }'
}

# Pin every thread of every process in the tree under $2 to CPU(s) $1 (taskset -a -p -c);
# processes and threads started later inherit it from their parent.
pin_tree() {
  local pid
  for pid in $(tree_pids "$2"); do taskset -a -p -c "$1" "$pid" > /dev/null; done
}

# "P processes, T threads, Cpus_allowed_list L" for the tree under $1 (L: the distinct
# lists of all its threads, comma-separated when they differ).
tree_affinity() {
  local pids procs=0 threads=0 lists="" pid
  pids=$(tree_pids "$1")
  for pid in $pids; do
    [ -d "/proc/$pid/task" ] || continue
    procs=$((procs + 1))
    threads=$((threads + $(ls "/proc/$pid/task" | wc -l)))
    lists="$lists $(cat /proc/"$pid"/task/*/status 2>/dev/null | awk '/^Cpus_allowed_list/{print $2}')"
  done
  echo "$procs processes, $threads threads, Cpus_allowed_list $(echo "$lists" | tr ' ' '\n' | sed '/^$/d' | sort -u | paste -sd, -)"
}
