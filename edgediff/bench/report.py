"""The bench record as text: one table of median stage times per configuration, then limits and ratios."""

from __future__ import annotations


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def format_report(record: dict) -> str:
    peak = record["peak"]
    int8 = f"{peak['int8_gops']:.0f} GOP/s int8" if peak.get("int8_gops") else "int8 unknown"
    lines = [
        f"machine: {record['machine'].get('cpu', '?')}, {record['machine'].get('cores')} cores; "
        f"peak {peak['float32_gflops']:.0f} GFLOP/s float32, {int8} (threads: {peak['threads'] or 'default'})",
    ]
    lines += [f"note: {n}" for n in record.get("notes", [])]
    header = (f"{'engine':<28} {'config':<16} {'text':>8} {'unet':>8} {'step':>8} {'vae':>8} {'other':>8} "
              f"{'total':>8} {'img/s':>7}")
    lines += ["", "median seconds (min..max of total)", header, "-" * len(header)]
    for e in record["engines"]:
        for c in e["configs"]:
            m = c["median"]
            step = c["unet_step_median"] or 0.0
            lines.append(
                f"{e['label'][:28]:<28} {str(c['steps']) + ' st, b' + str(c['batch']):<16} {m['text']:>8.3f} "
                f"{m['unet']:>8.3f} {step:>8.3f} {m['vae_decoder']:>8.3f} {m['other']:>8.4f} {m['total']:>8.3f} "
                f"{c['images_per_s']:>7.3f}  ({c['min']['total']:.2f}..{c['max']['total']:.2f})"
            )
    lines += ["", f"{'engine':<28} {'load':>8} {'cold':>8} {'peak RSS':>10}"]
    for e in record["engines"]:
        lines.append(
            f"{e['label'][:28]:<28} {e['load_s']:>7.2f}s {e.get('cold_s', 0):>7.2f}s {_gb(e['peak_rss_bytes']):>10}"
        )
    for e in record["engines"]:
        for c in e["configs"]:
            if "fraction_of_peak" in c:
                parts = ", ".join(
                    f"{k} {v * 100:.0f}% ({c['flops'][k] / 1e12:.3f} TFLOP)" for k, v in c["fraction_of_peak"].items()
                )
                lines.append(f"{e['label']} {c['steps']} st, b{c['batch']}: fraction of peak: {parts}")
        for other, per_config in e.get("time_ratio_to", {}).items():
            for c, r, pairs in zip(e["configs"], per_config, e["pair_ratios_to"][other]):
                stages = ", ".join(f"{k} {v:.2f}x" for k, v in r.items() if v is not None)
                pair_text = ", ".join(f"{p:.2f}" for p in pairs)
                lines.append(f"{e['label']} / {other} ({c['steps']} st, b{c['batch']}): {stages}; "
                             f"pairs [{pair_text}]; load {e['load_ratio_to'][other]:.2f}x")
    return "\n".join(lines)
