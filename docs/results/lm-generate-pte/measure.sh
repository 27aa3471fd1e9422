#!/bin/bash
# usage: measure.sh BUNDLE OUT
B=$1; OUT=$2
P="My favourite thing about living by the sea is that every morning I can walk along the beach and"
for round in 1 2; do
  for backend in onnx pte; do
    for cache in on off; do
      flag=""; [ $cache = off ] && flag="--no-cache"
      load=$(cut -d' ' -f1 /proc/loadavg)
      r=$(nice -n 5 .venv/bin/fedmobillm device generate --bundle $B --prompt "$P" --max-new-tokens 32 --threads 2 --json --backend $backend $flag 2>/dev/null | tail -1)
      echo "{\"round\": $round, \"backend\": \"$backend\", \"cache\": \"$cache\", \"load\": $load, \"result\": $r}" >> $OUT
    done
  done
done
