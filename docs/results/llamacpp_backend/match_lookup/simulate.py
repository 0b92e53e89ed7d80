# Offline: how far prompt lookup's copy holds per match length, and the speedup policies would get on a verify curve
# (t(k)/t(1) of qwen Q4_K_M through the bindings on the Zen 4; `smol`: smollm2's), on llama-server's greedy answers to the
# 12 edit requests (edit_answers.json). usage: python simulate.py
import json, collections, sys
d = json.load(open(__import__('pathlib').Path(__file__).with_name('edit_answers.json')))
prompts, outs = d['prompts'], d['theirs']
def match(seq, maxL=32):
    """longest suffix match: (L, start of continuation) latest occurrence among longest"""
    n = len(seq); best = (0, None)
    last = seq[-1]
    for i in range(n - 2, -1, -1):
        if seq[i] != last: continue
        L = 1
        while L < maxL and i - L >= 0 and seq[i - L] == seq[n - 1 - L]: L += 1
        if L > best[0]: best = (L, i + 1)
        if L == maxL: break
    return best
def bucket(L):
    for b in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32):
        if L <= b: return b
    return 32
stats = collections.defaultdict(list)
for p, o in zip(prompts, outs):
    for t in range(len(o)):
        seq = p + o[:t]
        L, s = match(seq)
        if s is None: stats[0].append(0); continue
        cont = seq[s:s+16]
        acc = 0
        for a, b in zip(cont, o[t:]):
            if a != b: break
            acc += 1
        stats[bucket(L)].append(acc)
for b in sorted(stats):
    v = stats[b]; n = len(v)
    print(f"L<={b:2d} n={n:4d} mean acc(16)={sum(v)/n:.2f} P(acc>=1)={sum(x>=1 for x in v)/n:.2f} P(>=4)={sum(x>=4 for x in v)/n:.2f} P(>=8)={sum(x>=8 for x in v)/n:.2f}")

cost = {1: 1.0, 2: 1.77, 3: 2.26, 4: 2.51, 8: 4.30, 16: 6.89}
if len(sys.argv) > 1 and sys.argv[1] == "smol": cost = {1: 1.0, 2: 1.71, 3: 2.15, 4: 2.62, 8: 4.43, 16: 9.16}
KS = [k - 1 for k in cost if k > 1]
def run(policy):
    tot_tok = tot_cost = 0
    for p, o in zip(prompts, outs):
        t = 0
        while t < len(o):
            seq = p + o[:t]
            L, s = match(seq)
            k = policy(L) if s is not None else 0
            cont = seq[s:s+k] if k else []
            a = 0
            for x, y in zip(cont, o[t:]):
                if x != y: break
                a += 1
            adv = min(a + 1, len(o) - t)
            tot_tok += adv; tot_cost += cost[k + 1] if k else 1.0
            t += adv
    return tot_tok / tot_cost
print("plain", run(lambda L: 0))
for k in KS: print("always k", k, round(run(lambda L: k), 3))
for thr in (2, 3, 4, 6, 8, 12):
    for k in KS: print("L>=", thr, "k", k, round(run(lambda L: k if L >= thr else 0), 3))
print("---")
for pol in [(4,3,8,7,16,15),(4,3,8,7,24,15),(6,3,12,7,24,15),(4,3,12,7,32,15),(3,3,8,7,16,15),(4,3,16,7,99,15)]:
    a,ka,b,kb,c,kc = pol
    print(pol, round(run(lambda L: kc if L>=c else kb if L>=b else ka if L>=a else 0),3))
