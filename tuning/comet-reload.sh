#!/bin/bash
# Zero-downtime restart that waits for its outcome (the unit's ExecReload):
#   comet-reload.sh PID [UNIT]
# Sends SIGUSR2 to the running node PID, then waits until systemd's MainPID of UNIT
# (default comet) is the successor (it sends READY=1 with its MAINPID once serving):
# exit 0. Exit 1 when the successor fails (the node reaps it, goes on serving and sets
# the unit's status text to "restart failed at ...": a successor that fails at once, a
# broken comet.ini, is seen that way; its child disappearing while MainPID stays is
# watched too), when the node itself exits, or after COMET_RELOAD_TIMEOUT seconds
# (default 35: the node kills a successor not ready in 30).
# Without it `systemctl reload` reported success before the successor was ready, even
# when it then failed.
set -u
old=${1:?usage: comet-reload.sh PID [UNIT]}
unit=${2:-comet}
limit=${COMET_RELOAD_TIMEOUT:-35}
main_pid() { systemctl show -p MainPID --value "$unit" 2>/dev/null; }
status_text() { systemctl show -p StatusText --value "$unit" 2>/dev/null; }
status_before=$(status_text)
kill -USR2 "$old" || { echo "comet-reload: cannot signal $old" >&2; exit 1; }
deadline=$((SECONDS + limit))
seen_successor=
while ((SECONDS < deadline)); do
    main=$(main_pid)
    if [[ -n $main && $main != 0 && $main != "$old" ]]; then
        echo "comet-reload: successor $main serving; $old drains"
        exit 0
    fi
    status=$(status_text)
    if [[ $status != "$status_before" && $status == "restart failed"* ]]; then
        echo "comet-reload: the successor failed; $old goes on serving ($status)" >&2
        exit 1
    fi
    if [[ -n $(pgrep -P "$old" 2>/dev/null) ]]; then
        seen_successor=1
    elif [[ -n $seen_successor ]]; then
        echo "comet-reload: the successor failed; $old goes on serving (see its log)" >&2
        exit 1
    fi
    if ! kill -0 "$old" 2>/dev/null; then
        echo "comet-reload: $old exited and no successor took over" >&2
        exit 1
    fi
    sleep 0.1
done
echo "comet-reload: no successor serving within ${limit}s" >&2
exit 1
