"""The pair and score tables' columns, and the benchmarks a data set can be, as records.

Importable by every module (no torch, no pandas, nothing of sarm but its error type). A benchmark is a
`Benchmark` record in `BENCHMARKS`, looked up by its key with `benchmark`: what the other modules know of it
(how a data set is recognised as it, how it is scored, its paper-table columns and published leaderboard, its
full size) is read off the record, never branched on by name.

Scoring stays in `sarm.rewardbench`: a record names its scoring rule (`Benchmark.scoring`) and
`sarm.rewardbench.SCORERS` (summaries) and `sarm.ablations.COMPARISONS` (paired comparisons) map that name to
their functions, so this module imports neither.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from sarm.errors import SarmError

# ---------------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------------

# A pair table (`sarm.data`): `prompt` is a list of {"role", "content"} messages, `chosen` / `rejected` the two
# judged responses. Optional columns travel with a table when it has them: a grouped benchmark's pairs share
# `group` (one prompt) and name the completions they compare; an official benchmark's pairs carry `benchmark`.
COLUMNS: list[str] = ["id", "prompt", "chosen", "rejected", "subset", "category", "dataset"]
BENCHMARK_COLUMN = "benchmark"
GROUP_COLUMNS = ["group", "chosen_index", "rejected_index"]
OPTIONAL_COLUMNS: list[str] = [*GROUP_COLUMNS, BENCHMARK_COLUMN]

# A per-example score table (`sarm.rewardbench`): a pair is right when the chosen response scores strictly higher.
SCORE_COLUMNS = ["id", "subset", "category", "score_chosen", "score_rejected"]
PAIR_COLUMNS = ["id", "subset", "category", "chosen", "rejected"]  # the pair columns scoring needs
PASS_THROUGH = [*GROUP_COLUMNS, BENCHMARK_COLUMN]  # optional columns a score table keeps from its pairs

# ---------------------------------------------------------------------------------------------------------------
# The official benchmarks' constants
# ---------------------------------------------------------------------------------------------------------------

# RewardBench v1's official constants, from allenai/reward-bench
# rewardbench/constants.py (EXAMPLE_COUNTS, SUBSET_MAPPING), commit a32e272b3e01,
# and the section formula of rewardbench/utils.py calculate_scores_per_section.
# math-prm is up-weighted to 984 (it has 447 pairs: "upweighting to be equal to code",
# 6 x 164) so that math and code each count half in Reasoning.
# xstest: that constants.py lists should-refuse 250 / should-respond 154, the two
# swapped against the subsets' real sizes (154 / 250, the denominators of every
# published per-subset accuracy). The published leaderboard reproduces only with the
# real sizes (mightbe/Better-PairRM Safety 0.8203; 0.8321 with the swapped counts),
# so the real sizes are used here, as in most copies of these constants.
EXAMPLE_COUNTS: dict[str, int] = {
    "alpacaeval-easy": 100,
    "alpacaeval-length": 95,
    "alpacaeval-hard": 95,
    "mt-bench-easy": 28,
    "mt-bench-med": 40,
    "mt-bench-hard": 37,
    "math-prm": 984,
    "refusals-dangerous": 100,
    "refusals-offensive": 100,
    "llmbar-natural": 100,
    "llmbar-adver-neighbor": 134,
    "llmbar-adver-GPTInst": 92,
    "llmbar-adver-GPTOut": 47,
    "llmbar-adver-manual": 46,
    "xstest-should-refuse": 154,
    "xstest-should-respond": 250,
    "donotanswer": 136,
    "hep-cpp": 164,
    "hep-go": 164,
    "hep-java": 164,
    "hep-js": 164,
    "hep-python": 164,
    "hep-rust": 164,
}

SECTIONS: dict[str, list[str]] = {
    "Chat": [
        "alpacaeval-easy",
        "alpacaeval-length",
        "alpacaeval-hard",
        "mt-bench-easy",
        "mt-bench-med",
    ],
    "Chat Hard": [
        "mt-bench-hard",
        "llmbar-natural",
        "llmbar-adver-neighbor",
        "llmbar-adver-GPTInst",
        "llmbar-adver-GPTOut",
        "llmbar-adver-manual",
    ],
    "Safety": [
        "refusals-dangerous",
        "refusals-offensive",
        "xstest-should-refuse",
        "xstest-should-respond",
        "donotanswer",
    ],
    "Reasoning": [
        "math-prm",
        "hep-cpp",
        "hep-go",
        "hep-java",
        "hep-js",
        "hep-python",
        "hep-rust",
    ],
}

# RewardBench 2 (allenai/reward-bench-2, split test: 1,865 prompts; dataset card and arXiv 2506.01937).
V2_PROMPTS: dict[str, int] = {
    "Factuality": 475,
    "Precise IF": 160,
    "Math": 183,
    "Safety": 450,
    "Focus": 495,
    "Ties": 102,
}
# Pairs per v1 subset in the `filtered` split (2,985): EXAMPLE_COUNTS but math-prm's real 447.
V1_PAIRS: dict[str, int] = {**EXAMPLE_COUNTS, "math-prm": 447}

# ---------------------------------------------------------------------------------------------------------------
# Benchmarks
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Benchmark:
    """What the workflow knows of one benchmark (or of "local", any other data set).

    key: the config key `benchmark` of a data set, the pair and score tables' `benchmark` column, a summary's
        `benchmark`. name: its name in table rows. scoring: the name of its scoring rule, a key of
        `sarm.rewardbench.SCORERS` and `sarm.ablations.COMPARISONS`: "best_of_n" (per prompt, best-of-4 and
        Ties), "sections" (section-weighted pair accuracy) or "pairs" (category accuracies by size).
    sources: the (hub id, split, format) of a config entry recognised as it without a `benchmark` key.
    format: the data format its rows must be read in (None: any).
    sizes: its full size per subset, in `unit`s (None: not an official benchmark).
    columns: its paper-table columns, "overall" then its subsets or sections (empty: the data's own categories).
    overall_key: the key of the overall score among a summary's `benchmark_scores`.
    board_overall: the leaderboard's column that is the overall (None: the mean of `columns[1:]`).
    leaderboard: the file name of its published leaderboard in config key paper_tables.reference.
    """

    key: str
    name: str
    scoring: str
    sources: tuple[tuple[str, str, str], ...] = ()
    format: str | None = None
    sizes: Mapping[str, int] | None = field(default=None, compare=False)
    unit: str = "pairs"
    columns: tuple[str, ...] = ()
    overall_key: str = "overall"
    board_overall: str | None = None
    leaderboard: str | None = None

    @property
    def official(self) -> bool:
        """Whether it is an official benchmark, scored the official way (else a local set)."""
        return self.sizes is not None

    @property
    def full_size(self) -> int:
        """Its size in full, in `unit`s (1,865 prompts; 2,985 pairs)."""
        return sum(self.sizes.values())

    @property
    def published(self) -> str:
        """The `data set` of its published rows (the paper, the leaderboard)."""
        return f"{self.name} (official, published)"

    def measured(self, summary: Mapping) -> int:
        """How much of it a summary (`sarm.rewardbench.summarize`) was measured on, in `unit`s."""
        return sum(summary["n_prompts"].values()) if self.unit == "prompts" else summary["n_pairs"]

    def overall(self, row: Mapping) -> float:
        """The overall of a published leaderboard row: its `board_overall` column, else the mean of `columns[1:]`."""
        if self.board_overall is not None:
            return row[self.board_overall]
        parts = self.columns[1:]
        return sum(row[c] for c in parts) / len(parts)


REWARDBENCH_V1 = Benchmark(
    key="rewardbench-v1",
    name="RewardBench v1",
    scoring="sections",
    sources=(("allenai/reward-bench", "filtered", "rewardbench"),),
    sizes=MappingProxyType(V1_PAIRS),
    unit="pairs",
    columns=("overall", *SECTIONS),
    overall_key="score",
    board_overall=None,  # the paper's overall, the mean of the four sections; the board's Score also folds in Prior Sets
    leaderboard="rewardbench_v1_leaderboard.csv",
)
REWARDBENCH_2 = Benchmark(
    key="rewardbench-2",
    name="RewardBench 2",
    scoring="best_of_n",
    sources=(("allenai/reward-bench-2", "test", "rewardbench2"),),
    format="rewardbench2",
    sizes=MappingProxyType(V2_PROMPTS),
    unit="prompts",
    columns=("overall", *V2_PROMPTS),
    overall_key="score",
    board_overall="Score",  # the mean of the six subsets
    leaderboard="rewardbench2_leaderboard.csv",
)
LOCAL = Benchmark(key="local", name="local", scoring="pairs")

BENCHMARKS: dict[str, Benchmark] = {b.key: b for b in (REWARDBENCH_V1, REWARDBENCH_2, LOCAL)}
# (hub id, split, format) -> the benchmark such a config entry is, unless it names `benchmark`.
OFFICIAL_SOURCES: dict[tuple[str, str, str], str] = {s: b.key for b in BENCHMARKS.values() for s in b.sources}


def benchmark(key: str) -> Benchmark:
    """The record of benchmark `key`; SarmError (one line) for an unknown key."""
    if isinstance(key, str) and key in BENCHMARKS:
        return BENCHMARKS[key]
    raise SarmError(f"unknown benchmark {key!r} (known: {', '.join(BENCHMARKS)})")
