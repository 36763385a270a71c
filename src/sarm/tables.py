"""Result tables (markdown + CSV), the accuracy figure, and the paper's tables (published beside reproduced)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from sarm.schema import LOCAL, REWARDBENCH_2, REWARDBENCH_V1, benchmark

CI_ROWS = ("95 % CI low", "95 % CI high")  # the overall score's bootstrap interval (summary key `interval`)


def accuracy_table(summaries: dict[str, dict]) -> pd.DataFrame:
    """Per-category accuracy (%) with one column per model; rows as in each summary's `categories`, then the
    bounds of the overall score's 95 % bootstrap interval (empty for a summary that records none)."""
    columns, rows = {}, []
    for model, summary in summaries.items():
        cats = pd.DataFrame(summary["categories"]).set_index("category")
        interval = summary.get("interval") or {}
        bounds = pd.Series([interval.get("low"), interval.get("high")], index=list(CI_ROWS), dtype=float)
        columns[model] = (100 * pd.concat([cats["accuracy"], bounds])).round(1)
        columns.setdefault("n", cats["n"])
        rows += [row for row in [*cats.index, *CI_ROWS] if row not in rows]
    table = pd.DataFrame(columns).reindex(rows).astype({"n": "Int64"})
    table.index.name = "category"
    return table[["n", *summaries]].reset_index()


def write_table(table: pd.DataFrame, stem: str | Path, title: str, note: str | None = None) -> None:
    """`stem`.csv and `stem`.md (a title, the table, then `note` if given)."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(stem.with_suffix(".csv"), index=False)
    after = f"\n{note}\n" if note else ""
    cells = table.astype(object).where(table.notna(), None)  # empty cells, not "nan"
    stem.with_suffix(".md").write_text(f"# {title}\n\n{cells.to_markdown(index=False, missingval='')}\n{after}")


def accuracy_figure(tables: dict[str, pd.DataFrame], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(5.5 * len(tables), 3.8), squeeze=False)
    for ax, (name, table) in zip(axes[0], tables.items()):
        models = [c for c in table.columns if c not in ("category", "n")]
        table[~table["category"].isin(CI_ROWS)].set_index("category")[models].plot.bar(ax=ax, rot=30)
        ax.axhline(50, color="grey", lw=0.8, ls="--")
        ax.set_title(name)
        ax.set_ylabel("pair accuracy (%)")
        ax.set_ylim(0, 100)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# The paper's tables: Table 1 (RewardBench 2) and Table 2 (ablations), published beside reproduced rows.
# A row always names the data set it was measured on; a row measured on a local set never sits under an
# official benchmark's columns: local rows have tables of their own, with the local set's categories.
# ---------------------------------------------------------------------------------------------------------------

RB2_COLUMNS = list(REWARDBENCH_2.columns)  # overall, Factuality, Precise IF, Math, Safety, Focus, Ties
V1_COLUMNS = list(REWARDBENCH_V1.columns)  # overall, Chat, Chat Hard, Safety, Reasoning
ROW_COLUMNS = ["model", "size", "data set", "source"]
ABLATIONS = ["SARM", "SAE encoder random init", "token-level SAE"]

PAPER = "arXiv 2508.08746"
RB2_PUBLISHED = REWARDBENCH_2.published  # "RewardBench 2 (official, published)"
V1_PUBLISHED = REWARDBENCH_V1.published

# Published in arXiv 2508.08746 (SARM, AAAI-26), Table 1 (RewardBench 2, %) with the ablation rows of Table 2;
# copied from the summary in ../shared/docs/paper.md. Figures from the paper, not data.
PAPER_REWARDBENCH2 = [
    # model, size, overall, Factuality, Precise IF, Math, Safety, Focus, Ties
    ("SARM-4B", "4.3B", 73.6, 68.5, 42.5, 63.9, 91.3, 96.0, 79.6),
    ("SARM-3B", "2.7B", 64.2, 58.6, 34.4, 62.8, 87.3, 86.3, 55.6),
    ("SARM-2B", "2.0B", 62.5, 55.6, 35.6, 60.7, 84.9, 82.4, 56.0),
    ("SARM-4B, SAE encoder random init", "(4+0.3)B", 68.4, 65.7, 38.4, 64.5, 88.9, 88.2, 64.9),
    ("SARM-4B, token-level SAE", "(4+0.3)B", 71.5, 68.0, 40.6, 62.3, 92.9, 92.5, 72.5),
    ("Skywork-Reward-Llama-3.1-8B-v0.2", "8B", 71.8, 69.7, 40.6, 60.1, 94.2, 94.1, 71.7),
    ("ArmoRM-Llama3-8B-v0.1", "8B", 66.5, 65.7, 41.9, 66.1, 82.2, 76.6, 66.3),
]
# Table 2's rows among them: ablation -> model.
PAPER_ABLATIONS = {
    "SARM": "SARM-4B",
    "SAE encoder random init": "SARM-4B, SAE encoder random init",
    "token-level SAE": "SARM-4B, token-level SAE",
}
# RewardBench v1 overall scores (mean of the four sections) that arXiv 2508.08746 shows only in early figures
# (read off the figures, hence one decimal and no sections).
PAPER_REWARDBENCH_V1 = [
    ("SARM-4B", "4.3B", 91.2),
    ("BT head, Skywork recipe", "8B", 93.1),
    ("ArmoRM-Llama3-8B-v0.1", "8B", 90.4),
]


def ablation_of(spec) -> str | None:
    """Table 2's row for a reward-model spec (`sarm.variants`): the paper's head (linear, on a frozen or fine-tuned
    backbone) over a sequence-level SAE with TopK is "SARM"; the same with `sae: random` or `sae: token` is the
    random-init or token-level ablation; others: None."""
    if spec is None or not spec.paper_head or spec.features != "sae" or not spec.topk:
        return None
    return {"sequence": "SARM", "random": ABLATIONS[1], "token": ABLATIONS[2]}.get(spec.sae)


def measured_on(summary: dict, table: str, stand_in: bool = False) -> str:
    """The data set a summary was measured on, as a row label: official benchmark (and how much of it) or local.
    `stand_in`: the benchmark's data are the miniature's stand-ins (sarm.miniature), scored the official way."""
    bench = benchmark(summary.get("benchmark", LOCAL.key))
    if not bench.official:
        return f"{table} (local, {summary['n_pairs']:,} pairs)"
    n, unit = bench.measured(summary), bench.unit
    if stand_in:
        return f"{bench.name} stand-in (miniature, {n:,} {unit} from ../shared/data; scored the official way, not the benchmark)"
    part = f"{n:,} {unit}" if summary.get("complete") else f"subsample, {n:,} of {bench.full_size:,} {unit}"
    return f"{bench.name} (official, reproduced, {part})"


def _percent(scores: dict, columns: list[str], overall_key: str) -> dict:
    """`columns` of `scores` in % (one decimal); "overall" is read from `overall_key`; missing ones None."""
    row = {}
    for column in columns:
        value = scores.get(overall_key if column == "overall" else column)
        row[column] = None if value is None else round(100 * float(value), 1)
    return row


def _local_scores(summary: dict) -> dict:
    """A local summary's category accuracies and overall (older summaries have only `categories`)."""
    return {row["category"]: row["accuracy"] for row in summary["categories"]}


def leaderboard_rows(path: str | Path, models: list[str], benchmark_key: str) -> pd.DataFrame:
    """Published leaderboard rows (in %) of `models`, in that order; models not on the board are left out.

    ``overall`` is the benchmark's `Benchmark.overall` of a row: RewardBench 2, the board's Score (the mean of
    the six subsets); RewardBench v1, the mean of the four sections, as in the paper (the board's Score also
    folds in Prior Sets).
    """
    from sarm.errors import SarmError

    bench = benchmark(benchmark_key)
    if not bench.columns:
        raise SarmError(f"benchmark {bench.key!r} has no published leaderboard")
    columns = list(bench.columns)
    board = pd.read_csv(path)
    for column in ["model", "Score", *columns[1:]]:
        if column not in board.columns:
            raise SarmError(f"{path}: column {column!r} missing from the leaderboard")
    rows = []
    for model in models:
        found = board[board["model"] == model]
        if found.empty:
            continue
        scores = found.iloc[0].to_dict()
        scores["overall"] = bench.overall(scores)
        rows.append(
            {
                "model": model,
                "size": "",
                "data set": bench.published,
                "source": f"leaderboard ({Path(path).name})",
                **_percent(scores, columns, "overall"),
            }
        )
    return pd.DataFrame(rows, columns=[*ROW_COLUMNS, *columns])


def _published(rows: list[tuple], columns: list[str], data_set: str, source: str) -> list[dict]:
    return [
        {"model": model, "size": size, "data set": data_set, "source": source, **dict(zip(columns, values))}
        for model, size, *values in rows
    ]


def _reproduced(summaries: dict, backbone: str, key: str, stand_in: bool = False) -> list[dict]:
    """One row per (reward model, eval table) measured on benchmark `key`: names, data set and `scores` (fractions)."""
    rows = []
    for (model, table), summary in summaries.items():
        if summary.get("benchmark", LOCAL.key) != key:
            continue
        rows.append(
            {
                "rm": model,
                "model": "length (baseline)" if model == "length" else f"{model} ({backbone})",
                "size": "",
                "data set": measured_on(summary, table, stand_in),
                "source": f"reproduced (results/eval/{model}/{table})",
                "scores": summary.get("benchmark_scores") or _local_scores(summary),
            }
        )
    return rows


def _with_percent(rows: list[dict], columns: list[str], overall_key: str) -> list[dict]:
    return [{**{k: v for k, v in row.items() if k != "scores"}, **_percent(row["scores"], columns, overall_key)} for row in rows]


def _local_columns(rows: list[dict]) -> list[str]:
    """overall, then every category of the local sets, in order of appearance."""
    seen = {}
    for row in rows:
        seen.update(dict.fromkeys(c for c in row["scores"] if c != "overall"))
    return ["overall", *seen]


def _by_data_set(table: pd.DataFrame) -> pd.DataFrame:
    """Rows grouped by data set (in order of first appearance), otherwise in their order."""
    if table.empty:
        return table
    rank = {name: i for i, name in enumerate(table["data set"].unique())}
    return table.sort_values("data set", key=lambda s: s.map(rank), kind="stable").reset_index(drop=True)


def paper_tables(
    summaries: dict[tuple[str, str], dict],
    reward_models: dict[str, dict] | None = None,
    reference: str | Path | None = None,
    leaderboard_models: list[str] = (),
    backbone: str = "",
    stand_in: bool = False,
) -> dict[str, pd.DataFrame]:
    """The paper's tables from evaluation summaries ((reward model, eval table) -> summary.json contents).

    table1_rewardbench2 / table1_rewardbench_v1: published rows (the paper, the leaderboards) and rows
    reproduced on that official benchmark. table1_local: rows measured on local sets, with the local sets'
    categories (a category a set lacks stays empty). table2_ablations: the paper's ablation rows and reproduced
    ones on RewardBench 2; table2_ablations_local: reproduced ablation rows on local sets. Reward models map to
    ablation rows by their spec (`ablation_of`). `reference`: the folder of rewardbench2_leaderboard.csv and
    rewardbench_v1_leaderboard.csv (None: no leaderboard rows). Scores in %. `stand_in`: the official sets are the
    miniature's stand-ins (config key miniature.enabled), and their rows say so.
    """
    from sarm.variants import specs_from_config

    reward_models = reward_models or specs_from_config({})  # default: sarm and dense
    ablation_only = {PAPER_ABLATIONS[name] for name in ABLATIONS[1:]}  # rows of Table 2 only
    rb2_rows = _with_percent(
        _reproduced(summaries, backbone, REWARDBENCH_2.key, stand_in), RB2_COLUMNS, REWARDBENCH_2.overall_key
    )
    v1_rows = _with_percent(
        _reproduced(summaries, backbone, REWARDBENCH_V1.key, stand_in), V1_COLUMNS, REWARDBENCH_V1.overall_key
    )
    local_raw = _reproduced(summaries, backbone, LOCAL.key)
    local_columns = _local_columns(local_raw)
    local_rows = _with_percent(local_raw, local_columns, LOCAL.overall_key)

    rb2_board = v1_board = []
    if reference:
        rb2_board = leaderboard_rows(
            Path(reference) / REWARDBENCH_2.leaderboard, list(leaderboard_models), REWARDBENCH_2.key
        ).to_dict("records")
        v1_board = leaderboard_rows(
            Path(reference) / REWARDBENCH_V1.leaderboard, list(leaderboard_models), REWARDBENCH_V1.key
        ).to_dict("records")
    paper_rb2 = [row for row in PAPER_REWARDBENCH2 if row[0] not in ablation_only]
    tables = {
        "table1_rewardbench2": pd.DataFrame(
            [*_published(paper_rb2, RB2_COLUMNS, RB2_PUBLISHED, f"{PAPER}, Table 1"), *rb2_board, *rb2_rows],
            columns=[*ROW_COLUMNS, *RB2_COLUMNS],
        ),
        "table1_rewardbench_v1": pd.DataFrame(
            [*_published(PAPER_REWARDBENCH_V1, ["overall"], V1_PUBLISHED, f"{PAPER}, figures"), *v1_board, *v1_rows],
            columns=[*ROW_COLUMNS, *V1_COLUMNS],
        ),
        "table1_local": _by_data_set(pd.DataFrame(local_rows, columns=["model", "data set", "source", *local_columns])),
    }

    def ablation_rows(rows):
        out = []
        for row in rows:
            spec = reward_models.get(row["rm"])
            if ablation_of(spec) is not None:
                out.append({"ablation": ablation_of(spec), "mode": spec.kind, **row})
        return sorted(out, key=lambda r: ABLATIONS.index(r["ablation"]))

    paper_rows = {row[0]: row for row in PAPER_REWARDBENCH2}
    published = [
        {"ablation": ablation, "mode": "finetune", **row}  # the paper fine-tunes layers 1..L
        for ablation, model in PAPER_ABLATIONS.items()
        for row in _published([paper_rows[model]], RB2_COLUMNS, RB2_PUBLISHED, f"{PAPER}, Table 2")
    ]
    header = ["ablation", "model", "mode", "data set", "source"]
    tables["table2_ablations"] = _by_data_set(
        pd.DataFrame([*published, *ablation_rows(rb2_rows)], columns=[*header, *RB2_COLUMNS])
    )
    tables["table2_ablations_local"] = _by_data_set(pd.DataFrame(ablation_rows(local_rows), columns=[*header, *local_columns]))
    return tables


def paper_tables_figure(tables: dict[str, pd.DataFrame], path: str | Path) -> None:
    """Grouped bars, one panel per data set: official RewardBench 2 and v1 (published and reproduced rows),
    the ablations on RewardBench 2, and each local set with its own categories."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = [
        (
            "Table 1: RewardBench 2 (official); published solid, reproduced hatched",
            tables["table1_rewardbench2"],
            RB2_COLUMNS,
            "model",
        ),
        ("RewardBench v1 (official); published solid, reproduced hatched", tables["table1_rewardbench_v1"], V1_COLUMNS, "model"),
        ("Table 2: ablations on RewardBench 2 (official)", tables["table2_ablations"], RB2_COLUMNS, "ablation"),
    ]
    local = tables["table1_local"]
    for data_set, rows in local.groupby("data set", sort=False) if not local.empty else []:
        columns = [c for c in local.columns[3:] if rows[c].notna().any()]
        panels.append(
            (
                f"Measured on {data_set}: a local set with its own categories, not comparable with RewardBench",
                rows,
                columns,
                "model",
            )
        )
    fig, axes = plt.subplots(len(panels), 1, figsize=(13, 3.6 * len(panels)), squeeze=False)
    for ax, (title, rows, columns, name) in zip(axes[:, 0], panels):
        x = np.arange(len(columns))
        width = 0.8 / max(len(rows), 1)
        for i, (_, row) in enumerate(rows.iterrows()):
            values = pd.to_numeric(row[columns], errors="coerce").to_numpy(dtype=float)
            is_reproduced = str(row["source"]).startswith("reproduced")
            label = f"{row[name]}" + (f" [{row['model']}]" if name != "model" else "")
            label += f" — {row['source']}" if not is_reproduced else f" — {row['data set']}"
            ax.bar(
                x - 0.4 + width * (i + 0.5),
                values,
                width,
                label=label,
                hatch="//" if is_reproduced else None,
                edgecolor="black" if is_reproduced else None,
                linewidth=0.4,
            )
        ax.set_xticks(x, columns)
        ax.set_ylim(0, 100)
        ax.set_ylabel("score (%)")
        ax.set_title(title, fontsize=10)
        if len(rows):
            ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        else:
            ax.text(0.5, 0.5, "no rows", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
