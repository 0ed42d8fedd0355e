#!/bin/sh
# Smoke scenario: proves the box is what vmhop's NUMA tests need — two NUMA
# nodes with one CPU each and a working /dev/kvm. Exits non-zero otherwise.
set -eu

for n in /sys/devices/system/node/node*; do
    echo "numabox-smoke: $n cpulist=$(cat "$n/cpulist")" \
        "$(grep MemTotal "$n/meminfo" | sed 's/.*MemTotal: *//')"
done
for n in node0 node1; do
    if [ ! -d "/sys/devices/system/node/$n" ]; then
        echo "numabox-smoke: /sys/devices/system/node/$n missing"
        exit 1
    fi
done
if [ ! -c /dev/kvm ]; then
    echo "numabox-smoke: /dev/kvm missing"
    exit 1
fi
echo "numabox-smoke: /dev/kvm present"

if [ -x /bin/vmhop ]; then
    /bin/vmhop --version || true
else
    echo "numabox-smoke: no /bin/vmhop in this box"
fi
echo "numabox-smoke: ok"
