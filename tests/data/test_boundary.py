"""Prompt and answer split where the real tokenizers split their joined text (SQuAD, instruction, chat data)."""

import json
import logging

import pytest
from transformers import AutoTokenizer

from automodel.data import make_squad_dataset
from automodel.data.boundary import split_joined
from automodel.errors import UserError
from automodel.data.instruction import make_instruction_dataset
from tests.conftest import ASSETS, SQUAD_DEV

TOKENIZERS = ASSETS / "tokenizers"
BYTE_LEVEL = ["gpt2", "qwen", "llama3"]
PROMPT, ANSWER = "Question: Who won Super Bowl 50? Answer: ", "Denver Broncos"


@pytest.fixture(scope="module", params=BYTE_LEVEL + ["llama2"])
def tokenizer(request):
    return AutoTokenizer.from_pretrained(TOKENIZERS / request.param)


def pieces(tokenizer, ids):
    return tokenizer.convert_ids_to_tokens(ids)


@pytest.mark.parametrize("name", BYTE_LEVEL)
def test_byte_level_bpe_answer_keeps_its_leading_space(name):
    tok = AutoTokenizer.from_pretrained(TOKENIZERS / name)
    split = split_joined(tok, [PROMPT], [ANSWER])[0]
    assert pieces(tok, split.prompt_ids)[-2:] == ["ĠAnswer", ":"]
    assert pieces(tok, split.answer_ids) == ["ĠDenver", "ĠBroncos"]
    # Separately, the template's space is a token of its own and the answer starts without one.
    assert pieces(tok, tok(PROMPT, add_special_tokens=False)["input_ids"])[-1] == "Ġ"
    assert pieces(tok, tok(ANSWER, add_special_tokens=False)["input_ids"])[0] == "Denver"
    assert split.prompt_text == PROMPT.rstrip()
    assert tok(split.prompt_text, add_special_tokens=False)["input_ids"] == split.prompt_ids
    assert split.prompt_ids + split.answer_ids == tok(PROMPT + ANSWER, add_special_tokens=False)["input_ids"]


def test_sentencepiece_answer_is_unchanged_and_the_lone_space_token_goes():
    tok = AutoTokenizer.from_pretrained(TOKENIZERS / "llama2")
    split = split_joined(tok, [PROMPT], [ANSWER])[0]
    assert split.answer_ids == tok(ANSWER, add_special_tokens=False)["input_ids"]
    assert pieces(tok, split.answer_ids)[0] == "▁Den"
    separate_prompt = tok(PROMPT, add_special_tokens=False)["input_ids"]
    assert pieces(tok, separate_prompt)[-1] == "▁" and split.prompt_ids == separate_prompt[:-1]
    # Llama 2 keeps the space apart from a number: that space token is the answer's first, so the prompt the
    # model is asked with (`Answer:`) is the same whatever the answer.
    number = split_joined(tok, [PROMPT], ["1960"])[0]
    assert number.prompt_ids == split.prompt_ids and pieces(tok, number.answer_ids)[:2] == ["▁", "1"]


def test_prompt_without_trailing_space_and_empty_prompt(tokenizer):
    split = split_joined(tokenizer, ["Answer:\n"], ["Paris"])[0]
    assert tokenizer.decode(split.prompt_ids) + tokenizer.decode(split.answer_ids) in ("Answer:\nParis",
                                                                                        "Answer:\n Paris")
    assert "Par" in "".join(pieces(tokenizer, split.answer_ids[:1]))
    empty = split_joined(tokenizer, [""], ["Paris"])[0]
    assert empty.prompt_ids == [] and empty.prompt_text == ""
    with pytest.raises(UserError, match="form one token"):
        split_joined(tokenizer, ["Answer: Denv"], ["er"])  # a template that cuts a word in two


def test_squad_items_are_the_joined_text_and_generation_prompt_matches(tokenizer):
    if tokenizer.eos_token is None:  # the Qwen and Llama 3 assets name no EOS (Qwen's <|endoftext|> is its own)
        tokenizer.add_special_tokens({"eos_token": "<|endoftext|>"})
    ds = make_squad_dataset(tokenizer, str(SQUAD_DEV), limit_dataset_samples=20, seq_length=160, cache=False)
    assert len(ds) == 20 and ds.num_truncated > 0
    for item, example in zip(ds, ds.examples):
        assert not example["prompt"].endswith(" ")
        prompt_ids = tokenizer(example["prompt"], add_special_tokens=True)["input_ids"]
        n = len(prompt_ids)
        assert item["input_ids"][:n] == prompt_ids, example["id"]
        assert item["labels"][:n] == [-100] * n and item["labels"][n:] == item["input_ids"][n:]
        bos = n - len(tokenizer(example["prompt"], add_special_tokens=False)["input_ids"])
        joined = tokenizer(example["prompt"] + " " + example["target"], add_special_tokens=False)["input_ids"]
        assert item["input_ids"][bos:-1] == joined and item["input_ids"][-1] == tokenizer.eos_token_id


def test_instruction_rows_use_the_joined_split(tmp_path):
    tok = AutoTokenizer.from_pretrained(TOKENIZERS / "gpt2")
    rows = [{"prompt": "Capital of France? Answer:", "answer": " Paris"},
            {"prompt": "2 + 2 =", "answer": " 4"}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    ds = make_instruction_dataset(tok, str(path), prompt_template="{prompt} ", column_mapping={
        "prompt": "prompt", "answer": "answer"}, cache_dir=str(tmp_path / "cache"))
    # The template's space and the answer's own leading space both stay; the answer begins at 'Ġ'-led tokens.
    first = ds[0]
    answer = [t for t in first["labels"] if t != -100]
    assert pieces(tok, answer)[-1] == tok.eos_token and tok.decode(first["input_ids"]) == (
        "Capital of France? Answer:  Paris" + tok.eos_token)
    ds2 = make_instruction_dataset(tok, str(path), prompt_template="{prompt}", column_mapping={
        "prompt": "prompt", "answer": "answer"}, cache_dir=str(tmp_path / "cache"))
    assert pieces(tok, [t for t in ds2[0]["labels"] if t != -100]) == ["ĠParis", tok.eos_token]


def test_squad_cache_is_keyed_on_the_split_rule(tmp_path, monkeypatch, caplog):
    tok = AutoTokenizer.from_pretrained(TOKENIZERS / "gpt2")
    settings = dict(limit_dataset_samples=5, seq_length=256, cache_dir=str(tmp_path))
    make_squad_dataset(tok, str(SQUAD_DEV), **settings)
    monkeypatch.setattr("automodel.data.squad.SPLIT_RULE", "another rule")
    with caplog.at_level(logging.INFO, logger="automodel.data.cache"):
        make_squad_dataset(tok, str(SQUAD_DEV), **settings)
    assert "tokenized data cached in" in caplog.text and len(list(tmp_path.glob("*.safetensors"))) == 2
