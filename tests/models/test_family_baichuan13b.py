"""Baichuan-13B and Baichuan2-13B (automodel/models/families/baichuan.py): ALiBi in place of rotary, read from their
published layout.

The tiny checkpoints below carry the fields of the published 13B config.json files (`BaichuanForCausalLM`, model_type
baichuan, `model_max_length` and no `max_position_embeddings`, the auto_map of their configuration_baichuan /
modeling_baichuan; Baichuan2's `z_loss_weight` and `tokenizer_class`), with the vocabulary sizes that tell the two
apart (64000 and 125696) and 6 heads, not a power of two, as 40 is not.

The reference forward is written from the published descriptions: the Llama decoder (RMSNorm, SwiGLU, q/k/v fused
as `W_pack`, rows q then k then v); ALiBi (Press et al. 2022) as Baichuan's published code applies it: scores /
sqrt(head_dim) plus `slope_h * j` for key position j under the causal mask (not `-slope_h * (i - j)` as ours: the
same softmax), slopes by the paper's rule for head counts that are not a power of two; Baichuan2's NormHead (Baichuan
2 technical report: lm_head rows divided by their L2 norm).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from automodel.checkpoint import write_hf_model
from automodel.batch import model_inputs
from automodel.batch import FlatCollator
from automodel.data.packing import PackingCollator
from automodel.errors import UserError
from automodel.models import load_causal_lm
from automodel.models.families.alibi import alibi_slopes
from automodel.models.families.baichuan import BaichuanAlibiLlamaForCausalLM, NormHead
from automodel.models.registry import BY_NAME
from tests.models.published import llama_layout, write_published_checkpoint
from tests.models.test_architectures import one_thread  # noqa: F401 (autouse fixture: one intra-op thread)
from tests.models.test_architectures import test_full_sft_changes_every_parameter_and_round_trips as sft_check
from tests.models.test_architectures import test_lora_all_linear_adapts_projections_and_round_trips as lora_check
from tests.models.test_family_baichuan2_deepseek_moe import DEEPSEEK_MOE, assert_fsdp2_sft_matches_one_process
from tests.models.tiny import shared_tokenizer

ROW = BY_NAME["BaiChuanForCausalLM"]
# name -> (vocabulary, Baichuan2's NormHead)
VARIANTS = {"baichuan-13b": (64000, False), "baichuan2-13b": (125696, True)}


def published_config(name: str) -> dict:
    vocab, baichuan2 = VARIANTS[name]
    tokenizer = shared_tokenizer(name=ROW.tokenizer)
    auto_map = {"AutoConfig": "configuration_baichuan.BaichuanConfig",
                "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"}
    config = {"_from_model_config": True, "architectures": ["BaichuanForCausalLM"], "auto_map": auto_map,
              "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
              "pad_token_id": tokenizer.pad_token_id, "hidden_act": "silu", "hidden_size": 48,
              "initializer_range": 0.02, "intermediate_size": 96, "model_max_length": 4096, "model_type": "baichuan",
              "num_attention_heads": 6, "num_hidden_layers": 2, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
              "torch_dtype": "float32", "transformers_version": "4.29.2", "use_cache": True, "vocab_size": vocab,
              "gradient_checkpointing": False}
    if baichuan2:
        config.update(tokenizer_class="BaichuanTokenizer", z_loss_weight=0)
    return config


def write_checkpoint(name: str, folder, **fields):
    """The published layout (tests/models/published.py's Llama names with `W_pack`), config fields over it."""
    config = {**published_config(name), **fields}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(llama_layout(config, torch.Generator().manual_seed(0)), folder / "model.safetensors",
              metadata={"format": "pt"})
    return folder


def paper_slopes(heads: int) -> torch.Tensor:
    """ALiBi's slopes: 2^(-8k/n) for k = 1..n when n is a power of two; otherwise the n' = 2^floor(log2 n) slopes of
    n' heads, then the odd-numbered ones of 2n' heads, 2^(-8k/2n') for k = 1, 3, 5, ..."""
    below = 2 ** math.floor(math.log2(heads))
    own = [2 ** (-8 * k / below) for k in range(1, below + 1)]
    extra = [2 ** (-8 * k / (2 * below)) for k in range(1, 2 * (heads - below), 2)]
    return torch.tensor(own + extra, dtype=torch.float64)


def reference_logits(config: dict, weights: dict[str, torch.Tensor], ids: torch.Tensor, norm_head: bool):
    """One sequence (tokens,) -> logits (tokens, vocab) in float64 from the published names and fields."""
    w = {name: tensor.double() for name, tensor in weights.items()}
    heads, tokens = config["num_attention_heads"], len(ids)
    head_dim = config["hidden_size"] // heads
    position = torch.arange(tokens, dtype=torch.float64)
    # Baichuan's form: slope x key position, -inf above the diagonal.
    alibi = paper_slopes(heads)[:, None, None] * position[None, None, :]
    causal = torch.full((tokens, tokens), float("-inf"), dtype=torch.float64).triu(1)

    def rms(x, name):
        return w[f"{name}.weight"] * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + config["rms_norm_eps"])

    h = w["model.embed_tokens.weight"][ids]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        q, k, v = (t.view(tokens, heads, head_dim).transpose(0, 1)
                   for t in (rms(h, f"{p}.input_layernorm") @ w[f"{p}.self_attn.W_pack.weight"].T).chunk(3, -1))
        attn = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(head_dim) + alibi + causal, dim=-1) @ v
        h = h + attn.transpose(0, 1).reshape(tokens, -1) @ w[f"{p}.self_attn.o_proj.weight"].T
        x = rms(h, f"{p}.post_attention_layernorm")
        gate, up = x @ w[f"{p}.mlp.gate_proj.weight"].T, x @ w[f"{p}.mlp.up_proj.weight"].T
        h = h + (torch.nn.functional.silu(gate) * up) @ w[f"{p}.mlp.down_proj.weight"].T
    head = w["lm_head.weight"]
    if norm_head:
        head = head / head.norm(dim=-1, keepdim=True)
    return rms(h, "model.norm") @ head.T


def test_alibi_slopes_of_40_and_6_heads_follow_the_papers_rule():
    """Baichuan-13B's 40 heads: the 32 slopes of 32 heads, then every other slope of 64 heads."""
    for heads in (40, 6, 8):
        torch.testing.assert_close(alibi_slopes(heads).flatten().double(), paper_slopes(heads))
    assert alibi_slopes(40)[32, 0].item() == pytest.approx(2 ** -0.125)


@pytest.mark.parametrize("name", VARIANTS)
def test_published_13b_matches_reference_padded_packed_and_padding_free_and_saves_back_bit_for_bit(name, tmp_path):
    source = write_checkpoint(name, tmp_path / "published")
    config = json.loads((source / "config.json").read_text())
    weights = load_file(source / "model.safetensors")
    model = load_causal_lm(str(source), dtype="float32").eval()
    assert isinstance(model, BaichuanAlibiLlamaForCausalLM)
    assert isinstance(model.lm_head, NormHead) == VARIANTS[name][1]
    assert model.config._attn_implementation == "automodel_sdpa"  # what training runs on CPU

    generator = torch.Generator().manual_seed(1)
    first, second = (torch.randint(3, 32000, (n,), generator=generator) for n in (20, 13))
    want = [reference_logits(config, weights, ids, VARIANTS[name][1]) for ids in (first, second)]
    assert want[0].std() > 0.1

    pad = config["pad_token_id"]
    items = [{"input_ids": t.tolist(), "labels": t.tolist()} for t in (first, second)]
    with torch.no_grad():
        left_padded = model(input_ids=torch.stack([first, torch.cat([torch.full((7,), pad), second])]),
                            attention_mask=(torch.arange(20) >= torch.tensor([[0], [7]])).long()).logits
        flat = model(**model_inputs(FlatCollator()(items))).logits[0]
        packed = model(**model_inputs(PackingCollator(pad, 40)(items))).logits[0, :33]
    for ours, reference in ((left_padded[0], want[0]), (left_padded[1, 7:], want[1]), (flat, torch.cat(want)),
                            (packed, torch.cat(want))):
        torch.testing.assert_close(ours.double(), reference, rtol=1e-4, atol=1e-4)

    write_hf_model(model, shared_tokenizer(name=ROW.tokenizer), tmp_path / "saved")
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    assert saved.keys() == weights.keys()  # model.layers.N.self_attn.W_pack.weight, lm_head.weight, ...
    assert not [n for n in weights if not torch.equal(saved[n], weights[n])], "not written back bit for bit"
    assert json.loads((tmp_path / "saved" / "config.json").read_text()) == config


def test_eager_attention_and_cached_decoding_give_the_same_logits(tmp_path):
    """Cached decoding (the queries are the last of the keys) and eager attention, which takes the mask as it is
    (automodel_sdpa splits a padding-free row by itself), so the mask alone must keep the examples apart."""
    source = write_checkpoint("baichuan2-13b", tmp_path / "published")
    ids = torch.randint(3, 32000, (1, 12), generator=torch.Generator().manual_seed(2))
    items = [{"input_ids": row, "labels": row} for row in (ids[0, :5].tolist(), ids[0, 5:].tolist())]
    with torch.no_grad():
        model = load_causal_lm(str(source)).eval()
        whole = model(input_ids=ids).logits
        prefix = model(input_ids=ids[:, :8], use_cache=True)
        step = model(input_ids=ids[:, 8:], cache=prefix.cache).logits
        eager = load_causal_lm(str(source), attn_implementation="eager").eval()
        flat = eager(**model_inputs(FlatCollator()(items))).logits[0]
        alone = torch.cat([model(input_ids=torch.tensor([item["input_ids"]])).logits[0] for item in items])
        torch.testing.assert_close(eager(input_ids=ids).logits, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step, whole[:, 8:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(flat, alone, rtol=1e-5, atol=1e-5)


def test_baichuan2_13b_lora_and_full_sft_train_and_round_trip(tmp_path):
    """Baichuan-13B's full SFT runs in the FSDP2 test below, in one process and in two."""
    folder = write_checkpoint("baichuan2-13b", tmp_path / "published")
    lora_check(ROW, lambda _: folder, tmp_path / "lora")  # the row gives the tokenizer and the LoRA targets
    sft_check(ROW, lambda _: folder, tmp_path / "sft")


@pytest.mark.slow
def test_baichuan_13b_and_deepseek_moe_under_two_process_fsdp2_match_one_process(tmp_path):
    """Full SFT under 2-process FSDP2 (gloo; tests/models/fsdp2_worker.py) against one process, in one process group:
    Baichuan-13B (ALiBi; the smaller vocabulary of the two) and DeepSeek-MoE (shared and routed experts): equal
    losses, the same consolidated tensors under the published names (W_pack, per-expert tensors), the published
    config.json."""
    assert_fsdp2_sft_matches_one_process({
        ROW.architecture: write_checkpoint("baichuan-13b", tmp_path / "baichuan-13b"),
        DEEPSEEK_MOE.architecture: write_published_checkpoint(DEEPSEEK_MOE, tmp_path / "deepseek-moe")}, tmp_path)


def test_tensor_parallelism_is_refused_with_one_line(tmp_path):
    """The ALiBi slopes are per head of the whole model; a rank's share of the heads would get the wrong ones."""
    from automodel.distributed.tp import model_tp_plan

    model = load_causal_lm(str(write_checkpoint("baichuan-13b", tmp_path / "published")))
    with pytest.raises(UserError, match="no tensor-parallel plan for BaichuanAlibiLlamaForCausalLM"):
        model_tp_plan(model)


@pytest.mark.parametrize("fields, message", [
    ({"vocab_size": 70000}, "'vocab_size' = 70000 is not supported: an ALiBi Baichuan config"),
    ({"rope_theta": 10000.0}, "'rope_theta' = 10000.0 is not supported"),
    ({"alibi_scaling": {"type": "linear", "factor": 2.0}}, "'alibi_scaling'"),
    ({"tie_word_embeddings": True}, "'tie_word_embeddings' = True is not supported"),
    ({"z_loss_weight": 0.1}, "'z_loss_weight' = 0.1 is not supported"),
    ({"num_key_value_heads": 2}, "'num_key_value_heads' = 2 is not supported"),
    ({"architectures": ["BaiChuanForCausalLM"]}, "'max_position_embeddings' is missing"),
], ids=["vocab", "rope_theta", "alibi_scaling", "tied", "z_loss", "gqa", "7b-without-positions"])
def test_unsupported_13b_field_stops_with_one_line_naming_it(fields, message, tmp_path):
    folder = write_checkpoint("baichuan2-13b", tmp_path / "bad", **fields)
    with pytest.raises(UserError) as err:
        load_causal_lm(str(folder))
    text = str(err.value)
    assert message in text and str(folder) in text and "\n" not in text, text
