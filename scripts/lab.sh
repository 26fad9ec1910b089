#!/usr/bin/env bash
# The test lab (DESIGN.md §8): two "nodes" and four "pods", each a network namespace.
#
#   PREFIX-na (node-a) 10.250.0.1 ── veth ── 10.250.0.2 PREFIX-nb (node-b)
#     br0 10.250.1.1/24                         br0 10.250.2.1/24
#       ├─ PREFIX-a1 10.250.1.2                   ├─ PREFIX-b1 10.250.2.2
#       └─ PREFIX-a2 10.250.1.3                   └─ PREFIX-b2 10.250.2.3
#
# Addresses live only inside these namespaces, so labs with different prefixes can coexist.
# Usage: lab.sh up PREFIX [--v4-only POD...] | lab.sh down PREFIX
set -euo pipefail

cmd=${1:-}; prefix=${2:-}
[ -n "$cmd" ] && [ -n "$prefix" ] || { echo "usage: $0 up|down PREFIX [--v4-only POD...]" >&2; exit 2; }
shift 2

down() {
    for ns in a1 a2 b1 b2 na nb; do
        ip netns del "$prefix-$ns" 2>/dev/null || true
    done
}

node() { # name idx
    local ns="$prefix-$1"
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip netns exec "$ns" sysctl -qw net.ipv4.ip_forward=1
    ip -n "$ns" link add br0 type bridge
    ip -n "$ns" addr add "10.250.$2.1/24" dev br0
    ip -n "$ns" link set br0 up
}

pod() { # node pod ip gw
    local ns="$prefix-$2"
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip link add eth0 netns "$ns" type veth peer name "$2" netns "$prefix-$1"
    ip -n "$prefix-$1" link set "$2" master br0 up
    ip -n "$ns" addr add "$3/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" route add default via "$4"
}

up() {
    down
    node na 1
    node nb 2
    ip link add peer netns "$prefix-na" type veth peer name peer netns "$prefix-nb"
    ip -n "$prefix-na" addr add 10.250.0.1/24 dev peer
    ip -n "$prefix-nb" addr add 10.250.0.2/24 dev peer
    ip -n "$prefix-na" link set peer up
    ip -n "$prefix-nb" link set peer up
    ip -n "$prefix-na" route add 10.250.2.0/24 via 10.250.0.2
    ip -n "$prefix-nb" route add 10.250.1.0/24 via 10.250.0.1
    pod na a1 10.250.1.2 10.250.1.1
    pod na a2 10.250.1.3 10.250.1.1
    pod nb b1 10.250.2.2 10.250.2.1
    pod nb b2 10.250.2.3 10.250.2.1
    if [ "${1:-}" = "--v4-only" ]; then
        shift
        for p in "$@"; do
            ip netns exec "$prefix-$p" sysctl -qw net.ipv6.conf.all.disable_ipv6=1
        done
    fi
}

case "$cmd" in
    up) up "$@" ;;
    down) down ;;
    *) echo "unknown command $cmd" >&2; exit 2 ;;
esac
