#!/usr/bin/env bash
# Reads this machine's settings and prints what limits how many connections a Comet
# node can hold here, and what to change. Runs unprivileged and changes nothing unless
# given --apply (which needs root and installs 99-comet.conf with sysctl).
#
#   bash tuning/check.sh [--target N] [--apply]
set -euo pipefail

target=1000000
apply=false
while (($#)); do
    case "$1" in
        --target)
            if [[ $# -lt 2 || ! "$2" =~ ^[0-9]+$ ]]; then
                echo "--target needs a number of connections" >&2
                exit 2
            fi
            target="$2"; shift 2 ;;
        --apply) apply=true; shift ;;
        -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done

here="$(cd "$(dirname "$0")" && pwd)"
read_sysctl() { cat "/proc/sys/${1//.//}" 2>/dev/null || echo "n/a"; }
advice=()
verdict() { # name current wanted explanation
    local name="$1" current="$2" wanted="$3" why="$4"
    local mark="ok  "
    if [[ "$current" == "n/a" ]]; then
        mark="n/a "
    elif ((current < wanted)); then
        mark="LOW "
        advice+=("$name: $current -> $wanted ($why)")
    fi
    printf '%s %-34s %12s   (want >= %s)\n' "$mark" "$name" "$current" "$wanted"
}

echo "Comet capacity check for $target connections on $(hostname) ($(uname -r))"
echo
soft=$(ulimit -Sn); hard=$(ulimit -Hn)
[[ "$hard" == "unlimited" ]] && hard=$((1 << 30))
[[ "$soft" == "unlimited" ]] && soft=$hard
echo "Descriptors (each client is one; Comet raises soft to hard at start):"
verdict "ulimit -Hn (this shell)" "$hard" "$((target + 1024))" "LimitNOFILE in comet.service"
verdict "fs.nr_open" "$(read_sysctl fs.nr_open)" "$((target + 1024))" "ceiling for LimitNOFILE"
verdict "fs.file-max" "$(read_sysctl fs.file-max)" "$((target + 65536))" "system-wide descriptors"
echo
echo "Accept queues (reconnect storms):"
verdict "net.core.somaxconn" "$(read_sysctl net.core.somaxconn)" 4096 "listen backlog cap"
verdict "net.ipv4.tcp_max_syn_backlog" "$(read_sysctl net.ipv4.tcp_max_syn_backlog)" 4096 "half-open connections"
echo
echo "Memory:"
mem_kib=$(awk '/MemTotal/ {print $2}' /proc/meminfo)
tcp_mem_max=$(awk '{print $3}' /proc/sys/net/ipv4/tcp_mem 2>/dev/null || echo 0)
rmem_default=$(awk '{print $2}' /proc/sys/net/ipv4/tcp_rmem 2>/dev/null || echo 0)
wmem_default=$(awk '{print $2}' /proc/sys/net/ipv4/tcp_wmem 2>/dev/null || echo 0)
# Measured: ~10 KB kernel per loopback connection pair (socket structures, not tcp_mem);
# ~1.5-3 KB in Comet per idle client.
per_conn=$((5 * 1024 + 3 * 1024))
by_memory=$((mem_kib * 1024 * 7 / 10 / per_conn))
# tcp_mem counts only queued bytes: an idle socket holds no pages (3,000 idle loopback
# pairs: +0 pages), one with a small unread message holds one (+1.02 pages each). So it
# caps how many clients may have a message in flight at once, as a broadcast to all does.
by_tcp_mem=$tcp_mem_max
printf '     %-34s %12s KiB\n' "MemTotal" "$mem_kib"
printf '     %-34s %12s pages (max; a broadcast holds ~1 per client until read)\n' "net.ipv4.tcp_mem" "$tcp_mem_max"
# The cap --apply would set: 25% of RAM (6 GiB fixed was 75% of an 8 GiB host).
tcp_mem_want_max=$((mem_kib / 4 / 4))
tcp_mem_want="$((tcp_mem_want_max / 2)) $((tcp_mem_want_max * 2 / 3)) $tcp_mem_want_max"
printf '     %-34s %12s pages (25%% of MemTotal)\n' "tcp_mem max --apply sets" "$tcp_mem_want_max"
printf '     %-34s %12s / %s bytes\n' "tcp_rmem / tcp_wmem default" "$rmem_default" "$wmem_default"
echo
echo "Drains (one server-side TIME-WAIT per client, orphans of silent clients):"
verdict "net.ipv4.tcp_max_tw_buckets" "$(read_sysctl net.ipv4.tcp_max_tw_buckets)" "$((target * 2))" "TIME-WAIT sockets of two drains"
verdict "net.ipv4.tcp_max_orphans" "$(read_sysctl net.ipv4.tcp_max_orphans)" "$((target / 2))" "closed sockets whose peer has not answered"
echo
if [[ -r /proc/sys/net/netfilter/nf_conntrack_max ]]; then
    echo "Connection tracking is loaded:"
    verdict "net.netfilter.nf_conntrack_max" "$(read_sysctl net.netfilter.nf_conntrack_max)" "$((target * 2))" "full table drops new connections"
    echo
fi

limit=$hard
reason="open-files hard limit"
nr_open=$(read_sysctl fs.nr_open)
if [[ "$nr_open" != "n/a" ]] && ((nr_open < limit)); then limit=$nr_open; reason="fs.nr_open"; fi
if ((by_memory < limit)); then limit=$by_memory; reason="memory (70% of RAM at ~8 KiB per connection)"; fi
if ((by_tcp_mem > 0 && by_tcp_mem < limit)); then limit=$by_tcp_mem; reason="net.ipv4.tcp_mem (one page per client a broadcast reaches at once)"; fi
unit_nofile=$(awk -F= '/^LimitNOFILE=/ {print $2}' "$here/comet.service")
if [[ "$nr_open" != "n/a" && -n "$unit_nofile" ]] && ((unit_nofile > nr_open)); then
    advice+=("fs.nr_open: $nr_open -> $((unit_nofile + 1024)) (comet.service's LimitNOFILE=$unit_nofile is above it: apply 99-comet.conf before starting the unit, or systemd cannot set the limit)")
fi
echo "=> about $limit connections here, limited by $reason."
if ((${#advice[@]})); then
    echo
    echo "To reach $target, change:"
    printf '   - %s\n' "${advice[@]}"
    echo "   (tuning/99-comet.conf and tuning/comet.service carry these values; see tuning/README.md)"
fi

if $apply; then
    if [[ $(id -u) -ne 0 ]]; then
        echo "--apply needs root" >&2
        exit 1
    fi
    # tcp_mem from this host's MemTotal, not the file's fixed 6 GiB.
    sed "s/^net.ipv4.tcp_mem = .*/net.ipv4.tcp_mem = $tcp_mem_want/" "$here/99-comet.conf" >/etc/sysctl.d/99-comet.conf
    chmod 0644 /etc/sysctl.d/99-comet.conf
    # Keys this kernel lacks (nf_conntrack_max without the module) are reported, not
    # fatal: the others must still be applied.
    if ! sysctl --system >/dev/null 2>&1; then
        echo "some keys of 99-comet.conf do not exist on this kernel (see sysctl --system); the rest were applied" >&2
    fi
    echo "applied /etc/sysctl.d/99-comet.conf (tcp_mem = $tcp_mem_want)"
    # The conntrack table's hash size is a module parameter, not a sysctl: without it
    # raised with nf_conntrack_max, each bucket's chain grows to max/hashsize entries.
    hashsize=/sys/module/nf_conntrack/parameters/hashsize
    if [[ -w $hashsize && -r /proc/sys/net/netfilter/nf_conntrack_max ]]; then
        buckets=$(($(cat /proc/sys/net/netfilter/nf_conntrack_max) / 4))
        if (($(cat "$hashsize") < buckets)); then
            echo "$buckets" >"$hashsize" && echo "raised nf_conntrack hashsize to $buckets (nf_conntrack_max / 4)"
        fi
    fi
fi
