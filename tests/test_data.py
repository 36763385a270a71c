"""Tests of sarm.data on the real preference files in ../shared/data and on small hand-made files."""

import gzip
import json
import logging
from pathlib import Path

import pandas as pd
import pytest

from sarm.data import COLUMNS, FORMATS, load_hub_records, load_pairs, read_pairs, read_records, split_pairs, write_pairs
from sarm.errors import SarmError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HH_HELPFUL = DATA / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"
HH_HARMLESS = DATA / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
RB_LIKE = DATA / "rewardbench-like" / "rb_like_eval.jsonl.gz"
LLMBAR = DATA / "llmbar" / "LLMBar" / "Natural" / "dataset.json"


@pytest.fixture(scope="module")
def helpful():
    return load_pairs("hh-helpful", {"path": str(HH_HELPFUL), "format": "hh_rlhf"})


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def rb_row(i, chosen="a good answer", rejected="a bad answer", **extra):
    return {"id": f"r{i}", "prompt": f"question {i}", "chosen": chosen, "rejected": rejected, "subset": "s", **extra}


# --- real data -------------------------------------------------------------------------------------------------


def test_hh_helpful_skips_and_counts_bad_rows(helpful, caplog):
    table, report = helpful
    assert list(table.columns) == COLUMNS
    assert report["rows_read"] == 2354
    # Two helpful-base pairs have chosen == rejected; four have a blank rejected response.
    assert report["skipped"]["identical_responses"] == 2
    assert report["skipped"]["empty_response"] == 4
    assert report["pairs_kept"] == len(table) == 2354 - sum(report["skipped"].values())
    assert not (table["chosen"] == table["rejected"]).any()
    assert table["id"].is_unique
    assert set(table["subset"]) == set(table["category"]) == set(table["dataset"]) == {"hh-helpful"}
    # The counts are logged, naming the data set (load again: the fixture ran before caplog was active).
    with caplog.at_level(logging.WARNING, logger="sarm.data"):
        load_pairs("hh-helpful", {"path": str(HH_HELPFUL), "format": "hh_rlhf"})
    assert "hh-helpful" in caplog.text and "identical_responses=2" in caplog.text


def test_hh_multi_turn_row_parses_into_messages(helpful):
    row = helpful[0].set_index("id").loc["hh-helpful-1"]
    assert [m["role"] for m in row["prompt"]] == ["user", "assistant", "user", "assistant", "user"]
    first = "How can I find out what types of butterflies are in my area?"
    assert row["prompt"][0] == {"role": "user", "content": first}
    assert row["prompt"][2] == {"role": "user", "content": "I am in Oregon."}
    assert row["prompt"][-1]["content"] == "Great. What are some common species then?"
    assert row["chosen"] == (
        "About 150 species of butterflies live in Oregon, with about 100 species are moths, and about 20 species "
        "are common here year-round, and another 10 species are seen here year-round.  I suggest you keep an eye "
        "out for skippers, gossamer wings, and red admirals."
    )
    assert row["rejected"].startswith("Are you interested in just the common butterflies?")


def test_hh_harmless_uses_config_category():
    table, report = load_pairs("hh-harmless", {"path": str(HH_HARMLESS), "format": "hh_rlhf", "category": "safety"})
    # Four blank rejected responses; nine transcripts whose prompts differ or do not alternate user/assistant.
    assert report == {"rows_read": 2312, "pairs_kept": 2299, "skipped": {"empty_response": 4, "malformed_transcript": 9}}
    assert len(table) == 2299
    assert set(table["subset"]) == {"hh-harmless"}
    assert set(table["category"]) == {"safety"}
    assert all(m["role"] in ("user", "assistant") for prompt in table["prompt"] for m in prompt)
    assert all(prompt[-1]["role"] == "user" for prompt in table["prompt"])


def test_rewardbench_like_categories():
    table, report = load_pairs("rb-like", {"path": str(RB_LIKE), "format": "rewardbench"})
    assert report == {"rows_read": 1847, "pairs_kept": 1847, "skipped": {}}
    assert table["category"].value_counts().to_dict() == {"chat": 200, "chat_hard": 419, "safety": 244, "reasoning": 984}
    assert table.loc[0, "id"] == "mtbench-human-0" and table.loc[0, "subset"] == "mtbench-human"
    assert table.loc[0, "prompt"] == [
        {
            "role": "user",
            "content": "Explain what's base rate fallacy and list five "
            "specific examples of how politicians use it for campaigns.",
        }
    ]


def test_llmbar_chosen_follows_label():
    raw = read_records(LLMBAR)
    table, report = load_pairs("llmbar-natural", {"path": str(LLMBAR), "format": "llmbar", "category": "chat_hard"})
    assert report["pairs_kept"] == len(raw) == 100
    for row, pair in zip(raw, table.itertuples()):
        assert pair.chosen == row[f"output_{row['label']}"]
        assert pair.rejected == row[f"output_{3 - row['label']}"]
        assert pair.prompt == [{"role": "user", "content": row["input"]}]
    assert table.loc[7, "id"] == "llmbar-natural-7"
    assert set(table["category"]) == {"chat_hard"}


def test_max_pairs_is_a_seeded_subset(helpful):
    spec = {"path": str(HH_HELPFUL), "format": "hh_rlhf", "max_pairs": 50}
    first, report = load_pairs("hh-helpful", spec)
    again, _ = load_pairs("hh-helpful", spec)
    other, _ = load_pairs("hh-helpful", {**spec, "seed": 1})
    assert len(first) == report["pairs_kept"] == 50
    assert first["id"].tolist() == again["id"].tolist()
    assert first["id"].tolist() != other["id"].tolist()
    assert set(first["id"]) <= set(helpful[0]["id"])


# --- formats on hand-made rows ---------------------------------------------------------------------------------


def test_chat_format(tmp_path):
    system = {"role": "system", "content": "Be brief."}
    user = {"role": "user", "content": "Name a prime."}
    rows = [
        # Skywork-style full conversations.
        {
            "chosen": [system, user, {"role": "assistant", "content": "7"}],
            "rejected": [system, user, {"role": "assistant", "content": "8"}],
        },
        # A prompt column with string / one-message responses.
        {"prompt": "Name a colour.", "chosen": "red", "rejected": [{"role": "assistant", "content": "seven"}]},
        {"prompt": [user], "chosen": "2", "rejected": "4"},
        # Different conversations before the response: malformed.
        {
            "chosen": [user, {"role": "assistant", "content": "7"}],
            "rejected": [system, user, {"role": "assistant", "content": "8"}],
        },
        # Last message is not the assistant's: malformed.
        {"chosen": [user], "rejected": [user, {"role": "assistant", "content": "8"}]},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    table, report = load_pairs("chat", {"path": str(path), "format": "chat"})
    assert report == {"rows_read": 5, "pairs_kept": 3, "skipped": {"malformed_transcript": 2}}
    assert table.loc[0, "prompt"] == [system, user] and table.loc[0, "chosen"] == "7"
    assert table.loc[1, "prompt"] == [{"role": "user", "content": "Name a colour."}]
    assert table.loc[1, "rejected"] == "seven"
    assert table.loc[2, "prompt"] == [user]
    assert table["id"].tolist() == ["chat-0", "chat-1", "chat-2"]


def test_bad_responses_are_skipped_counted_and_logged(tmp_path, caplog):
    rows = [
        rb_row(0),
        rb_row(1, chosen="   "),
        rb_row(2, rejected=3),
        rb_row(3, chosen=None),
        rb_row(4, chosen="same", rejected="same"),
        rb_row(5, category="chat"),
    ]
    path = write_jsonl(tmp_path / "rb.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="sarm.data"):
        table, report = load_pairs("tiny", {"path": str(path), "format": "rewardbench", "category": "cfg"})
    assert report["skipped"] == {"empty_response": 1, "non_string_response": 1, "missing_response": 1, "identical_responses": 1}
    assert table["id"].tolist() == ["r0", "r5"]
    assert table["category"].tolist() == ["cfg", "chat"]
    assert "tiny" in caplog.text and "empty_response=1" in caplog.text


def test_all_rows_invalid_names_dataset(tmp_path):
    path = write_jsonl(tmp_path / "rb.jsonl", [rb_row(0, chosen=""), rb_row(1, chosen="x", rejected="x")])
    with pytest.raises(SarmError, match="dataset empty-set"):
        load_pairs("empty-set", {"path": str(path), "format": "rewardbench"})


def test_missing_column_names_column_and_file(tmp_path):
    path = write_jsonl(tmp_path / "nochosen.jsonl", [{"prompt": "q", "rejected": "r", "subset": "s"}])
    with pytest.raises(SarmError, match=r"'chosen'.*nochosen\.jsonl"):
        load_pairs("x", {"path": str(path), "format": "rewardbench"})


def test_duplicated_id_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "dup.jsonl", [rb_row(0), rb_row(1), {**rb_row(2), "id": "r1"}])
    with pytest.raises(SarmError, match="duplicated id 'r1'"):
        load_pairs("x", {"path": str(path), "format": "rewardbench"})


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"format": "rewardbench"}, "exactly one of 'path' or 'hub'"),
        ({"path": "a.jsonl", "hub": "org/a", "format": "rewardbench"}, "exactly one of 'path' or 'hub'"),
        ({"path": "a.jsonl", "format": "csv"}, "'format' must be one of"),
        ({"path": "a.jsonl", "format": "chat", "max_pairs": 0}, "'max_pairs' must be a positive integer"),
    ],
)
def test_bad_spec(spec, message):
    with pytest.raises(SarmError, match=message):
        load_pairs("x", spec)


def test_formats_are_the_documented_ones():
    assert set(FORMATS) == {"hh_rlhf", "rewardbench", "rewardbench2", "chat", "llmbar"}


# --- reading files ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.jsonl.gz", "rows.json", "rows.json.gz", "wrapped.json", "rows.parquet"])
def test_read_records_formats(tmp_path, name):
    rows = [rb_row(0), rb_row(1, category="chat")]
    for row in rows:
        row.setdefault("category", None)
    path = tmp_path / name
    if name.startswith("rows.jsonl"):
        text = "".join(json.dumps(row) + "\n" for row in rows) + "\n"  # a trailing blank line is allowed
    elif name == "wrapped.json":
        text = json.dumps({"version": 1, "rows": rows})
    else:
        text = json.dumps(rows)
    if name.endswith(".parquet"):
        pd.DataFrame(rows).to_parquet(path)
    elif name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    assert read_records(path) == rows


def test_read_records_unknown_extension(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("a,b\n")
    with pytest.raises(SarmError, match=r"rows\.csv.*unknown file type"):
        read_records(path)


def test_read_records_missing_file(tmp_path):
    with pytest.raises(SarmError, match=r"absent\.jsonl: no such file"):
        read_records(tmp_path / "absent.jsonl")


def test_read_records_truncated_gzip(tmp_path):
    data = HH_HELPFUL.read_bytes()
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SarmError, match=r"cut\.jsonl\.gz.*truncated") as error:
        read_records(path)
    assert "\n" not in str(error.value)


def test_read_records_bad_json_line_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(rb_row(0)) + "\n" + json.dumps(rb_row(1)) + "\n" + '{"id": "r2", "prompt": \n')
    with pytest.raises(SarmError, match=r"bad\.jsonl:3: invalid JSON"):
        read_records(path)


def test_read_records_non_utf8(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(rb_row(0)).encode() + b"\n" + '{"prompt": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(SarmError, match=r"latin1\.jsonl:2: not valid UTF-8"):
        read_records(path)


# --- the hub and a local mirror --------------------------------------------------------------------------------


def test_hub_unreachable_without_mirror(offline):
    with pytest.raises(SarmError, match=r"'no-org/no-such-set'.*no mirror configured"):
        load_hub_records("no-org/no-such-set", "train")


def test_hub_unreachable_names_missing_mirror_folder(offline, tmp_path):
    with pytest.raises(SarmError, match=r"'no-org/no-such-set'.*mirror .*mirror/no-org/no-such-set not found"):
        load_pairs("x", {"hub": "no-org/no-such-set", "format": "chat"}, mirror=str(tmp_path / "mirror"))


def test_mirror_folder_is_loaded(offline, tmp_path):
    rows = [rb_row(i) for i in range(5)]
    folder = tmp_path / "mirror" / "org" / "name" / "data"
    folder.mkdir(parents=True)
    write_jsonl(folder / "train.jsonl", rows)
    mirror = str(tmp_path / "mirror")
    assert load_hub_records("org/name", "train", mirror=mirror) == rows
    table, report = load_pairs("mirrored", {"hub": "org/name", "format": "rewardbench"}, mirror=mirror)
    assert report == {"rows_read": 5, "pairs_kept": 5, "skipped": {}}
    assert table["id"].tolist() == [f"r{i}" for i in range(5)]
    with pytest.raises(SarmError, match=r"'org/name'.*mirror .*mirror/org/name"):
        load_hub_records("org/name", "validation", mirror=mirror)


# --- storing and splitting -------------------------------------------------------------------------------------


def test_parquet_round_trip(helpful, tmp_path):
    table = helpful[0].head(300)
    path = tmp_path / "out" / "pairs.parquet"
    write_pairs(table, path)
    back = read_pairs(path)
    assert list(tmp_path.joinpath("out").iterdir()) == [path]  # no temporary file left behind
    assert list(back.columns) == COLUMNS
    assert type(back.loc[1, "prompt"]) is list and type(back.loc[1, "prompt"][0]) is dict
    assert back["prompt"].tolist() == table["prompt"].tolist()
    pd.testing.assert_frame_equal(
        back.drop(columns="prompt"), table.drop(columns="prompt").reset_index(drop=True), check_dtype=False
    )


def test_read_pairs_rejects_other_tables(tmp_path):
    path = tmp_path / "other.parquet"
    pd.DataFrame({"a": [1]}).to_parquet(path)
    with pytest.raises(SarmError, match="columns missing"):
        read_pairs(path)


def test_split_pairs_sizes_and_determinism(helpful):
    table = helpful[0]
    train, val = split_pairs(table, 0.1, seed=3)
    assert len(val) == round(len(table) * 0.1) and len(train) + len(val) == len(table)
    assert set(train["id"]).isdisjoint(val["id"]) and set(train["id"]) | set(val["id"]) == set(table["id"])
    again_train, again_val = split_pairs(table, 0.1, seed=3)
    assert again_val["id"].tolist() == val["id"].tolist()
    assert split_pairs(table, 0.1, seed=4)[1]["id"].tolist() != val["id"].tolist()
    small_train, small_val = split_pairs(table.head(2), 0.01, seed=0)
    assert len(small_train) == len(small_val) == 1


@pytest.mark.parametrize("fraction", [0, 1, 1.5, -0.1])
def test_split_pairs_rejects_bad_fraction(helpful, fraction):
    with pytest.raises(SarmError, match="val_fraction"):
        split_pairs(helpful[0], fraction, seed=0)


@pytest.mark.parametrize("fmt", ["rewardbench", "rewardbench2", "chat"])
@pytest.mark.parametrize("missing", ["subset", "category"])
def test_a_row_without_the_subset_or_category_its_file_gives_is_skipped_and_counted(tmp_path, caplog, fmt, missing):
    """Such a row became a one-pair category named after the data set, weighted like a whole section: the
    RewardBench overall moved (45.5 -> 56.2) with exit 0."""
    rows = [rb_row(i, category="chat") for i in range(4)]
    if fmt == "rewardbench2":
        rows = [{**row, "chosen": [row["chosen"]], "rejected": [row["rejected"]]} for row in rows]
    if fmt == "chat":
        rows[2][missing] = None  # the key given, its value null
    else:
        del rows[2][missing]
    path = write_jsonl(tmp_path / "labelled.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="sarm.data"):
        table, report = load_pairs("mine", {"path": str(path), "format": fmt})
    assert report["skipped"] == {f"missing_{missing}": 1} and report["pairs_kept"] == 3
    assert set(table["subset"]) == {"s"} and set(table["category"]) == {"chat"}
    assert f"missing_{missing}=1" in caplog.text


def test_a_jsonl_line_holding_a_line_separator_character_is_one_row(tmp_path):
    """JSON allows U+2028, U+0085 and \\x1c raw inside a string; str.splitlines cut the line there and the file
    was refused as invalid JSON."""
    text = "first\u2028second\x85third\x1cfourth"
    path = tmp_path / "seps.jsonl"
    path.write_text(
        json.dumps(rb_row(0, chosen=text), ensure_ascii=False) + "\r\n" + json.dumps(rb_row(1)) + "\n", encoding="utf-8"
    )
    assert [row["chosen"] for row in read_records(path)] == [text, "a good answer"]
