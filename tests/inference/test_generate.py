"""Generation on the pretrained stories260K: the documented greedy story, the context limit, prompt files."""

from __future__ import annotations

import pytest

from automodel.errors import UserError
from automodel.inference.generate import GenerationSettings, Generator, read_prompts
from tests.conftest import STORIES


@pytest.fixture(scope="module")
def generator():
    return Generator.load(str(STORIES))


def test_greedy_story_and_sampling_is_seeded(generator):
    assert generator.generate(["Once upon a time"], GenerationSettings(max_new_tokens=10))[0].startswith(
        ", there was a little girl")
    sampled = GenerationSettings(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=3)
    assert generator.generate(["Lily"], sampled) == generator.generate(["Lily"], sampled)


def test_generation_stops_at_the_end_of_the_context(generator):
    prompt = " ".join(["Lily"] * 505)  # 506 tokens with BOS; the model has 512 positions
    length = len(generator.tokenizer(prompt).input_ids)
    completion = generator.generate([prompt], GenerationSettings(max_new_tokens=32))[0]
    assert len(generator.tokenizer(completion, add_special_tokens=False).input_ids) <= 512 - length + 1


def test_read_prompts(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("Once upon a time\n\nLily went\n")
    assert read_prompts(str(text)) == [{"prompt": "Once upon a time"}, {"prompt": "Lily went"}]
    rows = tmp_path / "p.jsonl"
    rows.write_text('{"prompt": "a", "id": 1}\n"b"\n')
    assert read_prompts(str(rows)) == [{"prompt": "a", "id": 1}, {"prompt": "b"}]
    fields = tmp_path / "f.jsonl"
    fields.write_text('{"name": "Tom"}\n')
    assert read_prompts(str(fields), "Hello {name}") == [{"name": "Tom", "prompt": "Hello Tom"}]
    with pytest.raises(UserError, match=r"f.jsonl line 1: the template needs field 'city', the row has: name"):
        read_prompts(str(fields), "In {city}")
    with pytest.raises(UserError, match=r"f.jsonl line 1: no 'prompt' string"):
        read_prompts(str(fields))
    with pytest.raises(UserError, match="prompts file not found"):
        read_prompts(str(tmp_path / "missing.txt"))
    with pytest.raises(UserError, match="temperature must be >= 0"):
        GenerationSettings(temperature=-1)
