"""SQuAD loading, tokenization, truncation and batching on the real SQuAD v1.1 files and real tokenizers."""

import copy
import json
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from automodel.data import PadCollator, SFTDataset, make_squad_dataset, pad_collate
from automodel.data.squad import HELD_OUT_ANSWER_TOKENS, count_answer_cut
from automodel.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[2]
ASSETS = Path(os.environ.get("AUTOMODEL_ASSETS", REPO_ROOT / ".." / "shared" / "assets"))
NESTED_TRAIN = ASSETS / "squad_v1.1" / "train-v1.1.subset.json"
NESTED_DEV = ASSETS / "squad_v1.1" / "dev-v1.1.part_a.json"


@pytest.fixture(scope="module")
def llama_tok():
    assert ASSETS.is_dir(), f"shared assets not found at {ASSETS}; set AUTOMODEL_ASSETS"
    return AutoTokenizer.from_pretrained(ASSETS / "models" / "stories260K")


@pytest.fixture(scope="module")
def gpt2_tok():
    return AutoTokenizer.from_pretrained(ASSETS / "tokenizers" / "gpt2")


@pytest.fixture(scope="module")
def nested_dev():
    return json.loads(NESTED_DEV.read_text())


def flat_rows(nested, limit):
    """The hub's flattened layout, written independently of the code under test."""
    rows = []
    for article in nested["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                answers = {
                    "text": [a["text"] for a in qa["answers"]],
                    "answer_start": [a["answer_start"] for a in qa["answers"]],
                }
                rows.append({"id": qa["id"], "title": article["title"], "context": paragraph["context"],
                             "question": qa["question"], "answers": answers})
    return rows[:limit]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def label_tokens(item):
    return [t for t in item["labels"] if t != -100]


def check_item(tokenizer, item, example):
    """Prompt masked, answer + eos labelled, prompt tokenized as a later generate call would."""
    prompt_ids = tokenizer(example["prompt"], add_special_tokens=True)["input_ids"]
    n = len(prompt_ids)
    assert item["input_ids"][:n] == prompt_ids
    assert item["labels"][:n] == [-100] * n
    assert item["labels"][n:] == item["input_ids"][n:]
    assert item["labels"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(label_tokens(item)[:-1]).strip() == example["target"]


@pytest.mark.parametrize("tok_name", ["llama_tok", "gpt2_tok"])
def test_nested_layout_masks_the_prompt(request, tok_name, nested_dev):
    tokenizer = request.getfixturevalue(tok_name)
    ds = make_squad_dataset(tokenizer, str(NESTED_DEV), split="validation", limit_dataset_samples=25)
    expected = flat_rows(nested_dev, 25)
    assert isinstance(ds, SFTDataset) and len(ds) == 25 and ds.num_dropped == ds.num_truncated == 0
    assert [ex["id"] for ex in ds.examples] == [row["id"] for row in expected]
    for item, example, row in zip(ds, ds.examples, expected):
        assert example["target"] == row["answers"]["text"][0]
        assert example["answers"] == row["answers"]["text"]
        # The template's trailing space is the first character of the answer's first token (`ĠDenver`).
        assert example["prompt"] == f"Context: {row['context']} Question: {row['question']} Answer:"
        check_item(tokenizer, item, example)
    if tok_name == "llama_tok":
        assert ds[0]["input_ids"][0] == tokenizer.bos_token_id == 1


def test_full_loss_labels_every_token(llama_tok):
    ds = make_squad_dataset(llama_tok, str(NESTED_DEV), limit_dataset_samples=3, answer_only_loss=False)
    assert all(item["labels"] == item["input_ids"] for item in ds)


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_flattened_layout_matches_nested(tmp_path, llama_tok, nested_dev, suffix):
    rows = flat_rows(nested_dev, 30)
    path = tmp_path / f"dev{suffix}"
    if suffix == ".jsonl":
        write_jsonl(path, rows)
    else:
        path.write_text(json.dumps(rows))
    flat = make_squad_dataset(llama_tok, str(path))
    nested = make_squad_dataset(llama_tok, str(NESTED_DEV), limit_dataset_samples=30)
    assert [flat[i] for i in range(30)] == [nested[i] for i in range(30)]
    assert flat.examples == nested.examples


def test_directory_picks_the_split_file(tmp_path, llama_tok, nested_dev):
    rows = flat_rows(nested_dev, 12)
    write_jsonl(tmp_path / "squad_train.jsonl", rows[:5])
    write_jsonl(tmp_path / "squad-dev.jsonl", rows[5:])
    (tmp_path / "notes.txt").write_text("not data")
    assert len(make_squad_dataset(llama_tok, str(tmp_path), split="train")) == 5
    assert len(make_squad_dataset(llama_tok, str(tmp_path), split="validation")) == 7

    with pytest.raises(UserError, match="no .json/.jsonl file with 'test'"):
        make_squad_dataset(llama_tok, str(tmp_path), split="test")
    write_jsonl(tmp_path / "val_extra.jsonl", rows[:1])
    with pytest.raises(UserError, match="squad-dev.jsonl, val_extra.jsonl"):
        make_squad_dataset(llama_tok, str(tmp_path), split="validation")


def test_truncation_keeps_a_context_window_around_the_answer(llama_tok, caplog):
    full = make_squad_dataset(llama_tok, str(NESTED_DEV), limit_dataset_samples=40)
    with caplog.at_level(logging.INFO, logger="automodel.data.squad"):
        ds = make_squad_dataset(llama_tok, str(NESTED_DEV), seq_length=160, limit_dataset_samples=40)
    too_long = sum(len(item["input_ids"]) > 160 for item in full)
    assert too_long > 10 and ds.num_truncated == too_long and ds.num_dropped == 0 and len(ds) == 40
    assert f"40 examples, {too_long} truncated and 0 dropped" in caplog.text
    cut_at_start = 0
    for item, example, original in zip(ds, ds.examples, full.examples):
        assert len(item["input_ids"]) <= 160
        assert example["truncated"] == (example["context"] != original["context"])
        assert example["context"] in original["context"]
        # The answer the model is trained to give is still readable in the prompt, where answer_start says.
        start = example["answer_start"]
        assert example["context"][start:start + len(example["target"])] == example["target"]
        assert example["question"] == original["question"] and example["target"] == original["target"]
        cut_at_start += example["truncated"] and not original["context"].startswith(example["context"])
        check_item(llama_tok, item, example)
    assert cut_at_start > 0, "no window dropped the start of its context: answers late in a context were lost"
    # The cut is tight: a few tokens of slack at most (it stops at word boundaries).
    slack = [160 - len(item["input_ids"]) for item, ex in zip(ds, ds.examples) if ex["truncated"]]
    assert max(slack) < 20


def test_train_file_at_512_tokens_keeps_every_answer_in_its_prompt(llama_tok):
    ds = make_squad_dataset(llama_tok, str(NESTED_TRAIN), seq_length=512, limit_dataset_samples=1500)
    assert ds.num_truncated > 100
    late = 0
    for item, example in zip(ds, ds.examples):
        assert len(item["input_ids"]) <= 512
        assert example["target"] in example["prompt"].split(" Question: ")[0]
        late += example["truncated"] and example["answer_start"] > len(example["context"]) // 2
    assert late > 0


def with_late_answers(rows):
    """The same questions with another gold answer: the last three words of the context (an answer window would
    then show the context's end)."""
    twins = []
    for row in rows:
        words = row["context"].split()
        text = " ".join(words[-3:])
        twins.append({**row, "answers": {"text": [text], "answer_start": [row["context"].rindex(text)]}})
    return twins


def test_held_out_contexts_keep_their_start_whatever_the_gold_answer(tmp_path, llama_tok, nested_dev):
    """Evaluation and validation (`context_start`) show a question the same context whatever its gold answer;
    training (`answer_window`) keeps a window around it, which is where the loss is."""
    from automodel.inference.squad_eval import SquadEvalOptions, load_questions, resolve_options

    rows = flat_rows(nested_dev, 40)
    files = [write_jsonl(tmp_path / "gold.jsonl", rows), write_jsonl(tmp_path / "late.jsonl", with_late_answers(rows))]
    evaluated = [load_questions(llama_tok, resolve_options(SquadEvalOptions(dataset=str(f), seq_length=160), None,
                                                           None, 32)) for f in files]
    assert [q["prompt"] for q in evaluated[0]] == [q["prompt"] for q in evaluated[1]]
    gold, late = evaluated
    truncated = [q for q in gold if q["truncated"]]
    assert len(truncated) > 10 and len(gold) == 40
    for question, row in zip(gold, rows):
        assert row["context"].startswith(question["context"])
        assert len(llama_tok(question["prompt"])["input_ids"]) <= 160 - HELD_OUT_ANSWER_TOKENS
        assert question["answer_cut"] == (not any(a in question["context"] for a in row["answers"]["text"]))
    # The late answers are cut away from every truncated context, and counted; some gold ones are too.
    assert count_answer_cut(late) == len(truncated) and 0 < count_answer_cut(gold) < len(truncated)

    windows = [make_squad_dataset(llama_tok, str(f), seq_length=160, cache=False).examples for f in files]
    assert [q["prompt"] for q in windows[0]] != [q["prompt"] for q in windows[1]]
    assert all(q["target"] in q["context"] and not q["answer_cut"] for q in windows[0] + windows[1])


def test_spread_over_articles_takes_every_article_in_turn(tmp_path, llama_tok, nested_dev):
    """`spread_over_articles`: N questions from all articles (the first N come from one), the same ones on every
    run and from either layout, each still its own question with its context cut without looking at the answer."""
    rows = flat_rows(nested_dev, None)
    titles = [article["title"] for article in nested_dev["data"]]
    first = make_squad_dataset(llama_tok, str(NESTED_DEV), seq_length=384, limit_dataset_samples=60, cache=False,
                               truncation="context_start")
    assert {q["title"] for q in first.examples} == {titles[0]}
    spread = make_squad_dataset(llama_tok, str(NESTED_DEV), seq_length=384, limit_dataset_samples=60, cache=False,
                                truncation="context_start", spread_over_articles=True)
    picked = [q["title"] for q in spread.examples]
    assert len(picked) == 60 and picked[:len(titles)] == titles  # one of each article, in file order, then again
    assert all(picked.count(title) in (2, 3) for title in titles)
    by_id = {row["id"]: row for row in rows}
    for question in spread.examples:
        row = by_id[question["id"]]
        assert (question["title"], question["question"]) == (row["title"], row["question"])
        assert row["context"].startswith(question["context"])
    # Not each article's first questions: within an article the order is shuffled (with a fixed seed).
    article_firsts = {}
    for row in rows:
        article_firsts.setdefault(row["title"], row["id"])
    assert sum(q["id"] == article_firsts[q["title"]] for q in spread.examples[:len(titles)]) < len(titles) // 2
    flat = make_squad_dataset(llama_tok, str(write_jsonl(tmp_path / "dev.jsonl", rows)), seq_length=384,
                              limit_dataset_samples=60, cache=False, truncation="context_start",
                              spread_over_articles=True)
    assert [q["id"] for q in flat.examples] == [q["id"] for q in spread.examples]
    # `automodel eval squad` on a checkpoint asks the run's validation set's questions unless told otherwise.
    from automodel.inference.squad_eval import SquadEvalOptions, resolve_options
    run = {"validation_dataset": {"_target_": "automodel.data.squad.make_squad_dataset",
                                  "dataset_name": str(NESTED_DEV), "spread_over_articles": True}}
    assert resolve_options(SquadEvalOptions(), run, None, 32)["spread_over_articles"] is True
    assert resolve_options(SquadEvalOptions(dataset=str(NESTED_DEV)), run, None, 32)["spread_over_articles"] is False
    assert resolve_options(SquadEvalOptions(spread_over_articles=False), run, None, 32)["spread_over_articles"] is False
    with pytest.raises(UserError, match="spread_over_articles must be true or false, got 'yes'"):
        make_squad_dataset(llama_tok, str(NESTED_DEV), spread_over_articles="yes")


def test_the_recipe_validates_on_held_out_cuts_only(llama_tok):
    from automodel.config import TargetPolicy
    from automodel.data.loaders import build_dataset

    node = {"_target_": "automodel.data.squad.make_squad_dataset", "dataset_name": str(NESTED_DEV),
            "seq_length": 160, "limit_dataset_samples": 40, "cache": False}
    validation = build_dataset({"validation_dataset": node}, "validation_dataset", TargetPolicy(), llama_tok)
    assert validation.num_truncated > 10
    original = {q["id"]: q["context"] for q in make_squad_dataset(llama_tok, str(NESTED_DEV),
                                                                  limit_dataset_samples=40).examples}
    assert all(original[q["id"]].startswith(q["context"]) for q in validation.examples)
    training = build_dataset({"dataset": node}, "dataset", TargetPolicy(), llama_tok)
    assert any(not original[q["id"]].startswith(q["context"]) for q in training.examples)  # answer windows
    with pytest.raises(UserError, match="validation_dataset.truncation: 'answer_window' picks the context"):
        build_dataset({"validation_dataset": {**node, "truncation": "answer_window"}}, "validation_dataset",
                      TargetPolicy(), llama_tok)
    with pytest.raises(UserError, match="truncation: expected one of answer_window, context_start, got 'middle'"):
        make_squad_dataset(llama_tok, str(NESTED_DEV), truncation="middle")


def test_tiny_seq_length_drops_what_cannot_fit(gpt2_tok, nested_dev):
    rows = flat_rows(nested_dev, 60)
    # Shortest possible example: the answer's own span as context, the question and the answer + eos.
    floor = {
        row["id"]: len(gpt2_tok(f"Context: {row['answers']['text'][0]} Question: {row['question']} Answer: ")
                       ["input_ids"])
        + len(gpt2_tok(row["answers"]["text"][0], add_special_tokens=False)["input_ids"]) + 1
        for row in rows
    }
    seq_length = sorted(floor.values())[30]
    ds = make_squad_dataset(gpt2_tok, str(NESTED_DEV), seq_length=seq_length, limit_dataset_samples=60)
    expected_kept = [row["id"] for row in rows if floor[row["id"]] <= seq_length]
    assert 0 < len(expected_kept) < 60
    assert [ex["id"] for ex in ds.examples] == expected_kept
    assert ds.num_dropped == 60 - len(expected_kept) and ds.num_truncated == len(ds)
    assert all(len(item["input_ids"]) <= seq_length for item in ds)
    assert all(ex["target"] in ex["context"] for ex in ds.examples)


def test_unanswerable_rows_get_the_configured_target(tmp_path, llama_tok, nested_dev):
    nested = {"version": "v2.0", "data": copy.deepcopy(nested_dev["data"][:1])}
    qas = nested["data"][0]["paragraphs"][0]["qas"]
    qas[0].update(is_impossible=True, plausible_answers=qas[0]["answers"], answers=[])
    qas[2]["is_impossible"] = True  # the flag alone decides, even with a stale answer left in place
    qas[3]["answers"] = []
    path = tmp_path / "v2.json"
    path.write_text(json.dumps(nested))
    ds = make_squad_dataset(llama_tok, str(path), unanswerable_target="no answer", limit_dataset_samples=5)
    targets = [ex["target"] for ex in ds.examples]
    assert targets[:4] == ["no answer", qas[1]["answers"][0]["text"], "no answer", "no answer"]
    for item, example in zip(ds, ds.examples):
        check_item(llama_tok, item, example)

    flat = flat_rows(nested_dev, 2)
    flat[1]["answers"] = {"text": [], "answer_start": []}
    ds = make_squad_dataset(llama_tok, str(write_jsonl(tmp_path / "v2.jsonl", flat)))
    assert [ex["target"] for ex in ds.examples] == [flat[0]["answers"]["text"][0], "unanswerable"]


def test_bad_inputs_name_the_file_and_field(tmp_path, llama_tok, nested_dev):
    missing = tmp_path / "nope.json"
    with pytest.raises(UserError, match=f"not found: {missing}"):
        make_squad_dataset(llama_tok, str(missing))

    broken = tmp_path / "broken.json"
    broken.write_text('{"data": [')
    with pytest.raises(UserError, match="broken.json is not valid JSON: Expecting value"):
        make_squad_dataset(llama_tok, str(broken))
    broken_lines = tmp_path / "broken.jsonl"
    broken_lines.write_text(json.dumps(flat_rows(nested_dev, 1)[0]) + "\n{oops\n")
    with pytest.raises(UserError, match="broken.jsonl line 2 is not valid JSON"):
        make_squad_dataset(llama_tok, str(broken_lines))

    nested = {"data": copy.deepcopy(nested_dev["data"][:1])}
    qa = nested["data"][0]["paragraphs"][0]["qas"][1]
    del qa["question"]
    path = tmp_path / "no_question.json"
    path.write_text(json.dumps(nested))
    with pytest.raises(UserError, match=f"no_question.json: row 1 \\(id {qa['id']}\\) has no 'question' field"):
        make_squad_dataset(llama_tok, str(path))

    del nested["data"][0]["paragraphs"][0]["context"]
    path.write_text(json.dumps(nested))
    with pytest.raises(UserError, match="row 0 .* has no 'context' field"):
        make_squad_dataset(llama_tok, str(path))

    rows = flat_rows(nested_dev, 3)
    del rows[2]["answers"]
    with pytest.raises(UserError, match="no_answers.jsonl: row 2 .* has no 'answers' field"):
        make_squad_dataset(llama_tok, str(write_jsonl(tmp_path / "no_answers.jsonl", rows)))

    (tmp_path / "scalar.json").write_text("42")
    with pytest.raises(UserError, match="neither SQuAD's nested layout"):
        make_squad_dataset(llama_tok, str(tmp_path / "scalar.json"))


def test_bad_arguments(llama_tok, gpt2_tok):
    with pytest.raises(UserError, match="seq_length must be a positive integer"):
        make_squad_dataset(llama_tok, str(NESTED_DEV), seq_length=0)
    with pytest.raises(UserError, match="only use {context} and {question}"):
        make_squad_dataset(llama_tok, str(NESTED_DEV), prompt_template="{context} {answer}")
    no_eos = copy.deepcopy(gpt2_tok)
    no_eos.eos_token = None
    with pytest.raises(UserError, match="no eos token"):
        make_squad_dataset(no_eos, str(NESTED_DEV), limit_dataset_samples=1)


def test_hub_id_offline_is_a_user_error(tmp_path):
    # The real hub code path, made to fail fast: offline mode, empty cache, an id that cannot be cached.
    script = (
        "from transformers import AutoTokenizer\n"
        "from automodel.data import make_squad_dataset\n"
        "from automodel.errors import UserError\n"
        f"tok = AutoTokenizer.from_pretrained({str(ASSETS / 'models' / 'stories260K')!r})\n"
        "try:\n"
        "    make_squad_dataset(tok, 'automodel-tests/no-such-dataset')\n"
        "except UserError as error:\n"
        "    print('USER_ERROR', error)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert "USER_ERROR" in result.stdout, result.stderr
    assert "looks offline or the id is wrong" in result.stdout and "local .json/.jsonl" in result.stdout
    assert "\n" not in result.stdout.strip()


def test_pad_collate_pads_right_with_masks():
    batch = [
        {"input_ids": [1, 5, 6, 7], "labels": [-100, -100, 6, 7]},
        {"input_ids": [1, 9], "labels": [-100, 9]},
    ]
    out = pad_collate(batch, pad_token_id=0)
    assert all(t.dtype == torch.long for t in out.values())
    assert out["input_ids"].tolist() == [[1, 5, 6, 7], [1, 9, 0, 0]]
    assert out["labels"].tolist() == [[-100, -100, 6, 7], [-100, 9, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    with pytest.raises(ValueError, match="pad_token_id"):
        pad_collate(batch, pad_token_id=None)


def test_pad_collator_batches_real_data_and_pickles(llama_tok):
    ds = make_squad_dataset(llama_tok, str(NESTED_TRAIN), seq_length=512, limit_dataset_samples=8)
    collator = pickle.loads(pickle.dumps(PadCollator(pad_token_id=llama_tok.eos_token_id)))
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=8, collate_fn=collator)))
    lengths = [len(item["input_ids"]) for item in ds]
    assert batch["input_ids"].shape == (8, max(lengths))
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    for row, item in enumerate(ds):
        n = len(item["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == item["input_ids"]
        assert (batch["input_ids"][row, n:] == llama_tok.eos_token_id).all()
        assert (batch["labels"][row, n:] == -100).all()


def test_tokenization_is_cached_by_file_tokenizer_and_settings(tmp_path, llama_tok, caplog):
    from automodel.data.tokenizer import apply_tokenizer_options

    settings = dict(seq_length=200, limit_dataset_samples=300, cache_dir=str(tmp_path))
    fresh = make_squad_dataset(llama_tok, str(NESTED_TRAIN), seq_length=200, limit_dataset_samples=300, cache=False)
    with caplog.at_level(logging.INFO, logger="automodel.data.cache"):
        first = make_squad_dataset(llama_tok, str(NESTED_TRAIN), **settings)
        again = make_squad_dataset(llama_tok, str(NESTED_TRAIN), **settings)
    assert caplog.text.count("tokenized data cached in") == 1 and caplog.text.count("read from cache") == 1
    for ds in (first, again):
        assert ds.items == fresh.items and ds.examples == fresh.examples
        assert (ds.num_truncated, ds.num_dropped) == (fresh.num_truncated, fresh.num_dropped) and ds.num_truncated > 0
    entries = sorted(p.name for p in tmp_path.iterdir())
    assert len(entries) == 2 and entries[0].endswith(".json") and entries[1].endswith(".safetensors")

    make_squad_dataset(llama_tok, str(NESTED_TRAIN), **dict(settings, seq_length=300))
    no_bos = make_squad_dataset(apply_tokenizer_options(copy.deepcopy(llama_tok), add_bos=False), str(NESTED_TRAIN),
                                **settings)
    assert len(list(tmp_path.glob("*.safetensors"))) == 3
    assert all(item["input_ids"][0] == llama_tok.bos_token_id for item in first)
    assert not any(item["input_ids"][0] == llama_tok.bos_token_id for item in no_bos)

    for damaged in tmp_path.glob("*.safetensors"):
        damaged.write_bytes(b"not a safetensors file")
    with caplog.at_level(logging.WARNING, logger="automodel.data.cache"):
        rebuilt = make_squad_dataset(llama_tok, str(NESTED_TRAIN), **settings)
    assert "ignoring unreadable cache" in caplog.text and rebuilt.items == fresh.items


def test_add_eos_tokenizer_does_not_end_the_prompt(llama_tok):
    from automodel.data.tokenizer import apply_tokenizer_options

    with_eos = apply_tokenizer_options(copy.deepcopy(llama_tok), add_eos=True)
    plain = make_squad_dataset(llama_tok, str(NESTED_DEV), limit_dataset_samples=5, cache=False)
    ds = make_squad_dataset(with_eos, str(NESTED_DEV), limit_dataset_samples=5, cache=False)
    assert ds.items == plain.items
    assert all(item["input_ids"].count(llama_tok.eos_token_id) == 1 for item in ds)
