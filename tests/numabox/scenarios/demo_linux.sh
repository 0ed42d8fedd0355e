#!/bin/sh
# The Linux demo (`vmhop demo --kernel`) inside the NUMA box: it must run all
# its steps and exit 0, once with the demo's own initramfs.
set -u
echo "demo-linux: running $VMHOP demo --kernel /files/vmlinuz"
"$VMHOP" demo --kernel /files/vmlinuz
rc=$?
echo "demo-linux: exit $rc"
exit $rc
