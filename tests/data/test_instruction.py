"""Column-mapped instruction data on the real Alpaca / GSM8K records, through every file format and streaming."""

import json

import datasets
import pytest

from automodel.data.instruction import make_instruction_dataset
from automodel.data.tokenizer import apply_tokenizer_options
from automodel.errors import UserError
from tests.conftest import ASSETS

ALPACA = ASSETS / "instruct" / "alpaca_en_demo.json"
GSM8K = ASSETS / "instruct" / "gsm8k_test_1319.jsonl"


@pytest.fixture(scope="module")
def alpaca_rows():
    return json.loads(ALPACA.read_text())


def alpaca_prompt(row):
    """Alpaca's layout, written independently of the code under test."""
    if row["input"]:
        return f"### Instruction:\n{row['instruction']}\n\n### Input:\n{row['input']}\n\n### Response:\n"
    return f"### Instruction:\n{row['instruction']}\n\n### Response:\n"


def expected_item(tokenizer, prompt, answer):
    """Prompt and answer tokenized as one text (as the model reads it), split after the prompt's own tokens."""
    prompt_ids = [tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    joined = [tokenizer.bos_token_id] + tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]
    assert joined[:len(prompt_ids)] == prompt_ids  # these prompts end in a newline or ':', never inside a token
    answer_ids = joined[len(prompt_ids):] + [tokenizer.eos_token_id]
    return {"input_ids": prompt_ids + answer_ids, "labels": [-100] * len(prompt_ids) + answer_ids}


def test_alpaca_needs_no_mapping_and_masks_the_prompt(tmp_path, stories_tokenizer, alpaca_rows):
    ds = make_instruction_dataset(stories_tokenizer, str(ALPACA), limit_dataset_samples=40, cache_dir=str(tmp_path))
    assert len(ds) == 40 and ds.num_dropped == ds.num_skipped == 0
    assert any(row["input"] for row in alpaca_rows[:40]) and any(not row["input"] for row in alpaca_rows[:40])
    for item, row in zip(ds, alpaca_rows):
        assert item == expected_item(stories_tokenizer, alpaca_prompt(row), row["output"])
    one_line = make_instruction_dataset(stories_tokenizer, str(ALPACA), limit_dataset_samples=40,
                                        column_mapping={"instruction": "instruction", "input": "input",
                                                        "output": "output"}, cache_dir=str(tmp_path))
    assert one_line[:] == ds[:]


def test_train_on_prompt_and_custom_template(tmp_path, stories_tokenizer, alpaca_rows):
    ds = make_instruction_dataset(stories_tokenizer, str(ALPACA), limit_dataset_samples=5, train_on_prompt=True,
                                  prompt_template="Q: {instruction} {input}\nA:", cache_dir=str(tmp_path))
    for item, row in zip(ds, alpaca_rows):
        assert item["labels"] == item["input_ids"]
        expected = expected_item(stories_tokenizer, f"Q: {row['instruction']} {row['input']}\nA:", row["output"])
        assert item["input_ids"] == expected["input_ids"]
    with pytest.raises(UserError, match=r"field \{question\} is not a mapped prompt role"):
        make_instruction_dataset(stories_tokenizer, str(ALPACA), prompt_template="{question}", cache_dir=str(tmp_path))


def test_parquet_csv_glob_with_renamed_columns_match_json(tmp_path, stories_tokenizer, alpaca_rows):
    reference = make_instruction_dataset(stories_tokenizer, str(ALPACA), limit_dataset_samples=30,
                                         cache_dir=str(tmp_path / "cache"))
    renamed = [{"task": r["instruction"], "extra": r["input"], "reply": r["output"]} for r in alpaca_rows[:30]]
    table = datasets.Dataset.from_list(renamed)
    table.to_parquet(str(tmp_path / "alpaca.parquet"))
    table.to_csv(str(tmp_path / "alpaca.csv"), index=False)
    for i, chunk in enumerate((renamed[:12], renamed[12:])):
        (tmp_path / f"part-{i}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chunk))
    mapping = {"instruction": "task", "input": "extra", "answer": "reply"}
    for source in ("alpaca.parquet", "alpaca.csv", "part-*.jsonl"):
        ds = make_instruction_dataset(stories_tokenizer, str(tmp_path / source), column_mapping=mapping,
                                      cache_dir=str(tmp_path / "cache"))
        assert ds[:] == reference[:], source
    listed = make_instruction_dataset(stories_tokenizer, [str(tmp_path / "part-0.jsonl"), str(tmp_path / "part-1.jsonl")],
                                      column_mapping=mapping, cache_dir=str(tmp_path / "cache"))
    assert listed[:] == reference[:]


def test_seq_length_drops_and_counts(tmp_path, stories_tokenizer):
    full = make_instruction_dataset(stories_tokenizer, str(GSM8K), limit_dataset_samples=60, cache_dir=str(tmp_path))
    lengths = [len(ids) for ids in full["input_ids"]]
    cut = sorted(lengths)[30]
    ds = make_instruction_dataset(stories_tokenizer, str(GSM8K), limit_dataset_samples=60, seq_length=cut,
                                  cache_dir=str(tmp_path))
    assert len(ds) == sum(n <= cut for n in lengths) and ds.num_dropped == 60 - len(ds)
    assert ds["input_ids"] == [ids for ids in full["input_ids"] if len(ids) <= cut]


def test_streaming_gives_the_same_examples_and_resumes(tmp_path, stories_tokenizer):
    settings = dict(limit_dataset_samples=50, seq_length=300, cache_dir=str(tmp_path))
    mapped = make_instruction_dataset(stories_tokenizer, str(GSM8K), **settings)
    stream = make_instruction_dataset(stories_tokenizer, str(GSM8K), streaming=True, **settings)
    assert isinstance(stream, datasets.IterableDataset)
    streamed = list(stream)
    assert 0 < len(mapped) < 50 and streamed == list(mapped)

    first = make_instruction_dataset(stories_tokenizer, str(GSM8K), streaming=True, **settings)
    iterator = iter(first)
    head = [next(iterator) for _ in range(7)]
    state = first.state_dict()
    resumed = make_instruction_dataset(stories_tokenizer, str(GSM8K), streaming=True, **settings)
    resumed.load_state_dict(state)
    assert head + list(resumed) == streamed


def test_tokenization_is_cached_per_tokenizer_settings(tmp_path, stories_tokenizer):
    import copy

    first = make_instruction_dataset(stories_tokenizer, str(GSM8K), limit_dataset_samples=20, cache_dir=str(tmp_path))
    again = make_instruction_dataset(stories_tokenizer, str(GSM8K), limit_dataset_samples=20, cache_dir=str(tmp_path))
    files = {f["filename"] for f in first.cache_files}
    assert files and files == {f["filename"] for f in again.cache_files}
    other = apply_tokenizer_options(copy.deepcopy(stories_tokenizer), add_bos=False)
    no_bos = make_instruction_dataset(other, str(GSM8K), limit_dataset_samples=20, cache_dir=str(tmp_path))
    assert files.isdisjoint(f["filename"] for f in no_bos.cache_files)
    assert [ids[1:] for ids in first["input_ids"]] == no_bos["input_ids"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_bad_rows_name_the_file_and_row(tmp_path, stories_tokenizer, alpaca_rows):
    rows = [dict(r) for r in alpaca_rows[:6]]
    cache = str(tmp_path / "cache")
    with pytest.raises(UserError, match=r"alpaca_en_demo.json: no column 'reply' \(column_mapping.answer\)"):
        make_instruction_dataset(stories_tokenizer, str(ALPACA), column_mapping={"instruction": "instruction",
                                                                                 "answer": "reply"}, cache_dir=cache)
    missing = [dict(r) for r in rows]
    del missing[3]["output"]
    path = write_jsonl(tmp_path / "missing.jsonl", missing)
    with pytest.raises(UserError, match=r"missing.jsonl: row 3: no value in column 'output'"):
        make_instruction_dataset(stories_tokenizer, path, cache_dir=cache)
    empty = [dict(r) for r in rows]
    empty[2]["output"] = "  "
    empty[4]["instruction"] = 7
    path = write_jsonl(tmp_path / "empty.jsonl", empty[:3])
    with pytest.raises(UserError, match=r"empty.jsonl: row 2: empty answer in column 'output'"):
        make_instruction_dataset(stories_tokenizer, path, cache_dir=cache)
    path = write_jsonl(tmp_path / "numbers.jsonl", [{"instruction": 7, "output": "x"}])
    with pytest.raises(UserError, match=r"numbers.jsonl: row 0: column 'instruction' \(instruction\) must be a string"):
        make_instruction_dataset(stories_tokenizer, path, cache_dir=cache)

    skipped = make_instruction_dataset(stories_tokenizer, write_jsonl(tmp_path / "both.jsonl", missing[:3] + empty[2:3]
                                                                     + missing[3:]), skip_invalid_rows=True,
                                       cache_dir=cache)
    assert len(skipped) == 5 and skipped.num_skipped == 2

    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(rows[0]) + "\n{oops\n")
    with pytest.raises(UserError, match="broken.jsonl: cannot read it as json"):
        make_instruction_dataset(stories_tokenizer, str(broken), cache_dir=cache)
    with pytest.raises(UserError, match="dataset file not found"):
        make_instruction_dataset(stories_tokenizer, str(tmp_path / "nope.json"), cache_dir=cache)
    with pytest.raises(UserError, match="no file matches"):
        make_instruction_dataset(stories_tokenizer, str(tmp_path / "nope-*.json"), cache_dir=cache)
    with pytest.raises(UserError, match="column_mapping.label: unknown role"):
        make_instruction_dataset(stories_tokenizer, str(ALPACA), column_mapping={"label": "output"}, cache_dir=cache)
