"""The GPU check's figures: its goals, read off the bench step, and the summary it prints at the end, a line a step."""

# The goals of a run on a GPU, read off the bench step (ours at 512 tokens x micro-batch 4).
GOALS = {
    "peak_allocated_gb": ("peak allocated memory, ours (GB)", "<=", 6.0),
    "tokens_per_second_ratio": ("real tokens/s, ours / original", ">=", 2.0),
    "mfu": ("MFU, ours (4N FLOPs per real token)", ">=", 0.35),
}


def goals(steps: dict, rehearsal: bool) -> dict:
    """The goals of a GPU run, from the bench step (on CPU they are computed the same way, but mean nothing:
    no MFU without a GPU peak, and RSS instead of CUDA memory)."""
    bench_figures = steps.get("bench", {}).get("figures", {})
    ours = bench_figures.get("ours", {})
    peak_gib = ours.get("peak_memory_gib")
    values = {
        "peak_allocated_gb": None if peak_gib is None else round(peak_gib * 2**30 / 1e9, 2),
        "tokens_per_second_ratio": bench_figures.get("tokens_per_second_ratio"),
        "mfu": ours.get("mfu"),
    }
    result = {}
    for key, (label, relation, target) in GOALS.items():
        value = values[key]
        met = None if value is None else (value <= target if relation == "<=" else value >= target)
        result[key] = {"goal": f"{label} {relation} {target}", "value": value, "met": met}
    ran = [s for s in steps.values() if s["status"] != "skipped"]
    result["every_step_passed"] = {
        "goal": "every step of the check passes",
        "value": f"{sum(s['status'] == 'passed' for s in steps.values())} of {len(steps)} passed",
        "met": bool(ran) and all(s["status"] == "passed" for s in steps.values()),
    }
    if rehearsal:
        result["note"] = "rehearsal on CPU: the goals are for a GPU run"
    return result


def summary(result: dict, files: str) -> None:
    """The check's steps and goals, a line each, and where its figures and files are."""
    print(f"\nGPU check ({result['kind']}), {result['elapsed_s']:.0f} s:")
    for name, record in result["steps"].items():
        print(f"  {name:<16}{record['status']:<8}{record['seconds']:>6.0f} s  {brief(name, record)}")
    for goal in result["goals"].values():
        if isinstance(goal, dict):
            verdict = {True: "met", False: "NOT met", None: "not measured"}[goal["met"]]
            print(f"  goal: {goal['goal']}: {goal['value']} ({verdict})")
    if "note" in result["goals"]:
        print(f"  ({result['goals']['note']})")
    print(files)


def brief(name: str, record: dict) -> str:
    """The step's main figures in one line."""
    f = record["figures"]
    if record["status"] == "skipped" or not f:
        return record["error"] or ""
    if name.startswith("bench"):
        return "; ".join(
            f"{v} {f[v]['real_tokens_per_second']} tok/s, MFU {f[v]['mfu']}, peak {f[v]['peak_memory_gib']} GiB"
            f" (reserved {f[v]['peak_reserved_gib']})"
            for v in ("original", "ours")
            if v in f
        ) + (f"; ratio {f['tokens_per_second_ratio']}x" if "tokens_per_second_ratio" in f else "")
    if name == "environment":
        return f"{f.get('device', 'no GPU')}, torch {f['versions']['torch']}, bnb {f.get('bnb_library')}"
    if name == "build_model":
        return f"{f['parameters']:,} parameters, {f['size_gb']} GB, tokenizer {f['tokenizer']}"
    if name == "train":
        return (
            f"killed after checkpoint-{f['killed_after_checkpoint']}, resumed from {f.get('resumed_from')}, "
            f"step {f.get('global_step')}, train loss {f.get('train_loss')}, report {f.get('report')}"
        )
    if name == "train_fp16":
        return f"computes in {f['compute_dtype']}, losses {f['losses']}"
    if name == "probes":
        passed = [n for n, r in f["probes"].items() if r["status"] == "passed"]
        skipped = ", ".join(f["skipped"]) or "none"
        return f"{len(passed)} of {len(f['probes'])} passed; optimizer {f['optim']}; skipped {skipped}"
    if name == "merge":
        return f"{f['parameters']:,} parameters, {f['dtype']}, {f['size_gb']} GB"
    if name == "inference":
        return f"reply {f['reply'][:60]!r}"
    if name == "inference_batch":
        return f"{f['answers']} answers"
    return ""
