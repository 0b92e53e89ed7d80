"""The verify curves t(k)/t(1) that `mtp bench engine` measured (engine_info.policy.costs), one line per target.
    python docs/results/llamacpp_cpu/plot_costs.py OUT.png RESULT.json [RESULT.json ...]"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(out: str, paths: list[str]) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    cpu = ""
    for path in paths:
        r = json.loads(Path(path).read_text())
        costs = r["engine_info"]["policy"]["costs"]
        ks = sorted(int(k) for k in costs["verify"])
        t1 = costs["verify"]["1"]
        cfg = r["config"]
        target = "Q4_1 (packaged)" if cfg["target"] == "packaged" and "smollm2" in cfg["model"] else \
            "Q4_K_M (packaged)" if cfg["target"] == "packaged" else cfg["target"].upper()
        label = f"{cfg['model']} {target} (decode {costs['t1'] * 1e3:.1f} ms)"
        ax.plot(ks, [costs["verify"][str(k)] / t1 for k in ks], marker="o", label=label)
        cpu = r["machine"]["cpu"]
    ks = range(1, 17)
    ax.plot(ks, list(ks), color="grey", ls=":", label="each token as dear as the first")
    ax.axhline(1, color="grey", lw=0.5)
    ax.set_xlabel("k: tokens in one verify (after a cached 300-token prefix)")
    ax.set_ylabel("t(k) / t(1)")
    ax.set_title(f"llama.cpp verify cost, 2 threads ({cpu})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
