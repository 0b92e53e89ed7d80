"""llama.cpp's draft settings chosen from measured costs: ``--spec-draft-n-max``, ``-n-min`` and ``-p-min``.

Three measurements on this machine, with the target and the draft a user serves (cached per CPU, target file,
draft file and thread count, like mtp's own verify-cost curve):

- ``t1``: one plain decoded token (llama-server's ``predicted_per_token_ms``);
- ``verify[k]``: the target over k new tokens after a cached prefix (llama-server's prompt timings), k = 1..16:
  what a verify of k - 1 drafts costs;
- rounds of draft-eagle3 with the draft length fixed (``-p-min 0``, ``n_max = d`` for d in 1, 2, 4, 8): the time
  of a round and the tokens it yields. A round costs ``verify(1 + d) + overhead + d * draft_token`` (the two
  unknowns fitted by least squares), and it yields ``1 + sum_{i<=d} P_i`` tokens, ``P_i`` the chance that the
  first i drafts are all accepted, fitted as ``P_i = a * b**(i-1)``.

Then for each draft length d the predicted speedup is ``tokens(d) * t1 / round(d)``; ``n_max`` is its argmax
(none when no d beats plain decoding). ``p_min`` is the break-even confidence of one more draft: drafting and
verifying it costs ``draft_token + verify(k+1) - verify(k)`` and saves ``t1`` when accepted, so a draft whose
own probability (taken as its chance of acceptance) is below that ratio costs more than it can save. ``n_min``
is the shortest draft whose verify beats decoding, the drafts being already paid for and each accepted with at
least ``p_min``.
"""

from __future__ import annotations

import statistics
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

VERIFY_POINTS = (1, 2, 3, 4, 5, 6, 8, 12, 16)
ROUND_LENGTHS = (1, 2, 4, 8)
N_MAX_CAP = 16


@dataclass
class Costs:
    """Measured: seconds per plain token, per verify of k tokens, per fixed-length draft round."""

    t1: float
    verify: dict[int, float]
    rounds: list[dict] = field(default_factory=list)  # {"d", "round_s", "tokens_per_round"}
    outputs: list[list[int]] = field(default_factory=list)  # the target's greedy tokens on the calibration prompts

    def as_dict(self) -> dict:
        return {"t1": self.t1, "verify": {str(k): v for k, v in self.verify.items()}, "rounds": self.rounds,
                "outputs": self.outputs}

    @classmethod
    def from_dict(cls, d: dict) -> "Costs":
        return cls(t1=float(d["t1"]), verify={int(k): float(v) for k, v in d["verify"].items()},
                   rounds=list(d.get("rounds", [])), outputs=[list(map(int, o)) for o in d.get("outputs", [])])


def verify_at(costs: Costs, k: int) -> float:
    """T(k), linear between measured points and beyond the last one."""
    pts = sorted(costs.verify.items())
    if k <= pts[0][0]:
        return pts[0][1]
    for (k0, t0), (k1, t1) in zip(pts, pts[1:]):
        if k <= k1:
            return t0 + (t1 - t0) * (k - k0) / (k1 - k0)
    (k0, t0), (k1, t1) = pts[-2], pts[-1]
    return t1 + (t1 - t0) / (k1 - k0) * (k - k1)


def fit_round_cost(costs: Costs) -> tuple[float, float]:
    """(overhead, draft_token) seconds from ``round_s - verify(1 + d) = overhead + d * draft_token``, both >= 0."""
    xs = [r["d"] for r in costs.rounds]
    ys = [r["round_s"] - verify_at(costs, 1 + r["d"]) for r in costs.rounds]
    if not xs:
        raise ValueError("no draft rounds measured")
    if len(set(xs)) == 1:
        return 0.0, max(0.0, ys[0] / xs[0])
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    slope = max(0.0, slope)
    return max(0.0, my - slope * mx), slope


def expected_tokens(a: float, b: float, d: int) -> float:
    """Tokens a round of d drafts yields when the first i drafts all pass with chance a * b**(i-1)."""
    return 1.0 + sum(a * b ** (i - 1) for i in range(1, d + 1))


def fit_acceptance(costs: Costs) -> tuple[float, float]:
    """(a, b) of ``P_i = a * b**(i-1)`` fitted to the measured tokens per round (least squares on a grid)."""
    if not costs.rounds:
        raise ValueError("no draft rounds measured")
    grid = [i / 200 for i in range(201)]
    best = None
    for a in grid:
        for b in grid:
            err = sum((expected_tokens(a, b, r["d"]) - r["tokens_per_round"]) ** 2 for r in costs.rounds)
            if best is None or err < best[0]:
                best = (err, a, b)
    return best[1], best[2]


def predicted_speedup(costs: Costs, d: int, overhead: float, draft_token: float, a: float, b: float) -> float:
    return expected_tokens(a, b, d) * costs.t1 / (verify_at(costs, 1 + d) + overhead + d * draft_token)


def choose(costs: Costs, cap: int = N_MAX_CAP) -> dict:
    """The draft settings the measured costs call for, with the predicted speedup of each draft length."""
    overhead, draft_token = fit_round_cost(costs)
    a, b = fit_acceptance(costs)
    return choose_from_fit(costs, overhead, draft_token, a, b, cap)


def choose_from_fit(costs: Costs, overhead: float, draft_token: float, a: float, b: float,
                    cap: int = N_MAX_CAP) -> dict:
    """:func:`choose` for given draft costs and acceptance (a draft of another vocabulary size:
    :func:`choose_vocab`)."""
    table = {d: predicted_speedup(costs, d, overhead, draft_token, a, b) for d in range(1, cap + 1)}
    n_max = max(table, key=table.get)
    extra = [draft_token + verify_at(costs, k + 1) - verify_at(costs, k) for k in range(1, n_max + 1)]
    p_min = min(0.99, max(0.0, min(extra) / costs.t1))
    n_min = next((n for n in range(1, n_max + 1)
                  if sum(p_min ** i for i in range(n + 1)) * costs.t1 >= verify_at(costs, n + 1)), n_max)
    pays = table[n_max] > 1.0
    return {"n_max": n_max, "n_min": n_min, "p_min": round(p_min, 3), "pays": pays,
            "predicted_speedup": round(table[n_max], 3), "ceiling": round(ceiling(costs), 3),
            "predicted": {str(d): round(s, 3) for d, s in table.items()},
            "fit": {"round_overhead_s": overhead, "draft_token_s": draft_token, "accept_a": a, "accept_b": b}}


def coverage(outputs: list[list[int]], ranked: list[int], sizes) -> dict[int, float]:
    """Share of the target's own output tokens that a draft vocabulary of the ``size`` first ids of ``ranked``
    (the draft's tokens, most frequent training target first) holds, for each size."""
    rank = {t: i for i, t in enumerate(ranked)}
    pos = sorted(rank.get(t, len(ranked)) for out in outputs for t in out)
    if not pos:
        raise ValueError("no output tokens to measure the draft vocabulary's coverage on")
    import bisect

    return {n: bisect.bisect_left(pos, n) / len(pos) for n in sizes}


def vocab_sizes(full: int, smallest: int = 256) -> list[int]:
    """Draft vocabulary sizes to predict for: powers of two from ``smallest`` below ``full``, and ``full``."""
    out, n = [], smallest
    while n < full:
        out.append(n)
        n *= 2
    return out + [full]


def choose_vocab(costs: Costs, measured: dict[int, Costs], cover: dict[int, float], cap: int = N_MAX_CAP) -> dict:
    """The draft vocabulary size (and its draft settings) the measurements call for.

    ``measured``: draft rounds at two or more vocabulary sizes (the trained one and a smaller one), with the
    target's costs of ``costs``. The draft's cost per token is fitted linear in the size (its lm_head rows and
    the sampler over them), the round overhead averaged; the chance of acceptance at size n is the trained
    draft's, scaled by the share of the target's outputs the smaller vocabulary still holds (a token outside it
    can never be drafted; inside it, drafts stay as good: a lower bound, since frequent tokens are the easy
    ones). The smaller measured size checks that model: its measured acceptance is reported beside the
    predicted one."""
    sizes = sorted(measured)
    full = sizes[-1]
    fits = {n: fit_round_cost(Costs(costs.t1, costs.verify, c.rounds)) for n, c in measured.items()}
    acc = {n: fit_acceptance(Costs(costs.t1, costs.verify, c.rounds)) for n, c in measured.items()}
    xs, ys = sizes, [fits[n][1] for n in sizes]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = max(0.0, sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs))
    base = max(0.0, my - slope * mx)
    overhead = statistics.fmean(f[0] for f in fits.values())
    a_full, b_full = acc[full]
    table, choices = {}, {}
    for n in sorted(cover):
        a = a_full * cover[n] / max(cover[full], 1e-9)
        choices[n] = choose_from_fit(costs, overhead, base + slope * n, a, b_full, cap)
        table[n] = choices[n]["predicted_speedup"]
    best = max(table, key=lambda n: (table[n], -n))
    return {"draft_vocab": best, "predicted_speedup": table[best], "predicted": {str(n): v for n, v in table.items()},
            "coverage": {str(n): round(c, 4) for n, c in cover.items()},
            "fit": {"draft_token_base_s": base, "draft_token_per_row_s": slope, "round_overhead_s": overhead},
            "measured": {str(n): {"draft_token_s": fits[n][1], "round_overhead_s": fits[n][0], "accept_a": acc[n][0],
                                  "accept_b": acc[n][1],
                                  "predicted_accept_a": a_full * cover.get(n, 1.0) / max(cover[full], 1e-9)}
                         for n in sizes}}


def ceiling(costs: Costs) -> float:
    """The most any draft could give here: k tokens for one verify of k, every draft accepted and free."""
    return max(k * costs.t1 / t for k, t in costs.verify.items())


def flags(choice: dict) -> list[str]:
    """llama-server flags for a choice (empty when speculation does not pay: serve plain)."""
    if not choice["pays"]:
        return []
    return ["--spec-draft-n-max", str(choice["n_max"]), "--spec-draft-n-min", str(choice["n_min"]),
            "--spec-draft-p-min", f"{choice['p_min']:g}"]


# ----------------------------------------------------------------------------- measuring with llama-server


def measure_verify(server, prefix: list[int], pool: list[int], points=VERIFY_POINTS, repeats: int = 7,
                   timeout: float = 600.0) -> dict[int, float]:
    """Median seconds for the target over k new tokens after ``prefix`` (kept in the server's cache); each
    request's new tokens differ from the previous one's right after the prefix, so only the prefix is reused."""
    server.complete(prefix, 1, timeout=timeout, cache_prompt=True)
    out, offset = {}, 0
    for k in points:
        times = []
        for _ in range(repeats):
            new = [pool[(offset + i) % len(pool)] for i in range(k)]
            offset += k + 1
            res = server.complete(prefix + new, 1, timeout=timeout, cache_prompt=True)
            t = res.get("timings", {})
            if t.get("prompt_n") != k:  # the server re-read more than the new tokens: not a cached verify
                continue
            times.append(t["prompt_ms"] / 1e3)
        if times:
            out[k] = statistics.median(times)
    if 1 not in out or len(out) < 2:
        raise RuntimeError("llama-server did not reuse its cached prefix: no verify timings")
    return out


def measure_decode(server, prompts: list[list[int]], n: int = 48, timeout: float = 600.0,
                   outputs: list | None = None) -> float:
    """Median seconds per plain decoded token over the prompts (their tokens appended to ``outputs``)."""
    per = []
    for p in prompts:
        res = server.complete(p, n, timeout=timeout, return_tokens=True)
        t = res.get("timings", {})
        if outputs is not None:
            outputs.append([int(x) for x in res.get("tokens", [])])
        if t.get("predicted_n", 0) > 1:
            per.append(t["predicted_per_token_ms"] / 1e3)
    return statistics.median(per)


def round_row(d: int, results: list[dict]) -> dict:
    """A fixed-length draft configuration's rounds from llama-server answers (timings with draft counters)."""
    tokens = sum(r["timings"]["predicted_n"] for r in results)
    accepted = sum(r["timings"].get("draft_n_accepted", 0) for r in results)
    seconds = sum(r["timings"]["predicted_ms"] for r in results) / 1e3
    rounds = max(1, tokens - accepted)  # every round yields its accepted drafts + one token of the target
    return {"d": d, "round_s": seconds / rounds, "tokens_per_round": tokens / rounds}


# ----------------------------------------------------------------------------- the per-machine cache


def _file_id(path: Path, content: bool = False) -> str:
    """A file's identity: its content (a draft, small, exported again to another folder) or its path, size and
    time (a target, large)."""
    if content:
        return hashlib.sha1(path.read_bytes()).hexdigest()
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{int(st.st_mtime)}"


def cache_file(target: Path, draft: Path, threads: int) -> Path:
    """Where the costs of this target and draft, on this CPU with this many threads, are kept."""
    from mtp.engines.llamacpp import build_stamp
    from mtp.machine import cpu_signature
    from mtp.io import cache_dir

    key = json.dumps([cpu_signature(), build_stamp()["fixes"], _file_id(target), _file_id(draft, content=True), threads])
    name = f"{target.stem}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.json"
    return cache_dir("engines", "costs") / name


def load_cached(target: Path, draft: Path, threads: int) -> Costs | None:
    try:
        return Costs.from_dict(json.loads(cache_file(target, draft, threads).read_text())["costs"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_cached(target: Path, draft: Path, threads: int, costs: Costs, meta: dict) -> Path:
    path = cache_file(target, draft, threads)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"costs": costs.as_dict(), **meta}, indent=1) + "\n")
    tmp.replace(path)
    return path
