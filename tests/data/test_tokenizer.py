"""Tokenizer options from the config: set on the real tokenizers, used by the data, kept by save_pretrained."""

import copy

import pytest
from transformers import AutoTokenizer

from automodel.data.tokenizer import apply_tokenizer_options, build_tokenizer, special_token_affixes
from automodel.errors import UserError
from tests.conftest import ASSETS, STORIES

GPT2 = ASSETS / "tokenizers" / "gpt2"


@pytest.mark.parametrize("add_bos,add_eos,expected", [
    (None, True, ([1], [2])), (False, None, ([], [])), (False, True, ([], [2])), (None, None, ([1], []))])
def test_bos_eos_options_on_stories_and_survive_saving(tmp_path, stories_tokenizer, add_bos, add_eos, expected):
    tokenizer = apply_tokenizer_options(copy.deepcopy(stories_tokenizer), add_bos=add_bos, add_eos=add_eos)
    assert special_token_affixes(tokenizer) == expected
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert special_token_affixes(reloaded) == expected
    text = "Once upon a time"
    assert reloaded(text)["input_ids"] == expected[0] + stories_tokenizer(text, add_special_tokens=False)["input_ids"] \
        + expected[1]


def test_gpt2_gains_bos_and_eos(tmp_path):
    tokenizer = apply_tokenizer_options(AutoTokenizer.from_pretrained(GPT2), add_bos=True, add_eos=True)
    assert special_token_affixes(tokenizer) == ([50256], [50256])


def test_build_tokenizer_from_config(tmp_path):
    template = tmp_path / "chatml.jinja"
    template.write_text("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}")
    cfg = {"model": {"pretrained_model_name_or_path": str(STORIES)},
           "dataset": {"tokenizer": {"pretrained_model_name_or_path": str(GPT2), "add_bos": True,
                                     "padding_side": "left", "chat_template": str(template)}}}
    tokenizer = build_tokenizer(cfg)
    assert tokenizer.vocab_size == 50257 and tokenizer.padding_side == "left"
    assert special_token_affixes(tokenizer)[0] == [50256]
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<|user|>hi"
    assert build_tokenizer({"model": cfg["model"]}).vocab_size == 512
    assert build_tokenizer({"model": cfg["model"], "tokenizer": str(GPT2)}).vocab_size == 50257
    target = {"_target_": "transformers.AutoTokenizer.from_pretrained", "pretrained_model_name_or_path": str(GPT2),
              "add_eos": True}
    assert special_token_affixes(build_tokenizer({"model": cfg["model"], "tokenizer": target}))[1] == [50256]

    with pytest.raises(UserError, match="dataset.tokenizer.padding_side: expected 'left' or 'right'"):
        build_tokenizer({"model": cfg["model"], "dataset": {"tokenizer": {"padding_side": "middle"}}})
    with pytest.raises(UserError, match="tokenizer.add_bos: expected true or false"):
        build_tokenizer({"model": cfg["model"], "tokenizer": {"add_bos": "yes"}})
    with pytest.raises(UserError, match="tokenizer.chat_template: cannot read .*missing.jinja"):
        build_tokenizer({"model": cfg["model"], "tokenizer": {"chat_template": str(tmp_path / "missing.jinja")}})
