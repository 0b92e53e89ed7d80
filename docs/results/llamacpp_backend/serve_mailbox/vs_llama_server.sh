#!/bin/bash
# mtp serve --backend llama.cpp plain vs llama-server (same GGUF, 2 threads, one slot) at one streaming client, alternating, 3 rounds: median tokens/s per round
cd "$(git rev-parse --show-toplevel)"
G=$(.venv/bin/python -c "from mtp.engines.targets import target_gguf;print(target_gguf('smollm2-135m'))")
S=~/.cache/mtp/engines/llama.cpp-0.3.36/build/bin/llama-server
for round in 1 2 3; do
  for v in mtp llama; do
    if [ $v = mtp ]; then .venv/bin/python -m mtp serve --model smollm2-135m --method plain --backend llama.cpp --quiet --port 8123 > /tmp/r/serve_$v.log 2>&1 &
    else $S -m $G --host 127.0.0.1 --port 8123 -c 4096 -t 2 -np 1 --no-webui > /tmp/r/serve_$v.log 2>&1 & fi
    for i in $(seq 90); do curl -sf localhost:8123/health >/dev/null && break; sleep 1; done
    echo "$v $(.venv/bin/python docs/results/llamacpp_backend/serve_thread/client.py 6 | awk '{print $3}' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')"
    kill %1; wait
  done
done
