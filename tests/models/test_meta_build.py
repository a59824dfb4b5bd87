"""The meta-device build (models/build.py) gives exactly the model the whole-model load gives, from the hub's
checkpoint layouts, and refuses broken checkpoints with one line; the `model/` writer (checkpoint/hf_writer.py)
writes the hub's sharded layout that transformers loads unchanged."""

from __future__ import annotations

import argparse
import json
import logging
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from automodel.checkpoint import write_hf_model
from automodel.errors import UserError
from automodel.models import families, load_tokenizer
from automodel.models.build import build_in_full, build_model, lora_settings, model_section
from automodel.models.registry import BY_NAME, family_rows, native_rows
from tests.conftest import REPO_ROOT, STORIES
from tests.distributed_helpers import clean_env, free_port, run_together
from tests.helpers import tiny_squad_config
from tests.models.published import VARIANTS, variant_row, write_published_checkpoint
from tests.models.tiny import shared_tokenizer, write_tiny_checkpoint

LORA = {"target_modules": "all-linear", "dim": 8, "alpha": 32}


def both_builds(cfg: dict, seed: int = 7):
    """(whole-model load, meta build), each after the same seed, with the generator state each left behind."""
    torch.manual_seed(seed)
    full = build_in_full(model_section(cfg), lora_settings(cfg), None, torch.device("cpu"))
    full_rng = torch.get_rng_state()
    torch.manual_seed(seed)
    meta = build_model(cfg)
    return full, full_rng, meta, torch.get_rng_state()


def assert_same_model(full, meta) -> None:
    want, got = full.state_dict(), meta.state_dict()
    assert want.keys() == got.keys()
    for name in want:
        assert want[name].dtype == got[name].dtype, name
        assert torch.equal(want[name], got[name]), name
    buffers = dict(meta.named_buffers())
    assert buffers and all(torch.equal(b, buffers[n]) for n, b in full.named_buffers())  # rotary inv_freq
    hf = meta.get_base_model() if hasattr(meta, "get_base_model") else meta
    assert hf.lm_head.weight is hf.model.embed_tokens.weight  # stories260K ties its embeddings
    assert full.config._attn_implementation == meta.config._attn_implementation


@pytest.fixture(scope="module")
def bf16_shards(tmp_path_factory):
    """stories260K stored in bf16 as the hub stores big models: 4 shards and an index."""
    folder = tmp_path_factory.mktemp("bf16_shards")
    AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.bfloat16).save_pretrained(folder, max_shard_size="150KB")
    assert len(list(folder.glob("model-*-of-00004.safetensors"))) == 4
    return folder


@pytest.mark.parametrize("peft", [None, LORA], ids=["sft", "lora"])
def test_meta_build_equals_the_whole_model_load(peft, caplog):
    """Same weights, buffers, tied embeddings and LoRA initial values, and the generator left in the same state."""
    with caplog.at_level(logging.INFO, logger="automodel"):
        full, full_rng, meta, meta_rng = both_builds({"model": {"pretrained_model_name_or_path": str(STORIES)},
                                                      "peft": peft})
    assert "built on the meta device" in caplog.text
    assert_same_model(full, meta)
    assert torch.equal(full_rng, meta_rng)
    if peft:
        lora_a = [p for n, p in meta.named_parameters() if "lora_A" in n]
        assert lora_a and all(p.abs().sum() > 0 for p in lora_a)


@pytest.mark.parametrize("init", [False, "gaussian", "orthogonal"])
def test_meta_build_reproduces_each_lora_initialisation(init):
    """peft's other initialisations (`peft.init_lora_weights`) draw other values, and the meta build draws them too
    (before it took the default's: gaussian draws as many numbers, so the generator check alone missed it)."""
    peft = {**LORA, "init_lora_weights": init}
    full, full_rng, meta, meta_rng = both_builds({"model": {"pretrained_model_name_or_path": str(STORIES)},
                                                  "peft": peft})
    assert_same_model(full, meta)
    assert torch.equal(full_rng, meta_rng)
    lora_b = [p for n, p in meta.named_parameters() if "lora_B" in n]
    assert lora_b and all((p.abs().sum() > 0) == (init != "gaussian") for p in lora_b)  # gaussian: B starts at 0


@pytest.fixture(scope="module")
def gpt2_checkpoint(tmp_path_factory):
    """A tiny random GPT-2: its projections are Conv1D, stored input x output (peft's fan_in_fan_out)."""
    folder = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=128, n_positions=64)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("model, dtype, init", [("stories", "float32", True), ("stories", "bfloat16", False),
                                                ("gpt2", "float32", False)],
                         ids=["fp32-default", "bf16-init-false", "gpt2-conv1d-init-false"])
def test_dora_builds_on_the_meta_device(gpt2_checkpoint, model, dtype, init, caplog):
    """DoRA's magnitudes (the row norms of W + scaling x B @ A), computed after the base weights are read, equal the
    ones peft computed on the loaded model, bit for bit. B @ A is zero for the default init, not for
    `init_lora_weights: false`; a bf16 base makes peft take the norms in bf16 before it casts the adapter to fp32;
    GPT-2's Conv1D weights are stored transposed."""
    folder = STORIES if model == "stories" else gpt2_checkpoint
    cfg = {"model": {"pretrained_model_name_or_path": str(folder), "dtype": dtype},
           "peft": {**LORA, "use_dora": True, "init_lora_weights": init}}
    with caplog.at_level(logging.INFO, logger="automodel"):
        full, full_rng, meta, meta_rng = both_builds(cfg)
    adapted = sum(".lora_magnitude_vector." in n for n, _ in meta.named_parameters())
    assert "built on the meta device" in caplog.text and adapted == (35 if model == "stories" else 8)
    assert f"DoRA magnitudes of {adapted} adapted layers computed from the loaded weights" in caplog.text
    want, got = full.state_dict(), meta.state_dict()
    assert want.keys() == got.keys()
    for name in want:
        assert want[name].dtype == got[name].dtype and torch.equal(want[name], got[name]), name
    assert torch.equal(full_rng, meta_rng)
    layer = next(m for m in meta.modules() if getattr(m, "lora_magnitude_vector", None))
    base = layer.get_base_layer().weight.float()
    row_norms = (base.T if model == "gpt2" else base).norm(dim=1)
    assert torch.allclose(layer.lora_magnitude_vector["default"].weight, row_norms, rtol=1e-2) == (init is True)


def test_dora_on_two_fsdp2_processes_matches_the_whole_model(tmp_path):
    """Two real processes (gloo) build DoRA under FSDP2 on the meta device: each holds exactly its rows of every
    parameter of the whole-model load (magnitudes included), and training steps give the whole model's losses."""
    cfg = {"model": {"pretrained_model_name_or_path": str(STORIES)},
           "peft": {**LORA, "use_dora": True, "init_lora_weights": False},
           "distributed": {"strategy": "fsdp2"}, "precision": "fp32",
           "dist_env": {"backend": "gloo", "timeout_minutes": 2}}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    port = free_port()
    command = [sys.executable, "-m", "tests.models.dora_fsdp2_worker", str(tmp_path / "cfg.json"), str(tmp_path)]
    outputs = run_together([(command, dict(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))) for rank in range(2)],
                           port, timeout=240)
    assert "DoRA magnitudes of 35 adapted layers computed from the loaded weights" in outputs[0]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [r["sharded_magnitudes"] for r in ranks] == [35, 35] and [r["mismatches"] for r in ranks] == [[], []]
    assert ranks[0]["sharded_losses"] == ranks[1]["sharded_losses"]
    assert ranks[0]["sharded_losses"] == pytest.approx(ranks[0]["whole_losses"], rel=1e-5)
    assert len(set(ranks[0]["whole_losses"])) == 3


@pytest.mark.parametrize("dtype, peft", [("float32", None), ("bfloat16", LORA)], ids=["fp32-sft", "bf16-lora"])
def test_bf16_sharded_checkpoint(bf16_shards, dtype, peft):
    """bf16 shards read into fp32 (or bf16) parameters exactly as transformers reads them."""
    cfg = {"model": {"pretrained_model_name_or_path": str(bf16_shards), "dtype": dtype}, "peft": peft}
    full, full_rng, meta, meta_rng = both_builds(cfg)
    assert_same_model(full, meta)
    assert torch.equal(full_rng, meta_rng)


def _copy_stories(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    for item in STORIES.iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    return folder


def _rewrite_header(path, change) -> None:
    """Rewrite one safetensors file's header through `change(header)`; the data stays as it is."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    change(header)
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    path.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + length:])


def _set_dtype(name, dtype):
    def change(header):
        header[name]["dtype"] = dtype
    return change


@pytest.mark.parametrize("breakage, message", [
    ("missing shard", "model-00002-of-00004.safetensors is missing (the index puts"),
    ("index disagrees", "but model.safetensors.index.json puts it in"),
    ("unreadable dtype", "stores model.norm.weight as 'I16'; expected one of BF16, F16, F32, F64"),
    ("unknown dtype", "stores model.norm.weight as 'X7'"),
    ("unlisted shard", "is not listed in"),
], ids=lambda v: v if " " in v and len(v) < 20 else "")
def test_broken_sharded_checkpoints_name_file_and_tensor(bf16_shards, tmp_path, breakage, message):
    folder = tmp_path / "broken"
    folder.mkdir()
    for item in bf16_shards.iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    norm_file = folder / index["weight_map"]["model.norm.weight"]
    if breakage == "missing shard":
        (folder / "model-00002-of-00004.safetensors").unlink()
    elif breakage == "index disagrees":
        other = next(f for f in index["weight_map"].values() if f != norm_file.name)
        index["weight_map"]["model.norm.weight"] = other
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    elif breakage == "unlisted shard":
        (folder / "extra.safetensors").write_bytes(norm_file.read_bytes())
    else:
        _rewrite_header(norm_file, _set_dtype("model.norm.weight", "I16" if breakage == "unreadable dtype" else "X7"))
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(".", r"\.")):
        build_model({"model": {"pretrained_model_name_or_path": str(folder)}})


def test_wrong_shape_and_missing_tensor(tmp_path):
    folder = _copy_stories(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(UserError, match=r"model\.safetensors stores model\.layers\.0\.mlp\.gate_proj\.weight with "
                                        r"shape \[172, 64\]; the model's config gives \[96, 64\]"):
        build_model({"model": {"pretrained_model_name_or_path": str(folder)}})
    (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    with pytest.raises(UserError, match=r"has no tensor lm_head\.weight \(looked in model\.safetensors\)"):
        build_model({"model": {"pretrained_model_name_or_path": str(folder)}})


def test_bin_weights_load_only_when_weights_only_reads_them(tmp_path):
    folder = _copy_stories(tmp_path)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    model = build_model({"model": {"pretrained_model_name_or_path": str(folder)}})
    assert torch.equal(model.model.norm.weight, state["model.norm.weight"])
    torch.save({"weights": state, "args": argparse.Namespace(lr=1)}, folder / "pytorch_model.bin")  # not only tensors
    with pytest.raises(UserError, match=r"pytorch_model\.bin does not load with weights_only=True"):
        build_model({"model": {"pretrained_model_name_or_path": str(folder)}})


def quantise_to_fp8(folder, block: int = 16) -> None:
    """Rewrite a checkpoint as the fine-grained fp8 releases store theirs (DeepSeek-V3, the -FP8 models): each
    projection weight in float8_e4m3fn with a float32 `weight_scale_inv` per block x block tile, and the config's
    `quantization_config` saying so."""
    state = load_file(folder / "model.safetensors")
    quantised = {}
    for name, tensor in state.items():
        if tensor.dim() != 2 or not name.endswith("proj.weight"):
            quantised[name] = tensor
            continue
        rows, cols = tensor.shape
        tiles = -(-rows // block), -(-cols // block)
        padded = torch.zeros(tiles[0] * block, tiles[1] * block)
        padded[:rows, :cols] = tensor
        scale = padded.view(tiles[0], block, tiles[1], block).abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
        scaled = padded / scale.repeat_interleave(block, 0).repeat_interleave(block, 1)
        quantised[name] = scaled[:rows, :cols].to(torch.float8_e4m3fn)
        quantised[f"{name}_scale_inv"] = scale
    save_file(quantised, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [block, block]}
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "DeepseekV3ForCausalLM"])
def test_fp8_checkpoint_is_dequantised_group_by_group(architecture, tmp_path, caplog):
    """An fp8 checkpoint (DeepSeek-V3's format: per-expert fp8 weights with block scales) builds on the meta device,
    dequantised by transformers' own fp8 op one group at a time: what transformers' whole-model load gives, and a
    float model that saves without the quantization_config."""
    folder = write_tiny_checkpoint(BY_NAME[architecture], tmp_path / "fp8")
    quantise_to_fp8(folder)
    with caplog.at_level(logging.INFO, logger="automodel"):
        model = build_model({"model": {"pretrained_model_name_or_path": str(folder)}})
    assert "one conversion group at a time" in caplog.text
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)  # dequantises on a CPU machine
    want, got = reference.state_dict(), model.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert getattr(model.config, "quantization_config", None) is None


def fake_snapshot_download(hub):
    """huggingface_hub.snapshot_download for a repository whose files are those of the local folder `hub` (the
    network is what cannot exist here): the files matching allow_patterns, in a snapshot folder of their own."""
    import fnmatch
    import shutil

    def download(repo_id, revision=None, allow_patterns=None, **_):
        snapshot = hub.parent / "cache" / repo_id.replace("/", "--")
        snapshot.mkdir(parents=True, exist_ok=True)
        for item in hub.iterdir():
            if any(fnmatch.fnmatch(item.name, pattern) for pattern in allow_patterns):
                shutil.copy(item, snapshot / item.name)
        return str(snapshot)
    return download


def test_sharded_bin_checkpoint_from_a_hub_id_builds_on_the_meta_device(tmp_path, monkeypatch, caplog):
    """A repository of `.bin` shards and their index only (older hub checkpoints): the build fetches them and reads
    each process's shard from the memory-mapped pickles, equal to the whole-model load."""
    import huggingface_hub

    hub = _copy_stories(tmp_path)
    state = load_file(hub / "model.safetensors")
    (hub / "model.safetensors").unlink()
    names = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for file, part in shards.items():
        torch.save({name: state[name].to(torch.bfloat16) for name in part}, hub / file)
    (hub / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {name: file for file, part in shards.items() for name in part}}))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download(hub))
    cfg = {"model": {"pretrained_model_name_or_path": "org/stories-bin", "dtype": "bfloat16"}}
    with caplog.at_level(logging.INFO, logger="automodel"):
        model = build_model(cfg)
    assert "(2 .bin files, one conversion group at a time)" in caplog.text
    reference = AutoModelForCausalLM.from_pretrained(hub, dtype=torch.bfloat16)
    want, got = reference.state_dict(), model.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_broken_checkpoint_exits_2_with_one_line_and_writes_nothing(bf16_shards, tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    for item in bf16_shards.iterdir():
        if item.name != "model-00003-of-00004.safetensors":
            (folder / item.name).write_bytes(item.read_bytes())
    cfg = tiny_squad_config(tmp_path, peft=True, max_steps=1)
    cfg["model"]["pretrained_model_name_or_path"] = str(folder)
    cfg["tokenizer"] = str(STORIES)
    (tmp_path / "cfg.yaml").write_text(json.dumps(cfg))
    out = subprocess.run([sys.executable, "-m", "automodel", "finetune", "llm", "-c", str(tmp_path / "cfg.yaml")],
                         capture_output=True, text=True, cwd=REPO_ROOT, env=clean_env(), timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert f"model weights: {folder}/model-00003-of-00004.safetensors is missing (the index puts" in last
    assert not (tmp_path / "ckpt").exists()


def test_sharded_model_folder_loads_unchanged(tmp_path):
    """The writer's shards, index and config: what save_pretrained writes, tensor for tensor."""
    model = build_model({"model": {"pretrained_model_name_or_path": str(STORIES)}})
    write_hf_model(model, load_tokenizer(str(STORIES)), tmp_path / "ours", max_shard_size="300KB")
    model.save_pretrained(tmp_path / "theirs", max_shard_size="300KB")
    ours, theirs = (json.loads((tmp_path / d / "model.safetensors.index.json").read_text()) for d in ("ours", "theirs"))
    assert ours == theirs and len(set(ours["weight_map"].values())) == 4
    for name in set(ours["weight_map"].values()):
        mine, reference = load_file(tmp_path / "ours" / name), load_file(tmp_path / "theirs" / name)
        assert mine.keys() == reference.keys() and all(torch.equal(mine[k], reference[k]) for k in mine)
    for name in ("config.json", "generation_config.json"):
        assert json.loads((tmp_path / "ours" / name).read_text()) == json.loads((tmp_path / "theirs" / name).read_text())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


# One of each kind of structure: hybrid mamba layers, scaled embeddings (a non-persistent buffer next to a
# parameter), soft-capped attention, GPT-2 style fused projections, parallel attention, MLA, and two whose
# checkpoint names transformers converts (MoE experts fused; Exaone's renamed modules). All 37 pass; the subset
# keeps the suite short.
ARCHITECTURES = ("BambaForCausalLM", "Gemma3ForCausalLM", "Gemma2ForCausalLM", "GPTNeoXForCausalLM",
                 "FalconForCausalLM", "MiniCPM3ForCausalLM", "MixtralForCausalLM", "ExaoneForCausalLM",
                 "DeepseekV3ForCausalLM")


@pytest.mark.parametrize("row", [r for r in native_rows() if r.architecture in ARCHITECTURES],
                         ids=lambda row: row.test_id)
def test_architectures_build_the_same_on_the_meta_device(row, tmp_path, caplog):
    """An architecture's tiny checkpoint: the meta build equals the whole-model load, LoRA included; checkpoints
    whose names transformers converts (Mixtral's per-expert tensors, Exaone's names) are read group by group."""
    assert_meta_build_equals_whole_load(write_tiny_checkpoint(row, tmp_path / "model"), caplog)
    converted = row.architecture in ("MixtralForCausalLM", "ExaoneForCausalLM", "DeepseekV3ForCausalLM")
    assert ("one conversion group at a time" in caplog.text) == converted


FAMILY_ROWS = {**{row.published_type: row for row in family_rows()}, **{name: variant_row(name) for name in VARIANTS}}


@pytest.mark.parametrize("row", FAMILY_ROWS.values(), ids=FAMILY_ROWS.keys())
def test_remote_code_families_build_the_same_on_the_meta_device(row, tmp_path, caplog):
    """A remote-code family's published checkpoint (its own names: W_pack, wqkv, ChatGLM's layout, per-expert MoE
    tensors) builds on the meta device through transformers' conversions, equal to the whole-model load."""
    assert_meta_build_equals_whole_load(write_published_checkpoint(row, tmp_path / "published"), caplog)


def test_baichuan2_13b_builds_the_same_on_the_meta_device(tmp_path, caplog):
    """Baichuan2-13B's ALiBi class and normalised head, from its published W_pack layout."""
    from tests.models.test_family_baichuan13b import write_checkpoint

    assert_meta_build_equals_whole_load(write_checkpoint("baichuan2-13b", tmp_path / "published"), caplog)


def assert_meta_build_equals_whole_load(folder, caplog) -> None:
    """With LoRA on every linear layer: the same class, state, buffers and generator state afterwards."""
    with caplog.at_level(logging.INFO, logger="automodel"):
        full, full_rng, meta, meta_rng = both_builds({"model": {"pretrained_model_name_or_path": str(folder)},
                                                      "peft": {"target_modules": "all-linear", "dim": 4}})
    assert "built on the meta device" in caplog.text
    assert type(meta.get_base_model()) is type(full.get_base_model())
    want, got = full.state_dict(), meta.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want), [k for k in want if not torch.equal(want[k], got[k])]
    buffers = dict(meta.named_buffers())
    assert all(torch.equal(b, buffers[n]) for n, b in full.named_buffers() if not b.is_meta)
    assert torch.equal(full_rng, meta_rng)


def saved_tensors_of(folder) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


@pytest.mark.parametrize("name", ["MixtralForCausalLM", "internlm2", "chatglm", "deepseek-moe"])
def test_converted_names_are_written_back_group_by_group(name, tmp_path, caplog):
    """The `model/` writer turns fused experts and a family's native modules back into the checkpoint's names one
    conversion group at a time: the same tensors and config.json as transformers' save_pretrained writes."""
    if name in VARIANTS:
        row = variant_row(name)
    else:
        row = next(r for r in [*native_rows(), *family_rows()] if name in (r.architecture, r.published_type))
    write = write_tiny_checkpoint if row in native_rows() else write_published_checkpoint
    source = write(row, tmp_path / "source")
    model = build_model({"model": {"pretrained_model_name_or_path": str(source)}})
    write_hf_model(model, shared_tokenizer(name=row.tokenizer), tmp_path / "ours", max_shard_size="20KB")
    families.save_pretrained(model, tmp_path / "theirs")
    ours, theirs = saved_tensors_of(tmp_path / "ours"), saved_tensors_of(tmp_path / "theirs")
    assert len(list((tmp_path / "ours").glob("model-*.safetensors"))) > 1
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert set(ours) <= set(load_file(source / "model.safetensors")) or row in native_rows()
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config == json.loads((tmp_path / "theirs" / "config.json").read_text())
    reloaded = build_model({"model": {"pretrained_model_name_or_path": str(tmp_path / "ours")}})
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), model.state_dict().values()))
