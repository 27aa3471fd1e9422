"""Device cost at equal perplexity, fedavg-lora / fedmobillm, recomputed from stored runs
(no new training): ``python docs/results/lm-quick-share-cost/recompute.py``.

fedmobillm's per-step device cost (FLOPs, bytes) depends only on its draws (seed 0, 80
steps, 8 lines a step per architecture), which ``share_out`` / ``arch_balance`` do not
change: it is taken from the EMA-fix run (docs/results/lm-quick-ema, same config), with
each logged step's validation perplexity replaced by the share_out + arch_balance run's
(docs/results/lm-quick-share, the current defaults). fedavg-lora's curve, memory and
adapter bytes are the EMA-fix run's (rank 16 q/v, equal budget, 40 rounds; it does not
depend on fedmobillm's options). ``benchmarks._lm_lora.equal_perplexity`` does the rest.
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks._lm_lora import equal_perplexity

HERE = Path(__file__).resolve().parent
ema = json.loads((HERE.parent / "lm-quick-ema" / "lm.json").read_text())
share = json.loads((HERE.parent / "lm-quick-share" / "lm.json").read_text())
keys = ("steps", "batch_lines", "seed", "curve_every", "select_every", "devices", "train_lines")
if any(ema["config"][k] != share["config"][k] for k in keys):
    raise SystemExit(f"the two runs differ in {keys}: their draws are not the same")
if share["config"].get("full_batch_lines"):
    raise SystemExit("the share run drew other lines for the full model (full_batch_lines)")
new_val = {p["step"]: p["val_perplexity"] for p in share["fedmobillm_curve"]
           if p["backbone"] == "smollm2-135m"}  # fmt: skip
dc = ema["device_cost"]
fm = [{**p, "val_perplexity": new_val[p["step"]]} for p in dc["fedmobillm_curve"]]
row = next(
    r for r in share["rows"] if r["method"] == "fedmobillm" and r["backbone"] == "smollm2-135m"
)
delivery = {
    "fedavg-lora": dc["delivery_bytes"]["fedavg-lora"],
    "fedmobillm": 4 * row["personal_params"],
}
out = equal_perplexity(dc["fedavg_lora_curve"], fm, dc["frozen_val_perplexity"], delivery,
                       dc["peak_memory_mb"])  # fmt: skip
out["fedmobillm_curve"] = fm
out["sources"] = ["docs/results/lm-quick-ema/lm.json", "docs/results/lm-quick-share/lm.json"]
(HERE / "cost.json").write_text(json.dumps(out, indent=1))
print(
    json.dumps(
        {
            k: out[k]
            for k in (
                "target_val_perplexity",
                "best_val_perplexity",
                "at_target",
                "ratio_fedavg_lora_over_fedmobillm",
            )
        },
        indent=1,
    )
)
for t in out["targets"]:
    print(
        round(t["target_val_perplexity"], 2),
        {
            m: None
            if t[m] is None
            else (t[m]["at"], round(t[m]["flops"] / 1e9, 1), round(t[m]["bytes_training"] / 1e6, 2))
            for m in ("fedavg-lora", "fedmobillm")
        },
    )
