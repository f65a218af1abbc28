"""What ``benchmarks/speed.py`` reports from its measurements: the ratios between modes, the goals they are held
to (CPU and GPU), the printed table and the PNG."""

from pathlib import Path


RATIOS = {  # name -> (numerator mode, denominator mode, time or memory)
    "qat_over_fp_time": ("qat", "fp", "step_ms"),
    "saq_over_qat_time": ("saq", "qat", "step_ms"),
    "every_k_over_qat_time": ("every_k", "qat", "step_ms"),
    "looksam_over_qat_time": ("looksam", "qat", "step_ms"),
    "reuse_grad_over_qat_time": ("reuse_grad", "qat", "step_ms"),
    "saq_over_qat_memory": ("saq", "qat", "peak_mib"),
    "every_k_over_qat_memory": ("every_k", "qat", "peak_mib"),
    "looksam_over_qat_memory": ("looksam", "qat", "peak_mib"),
    "reuse_grad_over_qat_memory": ("reuse_grad", "qat", "peak_mib"),
    "qat_compiled_over_fp_compiled_time": ("qat_compiled", "fp_compiled", "step_ms"),
    "saq_compiled_over_saq_time": ("saq_compiled", "saq", "step_ms"),
    "qat_compiled_over_qat_time": ("qat_compiled", "qat", "step_ms"),
    "saq_compiled_over_qat_compiled_time": ("saq_compiled", "qat_compiled", "step_ms"),
    "qat_over_torchao_qat_time": ("qat", "torchao_qat", "step_ms"),
    "qat_compiled_over_torchao_qat_time": ("qat_compiled", "torchao_qat", "step_ms"),
    "qat_over_torch_lsq_time": ("qat", "torch_lsq", "step_ms"),
    "looksam_compiled_over_qat_compiled_time": ("looksam_compiled", "qat_compiled", "step_ms"),
    "qat_cudagraphs_over_fp_cudagraphs_time": ("qat_cudagraphs", "fp_cudagraphs", "step_ms"),
    "saq_cudagraphs_over_qat_cudagraphs_time": ("saq_cudagraphs", "qat_cudagraphs", "step_ms"),
    "looksam_cudagraphs_over_qat_cudagraphs_time": ("looksam_cudagraphs", "qat_cudagraphs", "step_ms"),
    "qat_kd_over_qat_time": ("qat_kd", "qat", "step_ms"),
    "saq_kd_over_saq_time": ("saq_kd", "saq", "step_ms"),
}


def ratios(modes: dict) -> dict:
    return {name: modes[a][key] / modes[b][key] for name, (a, b, key) in RATIOS.items()
            if key in modes.get(a, {}) and key in modes.get(b, {})}


GOALS = {  # ratio -> (upper bound, configs it applies to: None = all)
    "qat_over_fp_time": (1.25, None),
    "qat_compiled_over_fp_compiled_time": (1.10, None),
    "saq_compiled_over_saq_time": (0.8, None),
    "saq_over_qat_time": (2.0, None),
    "saq_over_qat_memory": (1.10, "batch >= 32"),
    "looksam_over_qat_time": (1.2, None),  # the efficient mode at <= 1.2x the QAT step
    "qat_over_torchao_qat_time": (0.8, None),
    "qat_kd_over_qat_time": (1.35, None),  # distillation: one teacher forward without gradients per micro-batch
    "saq_kd_over_saq_time": (1.2, None),  # ... shared by SAQ's two passes
}


GPU_GOALS = {  # the GPU targets (bf16, 224x224, batch 64): ratio -> (upper bound, None = all configs)
    "qat_over_fp_time": (1.5, None),
    "qat_compiled_over_fp_compiled_time": (1.15, None),
    "saq_compiled_over_qat_compiled_time": (2.05, None),
    "looksam_over_qat_time": (1.2, None),
    "qat_over_torchao_qat_time": (0.7, None),
    "qat_over_torch_lsq_time": (1.0, None),
}


def goal_report(results: dict, goals: dict = GOALS) -> dict:
    report = {}
    for key, (bound, scope) in goals.items():
        values = {name: entry["ratios"][key] for name, entry in results.items() if key in entry["ratios"]
                  and (scope is None or entry["batch_size"] >= 32)}
        if values:
            worst = max(values.values())
            report[key] = {"goal": bound, "scope": scope or "all configs", "worst": round(worst, 3),
                           "per_config": {k: round(v, 3) for k, v in values.items()}, "met": worst <= bound}
    return report


TABLE = [  # (header, mode (its step ms) or ratio, format)
    ("fp ms", "fp", "{:.1f}"), ("qat ms", "qat", "{:.1f}"), ("saq ms", "saq", "{:.1f}"),
    ("qat/fp", "qat_over_fp_time", "{:.2f}"), ("saq/qat", "saq_over_qat_time", "{:.2f}"),
    ("k/qat", "every_k_over_qat_time", "{:.2f}"), ("look/qat", "looksam_over_qat_time", "{:.2f}"),
    ("reuse/qat", "reuse_grad_over_qat_time", "{:.2f}"),
    ("mem saq/qat", "saq_over_qat_memory", "{:.2f}"), ("mem look/qat", "looksam_over_qat_memory", "{:.2f}"),
    ("mem reuse/qat", "reuse_grad_over_qat_memory", "{:.2f}"),
    ("c.qat/c.fp", "qat_compiled_over_fp_compiled_time", "{:.2f}"),
    ("c.saq/saq", "saq_compiled_over_saq_time", "{:.2f}"), ("c.qat/qat", "qat_compiled_over_qat_time", "{:.2f}"),
    ("qat/torchao", "qat_over_torchao_qat_time", "{:.2f}"),
    ("c.qat/torchao", "qat_compiled_over_torchao_qat_time", "{:.2f}"),
    ("qat/torch_lsq", "qat_over_torch_lsq_time", "{:.2f}"),
    ("c.look/c.qat", "looksam_compiled_over_qat_compiled_time", "{:.2f}"),
    ("g.qat/g.fp", "qat_cudagraphs_over_fp_cudagraphs_time", "{:.2f}"),
    ("g.saq/g.qat", "saq_cudagraphs_over_qat_cudagraphs_time", "{:.2f}"),
    ("g.look/g.qat", "looksam_cudagraphs_over_qat_cudagraphs_time", "{:.2f}"),
    ("qat_kd/qat", "qat_kd_over_qat_time", "{:.2f}"), ("saq_kd/saq", "saq_kd_over_saq_time", "{:.2f}"),
]


def print_table(results: dict) -> None:
    columns = [(h, key, fmt) for h, key, fmt in TABLE
               if any(key in e["modes"] or key in e["ratios"] for e in results.values())]
    print(f"{'config':<15}{'batch':>6}" + "".join(f"{h:>{max(len(h), 6) + 2}}" for h, _, _ in columns))
    for name, entry in results.items():
        cells = []
        for h, key, fmt in columns:
            value = entry["modes"][key].get("step_ms") if key in entry["modes"] else entry["ratios"].get(key)
            cells.append(f"{fmt.format(value) if value is not None else '-':>{max(len(h), 6) + 2}}")
        print(f"{name:<15}{entry['batch_size']:>6}" + "".join(cells))


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    series = [(label, key) for label, key in [
        ("qat/fp time", "qat_over_fp_time"), ("saq/qat time", "saq_over_qat_time"),
        ("every_k/qat time", "every_k_over_qat_time"), ("looksam/qat time", "looksam_over_qat_time"),
        ("reuse_grad/qat time", "reuse_grad_over_qat_time"),
        ("saq/qat memory", "saq_over_qat_memory"), ("compiled qat/fp time", "qat_compiled_over_fp_compiled_time"),
        ("compiled saq/eager saq", "saq_compiled_over_saq_time"), ("qat/torchao time", "qat_over_torchao_qat_time"),
        ("qat+kd/qat time", "qat_kd_over_qat_time"), ("saq+kd/saq time", "saq_kd_over_saq_time")]
        if all(key in results[n]["ratios"] for n in results)]
    if not series:  # a run of one mode (or of modes without a ratio between them) has nothing to plot
        return
    fig, ax = plt.subplots(figsize=(10, 5))
    width = 0.8 / len(series)
    for i, (label, key) in enumerate(series):
        ax.bar([x + i * width for x in range(len(names))], [results[n]["ratios"][key] for n in names], width,
               label=label)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(names))], names)
    ax.set_ylabel("ratio")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.08))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
