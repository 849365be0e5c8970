#!/bin/bash
# Profile a 1 GiB random guest's migration a->b (1 stream and 2 streams) in a scratch lab.
set -e
cd /work/main
export FERRY_LAB_ROOT=/run/ferry/prof
F=target/debug/ferry
cargo xtask lab down --root /run/ferry/prof >/dev/null 2>&1 || true
cargo xtask lab up --name prof --root /run/ferry/prof --ferry-bin $F >/dev/null 2>&1
$F --host a vm create r --memory 1G --profile random --start >/dev/null
sleep 8
for s in 1 2; do
  perf record -F 999 -a -g -o /tmp/perf-s$s.data -- $F --host a migrate r --to b --streams $s 2>&1 | grep -E "total|downtime|link" | head -3
  $F --host b migrate r --to a --streams 2 >/dev/null 2>&1
  sleep 2
done
cargo xtask lab down --root /run/ferry/prof >/dev/null 2>&1
