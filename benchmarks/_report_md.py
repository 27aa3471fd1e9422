"""report.md: every number, with how it was obtained (measured / counted / simulated)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks._report import headline_table, mb
from fedmobillm.device_runtime.messages import ROUTE_PERSONAL_MODEL


def _g(x: float) -> str:
    return f"{x / 1e9:.3f} GFLOP"


def write_report(path: Path, res: dict[str, Any], head: dict[str, Any], pngs: list[str]) -> None:
    L = [
        *_intro(res, head),
        *_fleet(res),
        *_compute(res),
        *_memory(res),
        *_communication(res),
        *_per_class(res),
        *_time_to_target(res),
        *_accuracy(res),
        *_fwdgrad(res),
        *_mezo(res),
        *_fairness(res),
        *_tail(res, pngs),
    ]
    path.write_text("\n".join(L) + "\n")


def _intro(res: dict[str, Any], head: dict[str, Any]) -> list[str]:
    """Title, command, data, the headline table, the target and test accuracies."""
    cfg = res["config"]
    L: list[str] = []
    add = L.append
    add(f"# Headline benchmark ({cfg['mode']} mode, seed {cfg['seed']})\n")
    add(f"Command: `{head['command']}`; wall time {head['wall_s'] / 60:.1f} min on this host.\n")
    add(
        f"Backbone `{cfg['model']}` (real pretrained weights), data `{cfg['dataset']}`, "
        f"{res['data']['devices']} devices x {cfg['samples_per_device']} train records "
        f"(Dirichlet alpha={cfg['dirichlet_alpha']} label skew), validation {res['data']['validation']}, "
        f"test {res['data']['test']}, max sequence length {cfg['max_seq_len']}.\n"
    )
    add("## Headline (fedmobillm vs FedAvg-LoRA, per device, to the target accuracy)\n")
    L.extend(headline_table(head))
    add("")
    if head.get("warning"):
        add(f"**Warning:** {head['warning']}.\n")
    add(
        f"Target accuracy (validation): **{res['target']:.4f}** = "
        + (
            "given by --target"
            if isinstance(cfg["target"], float)
            else f"{cfg['target_fraction']} x the lower of the best validation accuracies of fedmobillm "
            f"({res['best_validation']['fedmobillm']:.4f}) and FedAvg-LoRA "
            f"({res['best_validation']['fedavg-lora']:.4f})"
        )
        + ".\n"
    )
    add(
        "Test accuracy: "
        + ", ".join(f"{k} {100 * v:.2f}%" for k, v in head["test_accuracy"].items())
        + ".\n"
    )
    return L


def _fleet(res: dict[str, Any]) -> list[str]:
    """The device classes of the simulated fleet."""
    L: list[str] = []
    add = L.append
    add("## Fleet (simulated clock)\n")
    add(
        "| class | devices | compute factor | effective GFLOP/s | up / down Mbit/s | bundle quant |"
    )
    add("|---|---|---|---|---|---|")
    seen = {}
    for p in res["profiles"]:
        seen.setdefault(p["name"], [p, 0])[1] += 1
    for name, (p, n) in seen.items():
        add(
            f"| {name} | {n} | {p['compute_factor']:g}x | {p['effective_gflops']:.3g} | "
            f"{p['uplink_mbps']:g} / {p['downlink_mbps']:g} | {p['quant']} |"
        )
    add(
        "\nProfiles: `benchmarks/baselines/profiles/*.json` (or `--profile CLASS=FILE.json`, e.g. "
        "from `fedmobillm android profile`). Device compute time = counted FLOPs / effective "
        "GFLOP/s; transfer time = bytes x 8 / link rate. These are the only simulated inputs.\n"
    )
    return L


def _compute(res: dict[str, Any]) -> list[str]:
    """1. On-device compute (counted)."""
    cfg = res["config"]
    fl = res["flops_per_sample"]
    fm = res["fedmobillm"]["to_target"]
    lora = res["fedavg_to_target"]["lora"]
    full = res["fedavg_to_target"]["full"]
    L: list[str] = []
    add = L.append
    add("## 1. On-device compute (counted)\n")
    add(
        f"`torch.utils.flop_counter.FlopCounterMode` on the real model, over {fl['samples']} real "
        f"train texts (mean {fl['mean_tokens']:.1f} tokens), each method batched as it runs. "
        f"Training steps (LoRA, full, forward-gradient): batches of {cfg['local_batch']} in the "
        f"order of a shuffled local epoch, padded to the longest (mean padded length "
        f"{fl['padded_len']:.1f} tokens). fedmobillm: as the device runtime forwards, each upload "
        f"batch of {cfg['upload_batch']} in order of token length, "
        f"{fl.get('device_forward_batch', 8)} texts per pass, each padded "
        f"to its own longest (mean padded length {fl.get('device_padded_len', float('nan')):.1f} "
        "tokens); a forward-only device can take its texts in any order, a training client "
        "shuffles (length-grouped training batches would narrow the gap). Matmul-type ops only "
        "(elementwise ops are not counted for any method); AdamW's ~10 ops per trainable value "
        "are added analytically.\n"
    )
    add("| per sample | FLOPs |\n|---|---|")
    add(f"| fedmobillm: truncated bundle forward (no grad) | {_g(fl['fedmobillm_forward'])} |")
    add(
        f"| FedAvg-LoRA: forward + backward + AdamW (r={cfg['lora_rank']}, q/k/v/o) | {_g(fl['lora_train_step'])} |"
    )
    add(f"| FedAvg full FT: forward + backward + AdamW | {_g(fl['full_train_step'])} |")
    add(
        f"| FwdLLM-style forward gradient: 1 + {fl['fwdgrad_perturbations']} forwards | {_g(fl['fwdgrad_step'])} |"
    )
    add(
        f"\nTrainable parameters: LoRA+head {fl['lora_trainable_params']:,}; full {fl['full_trainable_params']:,}.\n"
    )
    add(
        f"Total device work per device to target (mean over the fleet): fedmobillm "
        f"{_g(fm['flops_per_device'])} (the forward work a device had done by the simulated "
        f"moment the target was reached, a batch in progress by the share of its forward time "
        f"spent: {fm.get('samples_forwarded_per_device', float('nan')):.1f} records' worth per "
        f"device on average; the whole run, every local record once: "
        f"{_g(fm.get('whole_run', {}).get('flops_per_device', float('nan')))}), FedAvg-LoRA {_g(lora['flops_per_device'])} (local epochs x "
        f"records x step FLOPs, summed over the rounds each device took part in up to round "
        f"{lora['round']}), FedAvg full {_g(full['flops_per_device'])}. "
        f"compute_reduction = 1 - fedmobillm / FedAvg-LoRA.\n"
    )
    return L


def _memory(res: dict[str, Any]) -> list[str]:
    """2. On-device peak memory (measured)."""
    cfg = res["config"]
    mem = res["memory"]
    L: list[str] = []
    add = L.append
    add("## 2. On-device peak memory (measured)\n")
    add(
        f"Peak RSS (`VmHWM` of /proc/self/status) of a fresh `python -m benchmarks._device_step` process doing one "
        f"device step on {cfg['memory_batch']} real texts:\n"
    )
    shares = res.get("fair", {}).get("memory", {})
    add(
        "| method | peak RSS MiB | its runtime alone MiB | method share MiB | torch in process "
        "| step s (host) |\n|---|---|---|---|---|---|"
    )
    for k, v in mem.items():
        sh = shares.get(k, {})
        add(
            f"| {k} | {v['peak_rss_mb']:.0f} | {sh.get('runtime_peak_rss_mb', float('nan')):.0f} "
            f"| {sh.get('method_share_mb', float('nan')):.0f} | {v['torch_imported']} "
            f"| {v['step_s']:.3f} |"
        )
    add(
        "\nfedmobillm = onnxruntime forward of the bundle at that quant + int8 quantisation + upload "
        "encoding, with no torch in the process (checked). memory_ratio = LoRA peak / the largest "
        "fedmobillm peak across the fleet's quants. imports-onnx / imports-torch: a process that "
        "only imports a runtime (onnxruntime + numpy + tokenizers + our device runtime; torch + "
        "transformers + peft); a method's share is its peak minus its runtime's.\n"
    )
    return L


def _communication(res: dict[str, Any]) -> list[str]:
    """3. Communication (measured on the wire / counted)."""
    fm = res["fedmobillm"]["to_target"]
    lora = res["fedavg_to_target"]["lora"]
    full = res["fedavg_to_target"]["full"]
    fa = res["fedavg"]
    L: list[str] = []
    add = L.append
    add("## 3. Communication (fedmobillm measured on the wire; FedAvg counted from the arrays)\n")
    add(
        f"fedmobillm: every byte through a per-device TCP proxy in front of the real server "
        f"(HTTP headers and bodies). Training traffic (registration, all batch uploads, acks), mean "
        f"per device: up {mb(fm['bytes_up_per_device'])}, down {mb(fm['bytes_down_per_device'])} "
        f"(upload HTTP bodies alone {mb(fm['http_body_bytes_up_per_device'])}); the most for one "
        f"device {mb(fm['max_bytes_device'])}. These are cut at the simulated moment the target "
        f"was reached (each device's measured bytes times the share of its records whose upload "
        f"had begun by then), as FedAvg is cut at its target round; the whole run: "
        f"{mb(fm.get('whole_run', {}).get('bytes_per_device', float('nan')))} per device. Delivery of the trained personal model afterwards (GET "
        f"{ROUTE_PERSONAL_MODEL}, measured): {mb(fm['delivery_bytes_per_device'])} per device. "
        "Validation records were uploaded by a separate 'validator' device: counted in the "
        "headline (see 'Fairness').\n"
    )
    add(
        f"FedAvg: the fp32 arrays of the trainable tensors, down and up, per round a device is "
        f"selected in (LoRA+head {mb(fa['lora']['trainable_bytes'])}, full "
        f"{mb(fa['full']['trainable_bytes'])} each way), up to the target round. Mean per device "
        f"to target: LoRA {mb(lora['bytes_per_device'])}, full {mb(full['bytes_per_device'])}. "
        "Flower's message framing is not counted (it would only add to FedAvg). Delivering the "
        f"final model to each device would add {mb(fa['lora']['trainable_bytes'])} (LoRA).\n"
    )
    add(
        "comm_reduction = 1 - fedmobillm training bytes / FedAvg-LoRA bytes to target. The "
        "personal model is large next to the uploads (its alignment projects every tap from d to "
        "the side width, int8 weights by default). Including model delivery on both sides it "
        "would be "
        f"{100 * (1 - (fm['bytes_per_device'] + fm['delivery_bytes_per_device']) / (lora['bytes_per_device'] + fa['lora']['trainable_bytes'])):.1f}%.\n"
    )
    return L


def _per_class(res: dict[str, Any]) -> list[str]:
    """Compute, bytes and memory per device class."""
    L: list[str] = []
    add = L.append
    if res.get("per_class"):
        add("### Per device class (mean per device of the class, to the target)\n")
        add(
            "| class | devices | quant | fedmobillm GFLOP | LoRA GFLOP | compute reduction | "
            "fedmobillm MB | LoRA MB | comm reduction | fedmobillm peak MiB | LoRA peak MiB |"
        )
        add("|---|---|---|---|---|---|---|---|---|---|---|")
        for name, c in res["per_class"].items():
            add(
                f"| {name} | {c['devices']} | {c['quant']} | {c['fedmobillm_flops'] / 1e9:.2f} | "
                f"{c['lora_flops'] / 1e9:.1f} | {_cut(c['fedmobillm_flops'], c['lora_flops'])} | "
                f"{c['fedmobillm_bytes'] / 1e6:.3f} | {c['lora_bytes'] / 1e6:.2f} | "
                f"{_cut(c['fedmobillm_bytes'], c['lora_bytes'])} | "
                f"{c['fedmobillm_peak_rss_mb']:.0f} | {c['lora_peak_rss_mb']:.0f} |"
            )
        add(
            "\nA slow phone forwards fewer records before the target is reached (the fast ones "
            "deliver first), and a synchronous round selects a device whatever its class.\n"
        )
    return L


def _time_to_target(res: dict[str, Any]) -> list[str]:
    """4. Time to target (simulated clock)."""
    cfg = res["config"]
    fm = res["fedmobillm"]["to_target"]
    rep = res["fedmobillm"]["replay"]
    lora = res["fedavg_to_target"]["lora"]
    full = res["fedavg_to_target"]["full"]
    fa = res["fedavg"]
    L: list[str] = []
    add = L.append
    add("## 4. Time to target (simulated clock)\n")
    add(
        f"FedAvg ({fa['lora'].get('engine')}): synchronous rounds; each selected device "
        f"downloads, trains, uploads; a round lasts as long as its slowest selected device. "
        f"LoRA reached the target: {lora['reached']} at round {lora['round']}, "
        f"t = {lora['time_s']:.1f} s; full FT: {full['reached']} at round {full['round']}, "
        f"t = {full['time_s']:.1f} s.\n"
    )
    add(
        f"fedmobillm: asynchronous; each device's batches arrive at forward time + upload time "
        f"of its measured bytes; the server's learning core (SideTrainer with the server's "
        f"settings, its sampling and its idle rule: pause after idle_after_epochs epochs without "
        f"new data, wake on the next upload) steps on what has arrived, each step costing its "
        f"measured host time ({1000 * rep['server_step_s']:.1f} ms, on a shared 2-core host); all "
        f"data in at t = {rep['all_data_in_s']:.1f} s; {rep['steps']} steps in all. Its validation "
        f"accuracy is the mean of the last 3 evaluations (every {cfg['eval_every']} steps), so one "
        f"noisy point cannot count as reaching the target. Reached the target: {fm['reached']} at "
        f"t = {fm['time_s']:.1f} s (step {fm['step']}, {fm['samples_arrived_at_target']} samples "
        f"arrived). "
        "time_to_target_speedup = FedAvg-LoRA time / fedmobillm time.\n"
    )
    if "lora-deadline" in fa:
        dl, dt = fa["lora-deadline"], res["fedavg_to_target"]["lora-deadline"]
        add(
            f"FedAvg-LoRA with round deadlines (straggler-tolerant, `--methods "
            f"fedavg-lora-deadline`): each round ends at {dl['deadline_s']:.1f} s at the latest "
            f"(the {dl['deadline_quantile']}-quantile of the fleet's expected round "
            f"times); {dl['dropped_updates']} of {dl['selected_updates']} selected updates were "
            f"cut (their download and compute until the deadline counted, not aggregated). "
            f"Reached the target: {dt['reached']} at round {dt['round']}, t = {dt['time_s']:.1f} "
            f"s; {mb(dt['bytes_per_device'])} and {dt['flops_per_device'] / 1e9:.1f} GFLOP per "
            f"device; test accuracy {100 * dl['test']['accuracy']:.2f}% "
            f"({dl.get('selection', 'last round')}).\n"
        )
    if "hetlora" in fa:
        h, ht = fa["hetlora"], res["fedavg_to_target"]["hetlora"]
        add(
            f"FedAvg-LoRA at heterogeneous ranks (`--methods fedavg-hetlora`, FlexLoRA): device "
            f"ranks {h['ranks']} by class; {h['aggregation']}. Reached the target: "
            f"{ht['reached']} at round {ht['round']}, t = {ht['time_s']:.1f} s; "
            f"{mb(ht['bytes_per_device'])} and {ht['flops_per_device'] / 1e9:.1f} GFLOP per "
            f"device (rounds to target); final delivery per rank "
            + ", ".join(f"r{k} {mb(v)}" for k, v in h["delivery_bytes_by_rank"].items())
            + f"; test accuracy {100 * h['test']['accuracy']:.2f}% at the largest rank "
            f"({h.get('selection')}), per rank "
            + ", ".join(f"r{k} {100 * v['accuracy']:.2f}%" for k, v in h["test_by_rank"].items())
            + ".\n"
        )
    return L


def _accuracy(res: dict[str, Any]) -> list[str]:
    """5. Accuracy."""
    cfg = res["config"]
    real = res["fedmobillm"]["real"]
    rep = res["fedmobillm"]["replay"]
    fa = res["fedavg"]
    cen = res["centralised"]
    L: list[str] = []
    add = L.append
    add("## 5. Accuracy\n")
    add(
        f"fedmobillm test accuracy {100 * real['test']['accuracy']:.2f}%: on-device inference "
        f"(bundle forward + the personal.onnx each device downloaded from the real server after "
        f"{real['server_step']} trainer steps). Replay's side network on the same test set: "
        + ", ".join(f"{q} {100 * v['accuracy']:.2f}%" for q, v in rep["test"].items())
        + ".\n"
    )
    add(
        f"Centralised side-tuning: SideTrainer on all {cen['train_samples']} train records pooled, "
        f"fp32 activations, {cen['steps']} steps: test {100 * cen['test']['accuracy']:.2f}%. "
        f"accuracy_gap_pts = 100 x (centralised - fedmobillm).\n"
    )
    add(
        f"FedAvg-LoRA test {100 * fa['lora']['test']['accuracy']:.2f}%, FedAvg full FT test "
        f"{100 * fa['full']['test']['accuracy']:.2f}% after {len(fa['lora']['rounds'])} / "
        f"{len(fa['full']['rounds'])} rounds (fraction {cfg['fraction_train']} of devices per round, "
        f"{cfg['local_epochs']} local epoch).\n"
    )
    return L


def _fairness(res: dict[str, Any]) -> list[str]:
    """7. What the headline counts and how each model was selected (issue 22)."""
    fair = res.get("fair")
    if not fair:
        return []
    c = fair["comm"]
    fm, lo, red = c["fedmobillm"], c["fedavg_lora"], c["reduction"]
    L: list[str] = ["## 7. Fairness: selection, every byte, memory apart from the runtime\n"]
    L.append(
        "Model selection: " + "; ".join(f"{k}: {v}" for k, v in fair["selection"].items()) + ".\n"
    )
    L.append(
        f"Bytes per training device. fedmobillm: training to target {mb(fm['training'])} + "
        f"validator's share {mb(fm['validator_share'])} (validator total "
        f"{mb(fm['validator_total'])}) + personal-model delivery {mb(fm['delivery'])} = "
        f"{mb(fm['total'])}. FedAvg-LoRA: rounds to target {mb(lo['training'])} + final model "
        f"delivery {mb(lo['delivery'])} = {mb(lo['total'])}. comm_reduction (headline) is the "
        f"all-in {100 * red['all_in']:.1f}%; training only {100 * red['training_only']:.1f}%, "
        f"with the validator {100 * red['with_validator']:.1f}%.\n"
    )
    L.append("| bundle | in the fleet | LoRA / fedmobillm whole process | method share |")
    L.append("|---|---|---|---|")
    for q, r in fair["memory_ratios"].items():
        L.append(
            f"| {q} | {r['in_fleet']} | {r['whole_process']:.2f}x | {r['method_share']:.2f}x |"
        )
    L.append("")
    return L


def _fwdgrad(res: dict[str, Any]) -> list[str]:
    """6. Forward-gradient per-step cost."""
    fwd = res["fwdgrad"]
    L: list[str] = []
    add = L.append
    add("## 6. Forward-gradient (FwdLLM-style) per-step cost\n")
    add(
        f"Per device step of {fwd['batch']} samples: {fwd['perturbations']} random perturbations of "
        f"the LoRA+head parameters, forward differences, no backprop. FLOPs/sample "
        f"{_g(fwd['flops_per_sample_step'])} ({fwd['vs_lora_step']:.2f}x a LoRA backprop step), "
        f"peak RSS {fwd['peak_rss_mb']:.0f} MiB (fresh process). Simulated step time per class: "
        + ", ".join(
            f"{k} {v['step_sim_s']:.2f} s (LoRA {v['lora_step_sim_s']:.2f} s)"
            for k, v in fwd["per_class"].items()
        )
        + ". Its accuracy run is not part of this benchmark.\n"
    )
    return L


def _mezo(res: dict[str, Any]) -> list[str]:
    """6b. Federated zeroth-order (``--methods mezo``): configuration, cost, accuracy."""
    if "mezo" not in res:
        return []
    z, t = res["mezo"]["run"], res["mezo"]["to_target"]
    c = z["config"]
    mem = res["memory"].get("mezo", {})
    from benchmarks._curves import delivery_bytes

    up = sum(cl["bytes_up"] for r in z["rounds"] for cl in r["clients"])
    clients = sum(len(r["clients"]) for r in z["rounds"])
    reached = (
        f"reached the target {res['target']:.4f} at round {t['round']}, t = {t['time_s']:.1f} s, "
        f"{t['flops_per_device'] / 1e9:.1f} GFLOP and "
        f"{mb(t['bytes_per_device'] + delivery_bytes(z, t))} per device (all in)"
        if t["reached"]
        else f"**never reached the target {res['target']:.4f}** in its {len(z['rounds'])} rounds "
        f"({t['flops_per_device'] / 1e9:.1f} GFLOP per device spent)"
    )
    return [
        "## 6b. Federated zeroth-order tuning (MeZO, FedKSeed-style wire)\n",
        f"FedAvg-LoRA's classifier ({z['trainable_params']:,} trainable values: LoRA r "
        f"{c['lora_rank']} + head, same seed, mean pooling), the same fleet, device selection "
        f"and batch ({c['local_batch']}); per step {c['perturbations']} seeded perturbation(s), "
        f"2 forwards each, eps {c['eps']}, lr {c['lr']}, {c['local_epochs']} local epoch(s), "
        f"{c['rounds']} rounds, validation every {c['eval_every']} rounds "
        f"({'overridden: ' + str(z['overrides']) if z.get('overrides') else 'defaults of benchmarks._mezo, chosen on validation'}). "
        f"Devices upload (seed, scalar) pairs only: {up / max(1, clients):.0f} B per device-round "
        f"on average (FedAvg-LoRA: {mb(2 * z['trainable_bytes'])} per device-round both ways); "
        f"they download the log of the rounds they missed (the whole log at the end, "
        f"{z['delivery_bytes_per_device']:,} B, {z['log_pairs']:,} pairs). Device FLOPs: 2 P "
        f"forwards per sample (LoRA classifier forward "
        f"{_g(res['flops_per_sample']['lora_forward'])} per sample) + the element-wise passes. "
        f"Peak RSS of one step {mem.get('peak_rss_mb', float('nan')):.0f} MiB (fresh process; "
        f"LoRA backprop step {res['memory']['lora']['peak_rss_mb']:.0f} MiB). Best validation "
        f"{z['best_validation']:.4f} at round {z['best_round']}; test {100 * z['test']['accuracy']:.2f}% "
        f"({z.get('selection')}); {reached}.\n",
    ]


def _tail(res: dict[str, Any], pngs: list[str]) -> list[str]:
    """Plots, versions, stage times."""
    L: list[str] = []
    add = L.append
    add("## Plots\n")
    for p in pngs:
        add(f"![{p}]({p})")
    add("\n## Versions\n")
    add(", ".join(f"{k} {v}" for k, v in res["versions"].items()))
    add("\nStages (host seconds): " + ", ".join(f"{k} {v:.0f}" for k, v in res["stages_s"].items()))
    return L


def _cut(ours: float, theirs: float) -> str:
    """1 - ours / theirs as a percentage; n/a where the baseline did no such work (a class
    none of whose devices was selected before the target round)."""
    return f"{100 * (1 - ours / theirs):.1f}%" if theirs > 0 else "n/a"
