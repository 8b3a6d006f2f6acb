"""A one-page Markdown report of a landscape study: a table per run and the figures."""

from __future__ import annotations

import os
from pathlib import Path

from adaptlab.extract.reader import ExtractionRun
from adaptlab.io import atomic_open


def write_report(
    path: Path,
    runs: list[ExtractionRun],
    summary: list[dict],
    figures: list[Path],
    title: str = "Representation landscape",
    notes: list[str] | None = None,
) -> Path:
    """Write ``path`` (Markdown): model and data, a row per run, then every figure.

    Args:
        path: the report file.
        runs: the extraction runs analysed.
        summary: per-run rows with ``run``, ``n``, ``id_peak_layer``, ``id_peak``,
            ``ari_subjects_peak_layer``, ``ari_subjects_peak``.
        figures: PNG files to include (linked relative to the report).
        title: the report's heading.
        notes: paragraphs added after the table (e.g. how a fine-tuned run was trained).
    """
    by_name = {row["run"]: row for row in summary}
    first = runs[0].manifest
    subjects = sorted(set(runs[0].statistics["subjects"]))
    described = first["model"].get("description")
    model = f"`{first['model']['name']}`" + (f" ({described})" if described else "")
    lines = [
        f"# {title}",
        "",
        f"Model {model}; {first['dataset']['name']} {first['dataset']['split']}"
        f" split, {runs[0].n_examples} questions from {len(subjects)} subjects"
        f" ({', '.join(s.replace('_', ' ') for s in subjects)}); representation: {first['token']}"
        f" token at `{first['points'][0]}` of every layer.",
        "",
        "| run | shots | N | accuracy (A-D) | macro | ID peak (layer: ID) "
        "| ARI subjects peak (layer: ARI) |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        acc = run.manifest["accuracy"] or {}
        row = by_name.get(run.name, {})
        lines.append(
            f"| {run.name} | {run.manifest['prompt']['num_shots']} | {run.n_examples} "
            f"| {acc.get('constrained_micro', float('nan')):.3f} "
            f"| {acc.get('constrained_macro', float('nan')):.3f} "
            f"| l{row.get('id_peak_layer', '?')}: {row.get('id_peak', float('nan')):.1f} "
            f"| l{row.get('ari_subjects_peak_layer', '?')}: "
            f"{row.get('ari_subjects_peak', float('nan')):.3f} |"
        )
    shots = runs[0].manifest["prompt"].get("shots_source")
    if shots:
        lines += ["", f"Few-shot pool: {shots}."]
    for note in notes or []:
        lines += ["", note]
    lines.append("")
    for figure in figures:
        rel = os.path.relpath(figure, path.parent)
        lines += [f"## {figure.stem.replace('_', ' ')}", "", f"![{figure.stem}]({rel})", ""]
    with atomic_open(path) as handle:
        handle.write("\n".join(lines) + "\n")
    return path


def _cell(value: float | None, digits: int = 3) -> str:
    if value is None or value != value:
        return "n/a"
    return f"{round(value, digits) + 0.0:.{digits}f}"  # + 0.0: no "-0.000"


def graft_study_section(summary: dict, heading: str = "##") -> str:
    """Markdown tables of a graft study (``scripts/graft_study.py``'s ``summary.json``).

    Args:
        summary: ``{"sweep": ..., "overlap": ..., "continual": ...}``, any of them.
        heading: the Markdown heading level of each experiment's title.

    Returns:
        The section: one table per experiment present.
    """
    lines = []
    if "sweep" in summary:
        sweep = summary["sweep"]
        records = sweep["records"]
        first = records[0]
        ood = sorted(first["ood"])
        lines += [
            f"{heading} Graft size sweep ({sweep['task']}, test split)",
            "",
            f"θ_pre: accuracy {_cell(first['base']['accuracy'])}, ECE "
            f"{_cell(first['base']['ece'])}; θ_ft: accuracy {_cell(first['finetuned']['accuracy'])}"
            f", ECE {_cell(first['finetuned']['ece'])}. Recovery: grafted / fine-tuned, and the "
            "share of fine-tuning's gain over θ_pre.",
            "",
            "| mask | sparsity | grafted | of eligible | accuracy | ECE | recovery | gain "
            + "".join(f"| OOD {t} acc | OOD {t} ECE " for t in ood)
            + "|",
            "|---|---|---|---|---|---|---|---" + "|---|---" * len(ood) + "|",
        ]
        for r in records:
            cells = [
                r["kind"], f"{r['sparsity']:g}", f"{r['n_grafted']:,}",
                f"{r['fraction_eligible']:.2e}", _cell(r["accuracy"]), _cell(r["ece"]),
                _cell(r["recovery"]["relative"]), _cell(r["recovery"]["gain"]),
            ]  # fmt: skip
            for t in ood:
                cells += [_cell(r["ood"][t]["grafted"]["accuracy"]),
                          _cell(r["ood"][t]["grafted"]["ece"])]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
        for t in ood:
            base, ft = first["ood"][t]["base"], first["ood"][t]["finetuned"]
            lines += [
                "",
                f"OOD {t}: θ_pre accuracy {_cell(base['accuracy'])} (ECE {_cell(base['ece'])}), "
                f"θ_ft {_cell(ft['accuracy'])} (ECE {_cell(ft['ece'])}).",
            ]
        lines.append("")
    if "overlap" in summary:
        o = summary["overlap"]
        tasks = o["tasks"]
        lines += [
            f"{heading} Mask overlap |g_i ∩ g_j| / |g_j| ({o['setting']} fine-tuning, sparsity "
            f"{o['sparsity']:g})",
            "",
            "| g_i \\ g_j | " + " | ".join(f"{t} ({o['sizes'][t]:,})" for t in tasks) + " |",
            "|---" * (len(tasks) + 1) + "|",
        ]
        for task, row in zip(tasks, o["overlap"], strict=True):
            lines.append(f"| {task} | " + " | ".join(_cell(v) for v in row) + " |")
        lines.append("")
    if "continual" in summary:
        c = summary["continual"]
        a, b = c["tasks"]["A"], c["tasks"]["B"]
        names = {
            "pre": "θ_pre",
            "A": "θ_A",
            "AB": "θ_AB",
            "AB+g_A": "θ_AB, g_A restored",
            "pre+g_A": "θ_pre + g_A ⊙ Δ_A",
        }
        lines += [
            f"{heading} Continual fine-tuning {a} → {b} (g_A: {c['n_grafted']:,} entries, "
            f"sparsity {c['sparsity']:g})",
            "",
            f"| model | {a} accuracy | {a} ECE | {b} accuracy | {b} ECE |",
            "|---|---|---|---|---|",
        ]
        for key, label in names.items():
            m = c["models"][key]
            lines.append(
                f"| {label} | {_cell(m[a]['accuracy'])} | {_cell(m[a]['ece'])} "
                f"| {_cell(m[b]['accuracy'])} | {_cell(m[b]['ece'])} |"
            )
        lines += [
            "",
            f"Forgetting of {a}: {_cell(c['forgetting_A'])}; restoring g_A gains "
            f"{_cell(c['restored_gain_A'])} on {a} and costs {_cell(c['restored_cost_B'])} on {b} "
            "(accuracy). " + c["protocol"],
            "",
        ]
    return "\n".join(lines)


def write_graft_report(path: Path, summary: dict, figures: list[Path]) -> Path:
    """Write ``path`` (Markdown): the graft study's tables, then its figures."""
    lines = ["# Skill localization by grafting", "", graft_study_section(summary)]
    for figure in figures:
        rel = os.path.relpath(figure, path.parent)
        lines += [f"## {figure.stem.replace('_', ' ')}", "", f"![{figure.stem}]({rel})", ""]
    with atomic_open(path) as handle:
        handle.write("\n".join(lines) + "\n")
    return path
