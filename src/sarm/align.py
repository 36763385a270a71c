"""Best-of-N with a reward model, judged offline: pick the candidate the reward model scores highest.

The input is a best-of-N file (`read_bon`): per prompt, N candidate responses from one policy, each already
judged against a reference response (`win_prob_vs_ref`, the judge's probability that the candidate wins).
A selector's win rate is the mean, over prompts, of its pick's win probability (in %). Baselines: random
(the mean over all candidates: the exact expectation of a random pick, not candidate 0), longest and
shortest (in characters) and the oracle (the best candidate). `win_rate_curve` subsamples the N candidates
(seeded random subsets) to give the win rate at every smaller N. Reward models score the candidates from
hidden states cached once (`candidate_sequences` -> `sarm.activations.cache_sequences`), so one forward
pass serves SARM and the dense baseline alike.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from sarm.data import read_records
from sarm.errors import SarmError

BASELINES = ("random", "longest", "shortest", "oracle")
EXPECTED = "id, instruction, candidates: [{output, win_prob_vs_ref}, ...]"


def _bad_row(path, number: int, why: str):
    return SarmError(f"{path}: row {number} is not a best-of-N row ({why}); expected fields {EXPECTED}")


def read_bon(path: str | Path, max_prompts: int | None = None, seed: int = 0) -> pd.DataFrame:
    """One row per (prompt, candidate): id, prompt (chat messages), instruction, candidate (its position),
    response, win_prob, n_chars. `max_prompts` keeps a seeded sample of the prompts, in file order."""
    records = read_records(path)
    if not records:
        raise SarmError(f"{path}: no rows")
    rows, n_candidates = [], None
    for number, record in enumerate(records, start=1):
        missing = [field for field in ("instruction", "candidates") if field not in record]
        if missing:
            raise _bad_row(path, number, f"missing {', '.join(missing)}; it has {', '.join(sorted(record)) or 'no fields'}")
        instruction, candidates = record["instruction"], record["candidates"]
        if not isinstance(instruction, str) or not instruction.strip():
            raise _bad_row(path, number, "instruction is not a non-empty string")
        if not isinstance(candidates, list) or not candidates:
            raise _bad_row(path, number, "candidates is not a non-empty list")
        if n_candidates is None:
            n_candidates = len(candidates)
        elif len(candidates) != n_candidates:
            raise _bad_row(
                path, number, f"{len(candidates)} candidates where row 1 has {n_candidates}; N must be the same for every prompt"
            )
        prompt_id = str(record.get("id", number))
        for position, candidate in enumerate(candidates):
            if not isinstance(candidate, dict) or not {"output", "win_prob_vs_ref"} <= set(candidate):
                have = sorted(candidate) if isinstance(candidate, dict) else type(candidate).__name__
                raise _bad_row(path, number, f"candidate {position} has {have}")
            output, win = candidate["output"], candidate["win_prob_vs_ref"]
            if not isinstance(output, str):
                raise _bad_row(path, number, f"candidate {position}: output is not a string")
            if isinstance(win, bool) or not isinstance(win, (int, float)) or not 0 <= win <= 1:
                raise _bad_row(path, number, f"candidate {position}: win_prob_vs_ref = {win!r} is not a probability")
            rows.append(
                {
                    "id": prompt_id,
                    "prompt": [{"role": "user", "content": instruction}],
                    "instruction": instruction,
                    "candidate": position,
                    "response": output,
                    "win_prob": float(win),
                    "n_chars": len(output),
                }
            )
    table = pd.DataFrame(rows)
    ids = table["id"].unique()
    if len(ids) * n_candidates != len(table):
        raise SarmError(f"{path}: duplicated prompt ids")
    if max_prompts is not None and max_prompts < len(ids):
        keep = set(ids[np.random.default_rng(seed).permutation(len(ids))[:max_prompts]])
        table = table[table["id"].isin(keep)].reset_index(drop=True)
    return table


def _grid(candidates: pd.DataFrame, column: str) -> np.ndarray:
    """[prompts, N] of one column, prompts in table order and candidates by position."""
    n = candidates["candidate"].nunique()
    if len(candidates) % n or (candidates["candidate"].to_numpy() != np.tile(np.arange(n), len(candidates) // n)).any():
        raise SarmError("best-of-N table: rows must hold every prompt's candidates 0..N-1 in order")
    return candidates[column].to_numpy(dtype=float).reshape(-1, n)


def win_rates(candidates: pd.DataFrame, scorers: list[str]) -> pd.DataFrame:
    """Win rate (%), its standard error over prompts and the picks' mean length, per selector: the
    baselines, then each score column in `scorers` (the highest score is picked)."""
    win, chars = _grid(candidates, "win_prob"), _grid(candidates, "n_chars")
    rows = []
    for name in (*scorers, *BASELINES):
        if name == "random":
            per_prompt, length = win.mean(1), chars.mean(1)
        else:
            key = {"longest": chars, "shortest": -chars, "oracle": win}.get(name)
            pick = (key if key is not None else _grid(candidates, name)).argmax(1)
            per_prompt, length = win[np.arange(len(win)), pick], chars[np.arange(len(win)), pick]
        rows.append(
            {
                "selector": name,
                "N": win.shape[1],
                "prompts": len(win),
                "win_rate": 100 * per_prompt.mean(),
                "se": 100 * per_prompt.std(ddof=1) / math.sqrt(len(win)) if len(win) > 1 else float("nan"),
                "mean_length": length.mean(),
            }
        )
    return pd.DataFrame(rows)


def win_rate_curve(candidates: pd.DataFrame, scorers: list[str], draws: int = 200, seed: int = 0) -> pd.DataFrame:
    """Win rate (%) at every N from 1 to all candidates: each selector picks within a random subset of N
    candidates per prompt, averaged over `draws` seeded subsets (the same subsets for every selector).
    Random is the mean over all candidates at every N (a random subset's random pick has that expectation)."""
    win, chars = _grid(candidates, "win_prob"), _grid(candidates, "n_chars")
    keys = {name: _grid(candidates, name) for name in scorers}
    keys.update(longest=chars, shortest=-chars, oracle=win)
    n_prompts, n = win.shape
    order = np.argsort(np.random.default_rng(seed).random((draws, n_prompts, n)), axis=2)  # a permutation per prompt
    rows = []
    for size in range(1, n + 1):
        subset = np.zeros((draws, n_prompts, n), dtype=bool)
        np.put_along_axis(subset, order[:, :, :size], True, axis=2)
        row = {"N": size}
        for name, key in keys.items():
            pick = np.where(subset, key[None], -np.inf).argmax(2)
            row[name] = 100 * np.take_along_axis(np.broadcast_to(win, subset.shape), pick[..., None], 2).mean()
        row["random"] = 100 * win.mean()
        rows.append(row)
    return pd.DataFrame(rows)[["N", *scorers, *BASELINES]]


def published_results(results_json: str | Path, leaderboard_csv: str | Path | None = None) -> pd.DataFrame:
    """AI2's best-of-16 AlpacaEval results (reward-bench `bon_eval`): each reward model's pick of 16
    Tulu-2-DPO-13B samples on 805 prompts, judged like ours; random = the mean of the 16 single-sample runs."""
    try:
        data = json.loads(Path(results_json).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SarmError(f"{results_json}: cannot read the published best-of-N results ({e})") from None
    rows = []
    for name, entry in data.items():
        if not isinstance(entry, dict) or not {"win_rate", "n_total"} <= set(entry):
            raise SarmError(f"{results_json}: entry {name!r} lacks win_rate / n_total")
        if name.startswith("random_"):
            continue  # single sample-index runs; their mean over all 16 indices comes from the leaderboard
        rows.append(
            {
                "selector": name,
                "N": 16,
                "prompts": entry["n_total"],
                "win_rate": entry["win_rate"],
                "se": entry.get("standard_error"),
                "mean_length": entry.get("avg_length"),
            }
        )
    if leaderboard_csv is not None:
        board = pd.read_csv(leaderboard_csv)
        if not {"model_name", "win_rate", "n_total", "avg_length"} <= set(board.columns):
            raise SarmError(f"{leaderboard_csv}: expected columns model_name, win_rate, n_total, avg_length")
        rows.append(
            {
                "selector": "random",
                "N": 16,
                "prompts": int(board["n_total"].iloc[0]),
                "win_rate": board["win_rate"].mean(),
                "se": None,
                "mean_length": board["avg_length"].mean(),
            }
        )
    return pd.DataFrame(rows).sort_values("win_rate", ascending=False, kind="stable")


def winrate_table(ours: pd.DataFrame, published: pd.DataFrame | None) -> pd.DataFrame:
    """Our selectors, then the published ones, labelled by source (N and prompts differ: see the columns)."""
    table = ours.assign(source="this run")
    if published is not None and len(published):
        table = pd.concat([table, published.assign(source="published best-of-16 (AI2 bon_eval)")], ignore_index=True)
    table = table[["source", "selector", "N", "prompts", "win_rate", "se", "mean_length"]]
    return table.round({"win_rate": 1, "se": 1, "mean_length": 0})


def curve_figure(curve: pd.DataFrame, published: pd.DataFrame | None, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 4.2))
    styles = {"oracle": ":", "random": "--", "longest": "-.", "shortest": "-."}
    for name in curve.columns.drop("N"):
        ax.plot(curve["N"], curve[name], styles.get(name, "-"), marker="o" if name not in styles else None, ms=3, label=name)
    if published is not None and len(published):
        ax.scatter(
            [16] * len(published), published["win_rate"], marker="x", color="grey", label="published best-of-16 (805 prompts)"
        )
    ax.set_xlabel("N (candidates per prompt)")
    ax.set_ylabel("win rate vs reference (%)")
    ax.set_title("Best-of-N on AlpacaEval (Tulu-2-DPO-13B samples, GPT-4-turbo judge)", fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def read_candidates(path: str | Path) -> pd.DataFrame:
    """The candidate table written by the `bon_candidates` rule; `prompt` comes back as lists of plain dicts."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    df = table.drop(["prompt"]).to_pandas()
    df.insert(1, "prompt", table.column("prompt").to_pylist())
    return df


def score_candidates(reward_models: dict, cache, candidates: pd.DataFrame) -> pd.DataFrame:
    """Per-candidate scores of each reward model, all from the same cached hidden states (one forward pass
    for every model that reads the same layer of the same base model; `score_cache` reads what a model needs)."""
    index = cache.index
    if index[["id", "candidate"]].astype(str).values.tolist() != candidates[["id", "candidate"]].astype(str).values.tolist():
        raise SarmError(f"{cache.folder} was cached from other candidates than the table given; re-run its rule")
    scores = candidates[["id", "candidate", "win_prob", "n_chars"]].assign(
        n_tokens=index["n_tokens"].to_numpy(), truncated=index["truncated"].to_numpy()
    )
    from sarm.reward_model import check_finite  # not at the top: the reporting rules need no torch

    for name, model in reward_models.items():
        if model.config["hidden_size"] != cache.hidden_size:
            raise SarmError(
                f"reward model {name} reads {model.config['hidden_size']}-wide states, the cache holds {cache.hidden_size}"
            )
        scores[name] = model.score_cache(cache)[0].numpy()
        check_finite(scores[name], model, f"the cache {cache.folder}")
    return scores
