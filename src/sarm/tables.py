"""Result tables (markdown + CSV) and the accuracy figure."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def accuracy_table(summaries: dict[str, dict]) -> pd.DataFrame:
    """Per-category accuracy (%) with one column per model; rows as in each summary's `categories`."""
    columns = {}
    for model, summary in summaries.items():
        cats = pd.DataFrame(summary["categories"]).set_index("category")
        columns[model] = (100 * cats["accuracy"]).round(1)
        columns.setdefault("n", cats["n"])
    table = pd.DataFrame(columns)
    return table[["n", *summaries]].reset_index()


def write_table(table: pd.DataFrame, stem: str | Path, title: str) -> None:
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(stem.with_suffix(".csv"), index=False)
    stem.with_suffix(".md").write_text(f"# {title}\n\n{table.to_markdown(index=False)}\n")


def accuracy_figure(tables: dict[str, pd.DataFrame], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(5.5 * len(tables), 3.8), squeeze=False)
    for ax, (name, table) in zip(axes[0], tables.items()):
        models = [c for c in table.columns if c not in ("category", "n")]
        table.set_index("category")[models].plot.bar(ax=ax, rot=30)
        ax.axhline(50, color="grey", lw=0.8, ls="--")
        ax.set_title(name)
        ax.set_ylabel("pair accuracy (%)")
        ax.set_ylim(0, 100)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
