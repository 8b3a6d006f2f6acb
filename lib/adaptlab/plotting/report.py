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
