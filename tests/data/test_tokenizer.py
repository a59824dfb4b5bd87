"""Tokenizer options from the config: set on the real tokenizers, used by the data, kept by save_pretrained."""

import copy
import os
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from automodel.data.cache import tokenizer_fingerprint
from automodel.data.tokenizer import apply_tokenizer_options, special_token_affixes
from automodel.training.tokenizer import build_tokenizer
from automodel.errors import UserError
from tests.conftest import ASSETS, REPO_ROOT, STORIES

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


# ---- the data cache's tokenizer fingerprint --------------------------------------------------------------


def fingerprint_in_fresh_interpreter(path, hash_seed: str) -> str:
    code = ("import sys; from transformers import AutoTokenizer;"
            " from automodel.data.cache import tokenizer_fingerprint;"
            " print(tokenizer_fingerprint(AutoTokenizer.from_pretrained(sys.argv[1])))")
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env,
                          timeout=120, check=True)
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("name", ["llama2", "qwen"])
def test_tokenizer_fingerprint_is_stable_across_processes(name):
    """Same tokenizer files, two interpreters with different string hashing: the same cache key."""
    path = ASSETS / "tokenizers" / name
    assert fingerprint_in_fresh_interpreter(path, "1") == fingerprint_in_fresh_interpreter(path, "2") == \
        tokenizer_fingerprint(AutoTokenizer.from_pretrained(path))


def test_tokenizer_fingerprint_changes_with_what_decides_the_ids(stories_tokenizer):
    base = tokenizer_fingerprint(stories_tokenizer)
    assert tokenizer_fingerprint(copy.deepcopy(stories_tokenizer)) == base
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(GPT2)) != base
    variants = [apply_tokenizer_options(copy.deepcopy(stories_tokenizer), add_bos=False),
                apply_tokenizer_options(copy.deepcopy(stories_tokenizer), add_eos=True),
                apply_tokenizer_options(copy.deepcopy(stories_tokenizer), chat_template="{{ messages }}")]
    extended = copy.deepcopy(stories_tokenizer)
    extended.add_tokens(["<extra>"])
    renamed = copy.deepcopy(stories_tokenizer)
    renamed.add_special_tokens({"pad_token": "<pad>"})
    prints = [tokenizer_fingerprint(t) for t in (*variants, extended, renamed)]
    assert base not in prints and len(set(prints)) == len(prints)
