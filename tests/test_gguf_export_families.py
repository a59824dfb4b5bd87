"""`automodel export --format gguf` of the remote-code families automodel reads into transformers' native classes
(automodel/gguf_out/families.py), checked by llama.cpp as tests/test_gguf_export.py checks the native families.

Each family's tiny checkpoint in its PUBLISHED layout (tests/models/published.py: its own config fields and weight
names, no modeling code) is exported as F32; llama.cpp runs the file and gives the greedy tokens of `automodel
generate` and logits within test_gguf_export's LOGIT_TOLERANCE (derived there) of ours, and, for the families under
llama.cpp's llama architecture, transformers' GGUF reader reads our weights back exactly. The families read into
automodel's own modules stop with one line before any weight is read (their configs alone, no weights).

Cost, measured with --durations on 2 cores shared with other agents (load average ~5): this file 2m21s, of which
the 9 llama.cpp checks 9 to 23 s each (llama.cpp's subprocess and our generation ~10 s, the export ~4 s, the
read-back's dequantised copy ~8 s where it runs: hence none for Aquila and DeepSeek, which are LlamaForCausalLM
itself); the refusals under 0.5 s each.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from automodel.cli.main import main
from automodel.models.registry import family_rows
from tests.models.published import variant_row, write_published_checkpoint
from tests.models.tiny import shared_tokenizer
from tests.test_gguf_export import PROMPTS, check_against_llamacpp, check_float32_rounding, check_read_back, export

pytestmark = pytest.mark.slow

ROWS = {row.published_type: row for row in family_rows()}
# (case, its row: a published_type of ROWS or a VARIANTS name, config fields over its tiny ones (None: dropped),
# the GGUF architecture it is written under, whether transformers' GGUF reader reads it back). The published
# InternLM and InternLM2 configs use dynamic-NTK rope, which llama.cpp lacks: written as plain rope, which it equals
# up to max_position_embeddings, with a warning that says so (DYNAMIC_ROPE).
# The families written as llama (Aquila, dense DeepSeek, InternLM2, Baichuan) are read back by the same llama reader
# whose weight mapping test_gguf_export's llama row checks (~8 s each here on 2 busy cores); llama.cpp checks their
# weights through its logits. Orion's stablelm reader is another.
CASES = [
    ("aquila", "aquila", {}, "llama", False),
    ("deepseek", "deepseek", {}, "llama", False),
    # biases on q, k, v and o, which transformers' llama GGUF reader does not read
    ("internlm", "internlm", {}, "llama", False),
    ("internlm2", "internlm2", {}, "llama", False),
    ("baichuan", "baichuan", {}, "llama", False),
    # its head is written normalised: the read-back holds the normalised rows, not the trained ones
    ("baichuan2", "baichuan2", {}, "llama", False),
    ("orion", "orion", {}, "stablelm", True),
    ("minicpm", "minicpm", {}, "granite", False),  # transformers' GGUF reader has no granite
    ("chatglm", "chatglm", {}, "chatglm", False),  # nor chatglm
]


# named after the published architecture, as the refusals are
DYNAMIC_ROPE = "(read as llama): its dynamic-NTK rope is written as plain rope, which it equals up to max_position_"


def published_folder(name: str, folder: Path, **fields) -> Path:
    """The tiny published checkpoint of `name` with `fields` over its config (None removes a field), and its
    tokenizer beside it."""
    row = ROWS[name] if name in ROWS else variant_row(name)
    write_published_checkpoint(row, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(fields)
    config = {key: value for key, value in config.items() if value is not None}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    shared_tokenizer(name=row.tokenizer).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(("name", "fields", "arch", "read_back"), [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_llamacpp_runs_the_f32_export_of_each_family(name, fields, arch, read_back, tmp_path, llamacpp_python,
                                                     capsys):
    from gguf import GGUFReader

    from automodel.inference.generate import Generator

    folder = published_folder(name, tmp_path / "model", **fields)
    gguf_file = export(folder, tmp_path / "out" / "model.gguf")
    printed = capsys.readouterr()
    assert (DYNAMIC_ROPE in printed.out + printed.err) == (name in ("internlm", "internlm2"))
    architecture = GGUFReader(gguf_file).fields["general.architecture"]
    assert bytes(architecture.parts[architecture.data[0]]).decode() == arch
    generator = Generator.load(str(folder), dtype="float32", device="cpu")
    check_against_llamacpp(generator, gguf_file, llamacpp_python, tmp_path, PROMPTS)
    if read_back:
        check_read_back(generator.model, gguf_file)
    if name == "baichuan2":
        check_normalised_head(folder, gguf_file)
    check_float32_rounding(generator.model, generator.tokenizer)


def check_normalised_head(folder: Path, gguf_file: Path) -> None:
    """Baichuan2: the file's output rows are the trained head's rows at unit norm (what NormHead multiplies by);
    the stored checkpoint's rows are not (so llama.cpp's logits would differ from ours on the head as stored)."""
    import torch
    from gguf import GGUFReader
    from safetensors.torch import load_file

    stored = load_file(folder / "model.safetensors")["lm_head.weight"]
    written = next(t for t in GGUFReader(gguf_file).tensors if t.name == "output.weight")
    written = torch.from_numpy(written.data.copy()).reshape(stored.shape)
    assert not torch.allclose(stored.norm(dim=-1), torch.ones(len(stored)), atol=1e-3)
    torch.testing.assert_close(written, stored / stored.norm(dim=-1, keepdim=True), rtol=1e-6, atol=1e-7)


# Published configs read into automodel's own modules without export rules (the four with rules:
# tests/test_gguf_export_own_families.py): (case, row, config fields, what the one-line refusal names).
REFUSED = [
    ("solar", "solar", {}, "SolarForCausalLM has no GGUF export: automodel reads it into its own "
                           "SolarMistralForCausalLM (skip connections"),
    ("phi3small", "phi3small", {}, "Phi3SmallForCausalLM has no GGUF export: automodel reads it into its own "
                                   "Phi3SmallLlamaForCausalLM (block-sparse attention"),
]


@pytest.mark.parametrize(("name", "fields", "named"), [case[1:] for case in REFUSED], ids=[c[0] for c in REFUSED])
def test_own_modules_stop_with_one_line(name, fields, named, tmp_path, capsys):
    """Only config.json (and the tokenizer files): the refusal comes before anything is loaded."""
    folder = published_folder(name, tmp_path / "model", **fields)
    (folder / "model.safetensors").unlink()
    capsys.readouterr()
    assert main(["export", str(folder), "--format", "gguf", "--type", "f32", "--output",
                 str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err
    assert named in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.gguf").exists()


def test_trusting_remote_code_checks_the_published_config(tmp_path, capsys):
    """With --trust-remote-code the family's own code would load (its own model_type, no rules here): it stops."""
    folder = published_folder("aquila", tmp_path / "model")
    (folder / "model.safetensors").unlink()
    capsys.readouterr()
    assert main(["export", str(folder), "--format", "gguf", "--output", str(tmp_path / "x.gguf"),
                 "--trust-remote-code"]) == 2
    err = capsys.readouterr().err
    assert "AquilaForCausalLM (model_type 'aquila') has no GGUF export" in err and len(err.strip().splitlines()) == 1


def test_writer_refuses_a_loaded_own_module(tmp_path):
    """Defence in depth: a model of an own module handed to the writer directly (as a GGUF base's path, which skips
    the config check, would) stops too."""
    from automodel.errors import UserError
    from automodel.gguf_out.writer import write_gguf
    from automodel.models import load_causal_lm

    folder = published_folder("solar", tmp_path / "model")
    model = load_causal_lm(str(folder), dtype="float32")
    assert model.config.model_type == "mistral"  # what rules_for alone would accept
    with pytest.raises(UserError, match="SolarForCausalLM has no GGUF export: automodel reads it into its own "
                                        "SolarMistralForCausalLM"):
        write_gguf(model, shared_tokenizer(name=ROWS["solar"].tokenizer), tmp_path / "x.gguf", "F32", "x")
    assert not list(tmp_path.glob("*.gguf*"))
