#!/bin/bash
# SMTP relay benchmark: mailgw relaying through its queue to Postfix smtp-sink, next to the
# Postfix relay peer (postfix-relay on 2526 -> the same smtp-sink on 2626), in one
# interleaved run; delivered msgs/s are counted at the sink for both.
#
#   bench/smtp_relay.sh [--reps N] [--out PREFIX] [--io-threads N] [--port P]
#                       [--peers "postfix-relay smtp-sink"] [--keep-data]
#   bench/smtp_relay.sh --serve SECONDS [--port P]      (mailgw + smtp-sink only, for profiling)
#
# This is bench/smtp_accept.sh --relay; see its header and bench/README.md.
exec "$(cd "$(dirname "$0")" && pwd)/smtp_accept.sh" --relay "$@"
