"""Chat data on real instruction rows turned into conversations: assistant-only masks with and without
generation markers, on real tokenizers (Qwen with ChatML special tokens, the stories260K sentencepiece)."""

import copy
import json

import pytest
from transformers import AutoTokenizer

from automodel.data.chat import make_chat_dataset
from automodel.data.tokenizer import apply_tokenizer_options
from automodel.errors import UserError
from tests.conftest import ASSETS

# ChatML as Qwen writes it, without and with generation markers (identical text: transformers renders with
# trim_blocks, so the newline after {% endgeneration %} is written as an expression).
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' %}"
    "{% if message.tool_calls is defined %}{% for call in message.tool_calls %}<tool_call>{{ call['function']['name'] }}"
    "({{ call['function']['arguments'] }})</tool_call>{% endfor %}{% endif %}"
    "{{ message['content'] or '' }}<|im_end|>\n"
    "{% else %}{{ message['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHATML_MARKED = CHATML.replace(
    "{% if message.tool_calls is defined %}", "{% generation %}{% if message.tool_calls is defined %}").replace(
    "{{ message['content'] or '' }}<|im_end|>\n", "{{ message['content'] or '' }}<|im_end|>{% endgeneration %}{{ '\\n' }}")
# Llama-2's layout: the answer follows [/INST] directly and ends with eos; the system prompt sits in the first turn.
LLAMA2 = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}[INST] <<SYS>>\n{{ message['content'] }}\n<</SYS>>\n\n"
    "{% elif message['role'] == 'user' %}{% if loop.index0 > 0 and messages[loop.index0 - 1]['role'] != 'system' %}"
    "[INST] {% endif %}{{ message['content'] }} [/INST]"
    "{% else %} {{ message['content'] }} {{ eos_token }}{% endif %}{% endfor %}"
)


@pytest.fixture(scope="module")
def conversations():
    """Real Alpaca records as single- and two-turn conversations, some with a system message."""
    rows = json.loads((ASSETS / "instruct" / "alpaca_en_demo.json").read_text())[:24]

    def user(row):
        return {"role": "user", "content": row["instruction"] + ("\n\n" + row["input"] if row["input"] else "")}

    chats = []
    for i in range(0, 24, 3):
        chats.append({"messages": [user(rows[i]), {"role": "assistant", "content": rows[i]["output"]}]})
        chats.append({"messages": [{"role": "system", "content": "You are a helpful assistant."}, user(rows[i + 1]),
                                   {"role": "assistant", "content": rows[i + 1]["output"]}, user(rows[i + 2]),
                                   {"role": "assistant", "content": rows[i + 2]["output"]}]})
    return chats


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def qwen():
    return AutoTokenizer.from_pretrained(ASSETS / "tokenizers" / "qwen")


def with_template(tokenizer, template):
    return apply_tokenizer_options(copy.deepcopy(tokenizer), chat_template=template)


def labelled_runs(item):
    runs, current = [], []
    for token, label in zip(item["input_ids"], item["labels"]):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


@pytest.mark.parametrize("template", [CHATML, CHATML_MARKED], ids=["no-markers", "markers"])
def test_chatml_labels_exactly_the_assistant_turns(tmp_path, qwen, conversations, template):
    tokenizer = with_template(qwen, template)
    ds = make_chat_dataset(tokenizer, write_jsonl(tmp_path / "chat.jsonl", conversations), cache_dir=str(tmp_path))
    assert len(ds) == len(conversations)
    for item, chat in zip(ds, conversations):
        text = tokenizer.apply_chat_template(chat["messages"], tokenize=False)
        assert item["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
        answers = [m["content"] for m in chat["messages"] if m["role"] == "assistant"]
        assert [tokenizer.decode(run) for run in labelled_runs(item)] == [a + "<|im_end|>" for a in answers]


def test_prefix_diffing_matches_the_markers_on_a_sentencepiece_tokenizer(tmp_path, stories_tokenizer, conversations):
    path = write_jsonl(tmp_path / "chat.jsonl", conversations)
    plain = make_chat_dataset(with_template(stories_tokenizer, CHATML), path, cache_dir=str(tmp_path))
    marked = make_chat_dataset(with_template(stories_tokenizer, CHATML_MARKED), path, cache_dir=str(tmp_path))
    assert plain[:] == marked[:]
    assert all(len(labelled_runs(item)) == sum(m["role"] == "assistant" for m in chat["messages"])
               for item, chat in zip(plain, conversations))


def test_llama2_layout_without_markers(tmp_path, stories_tokenizer, conversations):
    tokenizer = with_template(stories_tokenizer, LLAMA2)
    ds = make_chat_dataset(tokenizer, write_jsonl(tmp_path / "chat.jsonl", conversations), cache_dir=str(tmp_path))
    for item, chat in zip(ds, conversations):
        assert item["input_ids"][0] == tokenizer.bos_token_id
        runs = labelled_runs(item)
        answers = [m["content"] for m in chat["messages"] if m["role"] == "assistant"]
        assert len(runs) == len(answers)
        for run, answer in zip(runs, answers):
            assert run[-1] == tokenizer.eos_token_id
            assert tokenizer.decode(run[:-1]).strip() == answer.strip()


def test_tool_calls_are_trained_tool_results_are_not(tmp_path, qwen):
    chat = {"messages": [
        {"role": "user", "content": "What is 17 * 23?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "multiply", "arguments": '{"a": 17, "b": 23}'}}]},
        {"role": "tool", "content": "391"},
        {"role": "assistant", "content": "17 * 23 = 391."}]}
    tokenizer = with_template(qwen, CHATML)
    ds = make_chat_dataset(tokenizer, write_jsonl(tmp_path / "tools.jsonl", [chat]), cache_dir=str(tmp_path))
    runs = [tokenizer.decode(run) for run in labelled_runs(ds[0])]
    assert runs == ['<tool_call>multiply({"a": 17, "b": 23})</tool_call><|im_end|>', "17 * 23 = 391.<|im_end|>"]


def test_bad_conversations_are_reported(tmp_path, qwen, conversations):
    tokenizer = with_template(qwen, CHATML)
    rows = copy.deepcopy(conversations[:4])
    rows[2]["messages"] = [m for m in rows[2]["messages"] if m["role"] != "assistant"]
    path = write_jsonl(tmp_path / "no_answer.jsonl", rows)
    with pytest.raises(UserError, match="no_answer.jsonl: row 2: the conversation has no assistant turn"):
        make_chat_dataset(tokenizer, path, cache_dir=str(tmp_path))
    skipped = make_chat_dataset(tokenizer, path, skip_invalid_rows=True, cache_dir=str(tmp_path))
    assert len(skipped) == 3 and skipped.num_skipped == 1

    rows = copy.deepcopy(conversations[:2])
    rows[1]["messages"][0]["role"] = "narrator"
    with pytest.raises(UserError, match="row 1: message 0: role must be one of"):
        make_chat_dataset(tokenizer, write_jsonl(tmp_path / "role.jsonl", rows), cache_dir=str(tmp_path))
    with pytest.raises(UserError, match="no column 'conversation' \\(messages_column\\)"):
        make_chat_dataset(tokenizer, path, messages_column="conversation", cache_dir=str(tmp_path))
    with pytest.raises(UserError, match="has no chat template"):
        make_chat_dataset(qwen, path, cache_dir=str(tmp_path))
    # A template that marks the final message differently cannot be located by prefixes: reported, not guessed.
    last_differs = CHATML.replace("<|im_end|>\n{% else %}", "{% if loop.last %}<|endoftext|>{% endif %}<|im_end|>\n"
                                                            "{% else %}")
    with pytest.raises(UserError, match="row 1: the chat template does not render message 2's conversation prefix"):
        make_chat_dataset(with_template(qwen, last_differs), path, cache_dir=str(tmp_path))
