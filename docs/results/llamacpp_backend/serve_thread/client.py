import json, sys, time, urllib.request
def one(prompt, n=128):
    body = json.dumps({"model": "smollm2-135m", "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True}).encode()
    req = urllib.request.Request("http://127.0.0.1:8123/v1/completions", body, {"Content-Type": "application/json"})
    t0 = time.perf_counter(); toks = 0; first = None
    with urllib.request.urlopen(req) as r:
        for line in r:
            if line.startswith(b"data: {"):
                toks += 1
                if first is None: first = time.perf_counter()
    t1 = time.perf_counter()
    return toks, t1 - first
for i in range(int(sys.argv[1])):
    toks, dt = one(f"Write a story about a robot number {i}. Once upon a time")
    print(toks, round(dt, 3), round((toks-1)/dt, 1), flush=True)
