"""Checkpoints of remote-code-only families (table rows whose modeling code lives only on the Hub), read into
transformers' native classes with `trust_remote_code` off and written back in their published layout.

Two hooks, nothing else in automodel knows about these families:
- `from_pretrained` (called by automodel.models.loader.load_causal_lm) reads config.json; for a published
  `model_type` listed in FAMILIES it builds the native config from the family's fields (a field it does not
  translate is a one-line error) and loads the weights into the native class;
- `save_pretrained` (called by automodel.checkpoint.hf_writer.write_hf_model) saves, then rewrites config.json back to
  the published one, so the family's own code, vLLM and downstream tools read the output.
Weight names that differ (Baichuan's fused W_pack, InternLM2's names and grouped wqkv, ChatGLM's layout) convert
through transformers' checkpoint conversion mapping (automodel/models/families/conversions.py), which
`save_pretrained` reverses.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from automodel.models.families import configs
from automodel.models.families.fields import PublishedFields
from automodel.models.families.phi3small_config import phi3small

logger = logging.getLogger(__name__)

# The attribute of a loaded model that holds its published config.json (a dict).
PUBLISHED_CONFIG = "automodel_published_config"
SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id")


@dataclass(frozen=True)
class Family:
    model_type: str                                          # published config.json `model_type`
    translate: Callable[[PublishedFields], tuple[str, dict]]  # -> (native model_type, native fields)
    # A class of conversions.py (its own class or weights), or a function of the published config.json that
    # names one (None: the config-only route), for a family whose variants differ (dense vs MoE DeepSeek).
    converted_class: str | Callable[[dict], str | None] | None = None
    vocab_field: str = "vocab_size"                          # the published name of the vocabulary size
    # Buffers the published checkpoints carry that the native class recomputes: read and ignored on load, not
    # written on save (the family's own code recomputes them at init too).
    derived_buffers: tuple[str, ...] = ()


def class_name(family: Family, published: dict[str, Any]) -> str | None:
    """The conversions.py class a published config.json of the family loads into (None: config only)."""
    name = family.converted_class
    return name(published) if callable(name) else name


def model_class(family: Family, published: dict[str, Any]):
    """The class whose `from_pretrained` reads the family's weights."""
    name = class_name(family, published)
    if name is None:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM
    from automodel.models.families.conversions import converted_class

    return converted_class(name)


FAMILIES: dict[str, Family] = {family.model_type: family for family in (
    Family("aquila", configs.aquila),
    Family("baichuan", configs.baichuan, converted_class=configs.baichuan_class),
    Family("chatglm", configs.chatglm, converted_class="ChatGLMGlmForCausalLM", vocab_field="padded_vocab_size",
           derived_buffers=("transformer.rotary_pos_emb.inv_freq",)),
    Family("deepseek", configs.deepseek, converted_class=configs.deepseek_class),
    Family("nemotron-nas", configs.decilm, converted_class="DeciLMLlamaForCausalLM"),
    Family("internlm", configs.internlm),
    Family("internlm2", configs.internlm2, converted_class="InternLM2LlamaForCausalLM"),
    Family("orion", configs.orion),
    Family("minicpm", configs.minicpm),
    Family("phi3small", phi3small, converted_class="Phi3SmallLlamaForCausalLM"),
    Family("solar", configs.solar, converted_class="SolarMistralForCausalLM"),
    Family("jais", configs.jais, converted_class="JaisGPT2LMHeadModel"),
)}


def native_config(published: dict[str, Any], source: str):
    """The transformers config whose model has the same math as the published one."""
    from transformers import AutoConfig

    fields = PublishedFields(published, source)
    native_type, native = FAMILIES[published["model_type"]].translate(fields)
    fields.finish()
    specials = {name: published[name] for name in SPECIAL_TOKENS if name in published}
    return AutoConfig.for_model(native_type, **native, **specials)


def tokenizer_config(source: str, revision: str | None = None):
    """The native config of a checkpoint of a family here, for AutoTokenizer (None: no config.json, or no family).

    AutoTokenizer reads config.json to pick a tokenizer class; a family's published `model_type` is unknown to
    transformers, so it reads the file as a bare PretrainedConfig, which fails on some published configs (Nemotron-NAS's
    Llama 3 rope: 'PreTrainedConfig' object has no attribute 'max_position_embeddings')."""
    from transformers import PretrainedConfig

    try:
        published, _ = PretrainedConfig.get_config_dict(source, revision=revision)
    except OSError:  # a tokenizer-only folder or repo has no config.json: AutoTokenizer needs none either
        return None
    if published.get("model_type") not in FAMILIES:
        return None
    return native_config(published, source)


def meta_config(folder: Path, trust_remote_code: bool, config_overrides: dict[str, Any]):
    """For the meta-device build (automodel/models/build.py): `(native config, published config.json, class)` of a
    checkpoint of a family here (class None: the config-only route, built by transformers' Auto class), and
    `(None, None, None)` for a checkpoint of no family here."""
    from transformers import PretrainedConfig

    published, _ = PretrainedConfig.get_config_dict(str(folder))
    family = FAMILIES.get(published.get("model_type"))
    if family is None or trust_remote_code:
        return None, None, None
    config = with_overrides(native_config(published, str(folder)), family, config_overrides)
    cls = model_class(family, published) if class_name(family, published) is not None else None
    return config, published, cls


def with_overrides(config, family: Family, config_overrides: dict[str, Any]):
    """The native config with the `model` section's overrides; a key it has no field for is an error, as
    transformers' own loading makes it."""
    for name, value in config_overrides.items():
        if not hasattr(config, name):
            raise ValueError(f"{type(config).__name__} (read from {family.model_type}'s config) has no setting "
                             f"'{name}'; remove model.{name}")
        setattr(config, name, value)
    return config


def mark_published(model, published: dict[str, Any]) -> None:
    """Remember the published config.json, which `save_pretrained` writes back."""
    setattr(model, PUBLISHED_CONFIG, published)


def from_pretrained(source: str, load_kwargs: dict[str, Any], config_overrides: dict[str, Any]):
    """`AutoModelForCausalLM.from_pretrained(source, **load_kwargs, **config_overrides)`, except that a checkpoint
    of a family in FAMILIES loads into its native class (unless the user trusts its remote code)."""
    from transformers import AutoModelForCausalLM, PretrainedConfig

    published, _ = PretrainedConfig.get_config_dict(source, revision=load_kwargs.get("revision"))
    family = FAMILIES.get(published.get("model_type"))
    if family is None or load_kwargs.get("trust_remote_code"):
        return AutoModelForCausalLM.from_pretrained(source, **load_kwargs, **config_overrides)
    config = with_overrides(native_config(published, source), family, config_overrides)
    kwargs = {k: v for k, v in load_kwargs.items() if k != "trust_remote_code"}
    model = model_class(family, published).from_pretrained(source, config=config, **kwargs)
    mark_published(model, published)
    logger.info("%s: %s checkpoint read into %s (no remote code)", source, family.model_type,
                type(model).__name__)
    return model


def save_pretrained(model, folder: Path, state_dict: dict | None = None, **save_options) -> None:
    """`model.save_pretrained` in safetensors, then the published config.json back (restore_published_layout).

    PEFT decides whether the vocabulary was resized by reading the base folder's config.json with the native config
    class; a family that names the vocabulary otherwise (ChatGLM's `padded_vocab_size`) would read as resized and
    write the whole embedding into the adapter. automodel never resizes it, so those adapters say so."""
    published = getattr(model, PUBLISHED_CONFIG, None)
    options = dict(save_options)
    if published and hasattr(model, "peft_config") and FAMILIES[published["model_type"]].vocab_field != "vocab_size":
        options["save_embedding_layers"] = False
    model.save_pretrained(folder, safe_serialization=True, state_dict=state_dict, **options)
    restore_published_layout(model, folder)


def restore_published_layout(model, folder: Path) -> None:
    """After `save_pretrained` of a model `from_pretrained` translated: config.json becomes the published one
    again (its `vocab_size` and dtype updated), so the output has the input's layout. Adapter-only folders
    (no config.json) are left alone: their module names are the native ones."""
    published = getattr(model, PUBLISHED_CONFIG, None)
    config_file = Path(folder) / "config.json"
    if published is None or not config_file.is_file():
        return
    saved = json.loads(config_file.read_text())
    restored = {**published, FAMILIES[published["model_type"]].vocab_field: saved["vocab_size"]}
    if "torch_dtype" in published and saved.get("dtype"):
        restored["torch_dtype"] = saved["dtype"]
    config_file.write_text(json.dumps(restored, indent=2) + "\n")
