#!/bin/bash
# A/B: mtp serve --backend llama.cpp plain at one streaming client, old (OLD_SRC: a checkout's src) and new (this tree), alternating, ROUNDS rounds (default 3)
cd "$(git rev-parse --show-toplevel)"
for round in $(seq ${ROUNDS:-3}); do
  for v in old new; do
    if [ $v = old ]; then export PYTHONPATH=${OLD_SRC:?a checkout of the commit before the fix: OLD_SRC=/path/src}; else unset PYTHONPATH; fi
    .venv/bin/python -m mtp serve --model smollm2-135m --method plain --backend llama.cpp --quiet --port 8123 > /dev/null 2>&1 &
    for i in $(seq 60); do curl -s localhost:8123/health >/dev/null && break; sleep 1; done
    unset PYTHONPATH
    echo "$v $(.venv/bin/python docs/results/llamacpp_backend/serve_thread/client.py 6 | awk '{print $3}' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')"
    kill %1; wait
  done
done
