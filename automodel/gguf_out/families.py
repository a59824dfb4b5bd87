"""The remote-code families automodel reads itself (automodel/models/families) in GGUF: which export, and how.

automodel reads a published checkpoint of such a family into a transformers NATIVE class: the published config is
translated into the native config (configs.py), and the weights, where their names or fusion differ, convert under
a subclass that only renames the native class (conversions.py). The loaded model is then the native model with the
native config, so the native model_type's rules (architectures.RULES) write it, under the llama.cpp architecture of
that native class, whose graph computes the same math: Aquila, dense DeepSeek, InternLM, InternLM2 and Baichuan-7B /
Baichuan2-7B as llama, Orion as stablelm, MiniCPM as granite, ChatGLM as chatglm. The one change the native rules
lack is Baichuan2's normalised output head (with_norm_head).

A family, or a variant of one, read into automodel's OWN module (a decoder whose math the native class lacks)
is written by rules of that class where it has some (architectures.OWN_CLASS_RULES, rules_families.py: Jais,
DeepSeek-MoE, DeciLM, the ALiBi Baichuan 13B models); the others stop with one line naming the published
architecture and why: the native model_type's rules would write a file llama.cpp runs wrongly. The config is
checked before loading (export_config) and the loaded class again by the writer (check_loaded), since a GGUF base
skips the config check.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch.nn import functional as F

from automodel.errors import UserError

# The classes of automodel/models/families/conversions.py that only rename a native class (their weights converted
# on load): exported through the rules of their config's model_type. The config-only families load into the native
# class itself and need no entry. A class added here must pass tests/test_gguf_export_families.py.
EXPORTED_CLASSES = {"BaichuanLlamaForCausalLM", "InternLM2LlamaForCausalLM", "ChatGLMGlmForCausalLM"}

# automodel's own modules: what their math adds to the native class's, which the native rules would drop.
OWN_MATH = {
    "SolarMistralForCausalLM": "skip connections blended between layers (bskcn_*)",
    "Phi3SmallLlamaForCausalLM": "block-sparse attention, a gegelu MLP and muP scalings",
}


def check_class(name: str, architecture: str) -> None:
    """Stop unless the conversions.py class `name` is exported through its native rules or its own
    (architectures.OWN_CLASS_RULES: Jais, DeepSeek-MoE, DeciLM, the ALiBi Baichuan 13B models)."""
    from automodel.gguf_out.architectures import OWN_CLASS_RULES

    if name in EXPORTED_CLASSES or name in OWN_CLASS_RULES:
        return
    why = OWN_MATH.get(name, "its own modules")
    raise UserError(f"--format gguf: {architecture} has no GGUF export: automodel reads it into its own {name} "
                    f"({why}), which the rules of its native model_type would not write")


def export_config(published: dict[str, Any], source: str, trust_remote_code: bool) -> dict[str, Any]:
    """The config whose rules write the model that loading `published` gives: for a family automodel reads itself,
    the native config (named after the published architecture, for the messages of rules_for); else `published`
    (with remote code trusted, the family's own code is loaded, whose model_type has no rules)."""
    from automodel.models.families import FAMILIES, class_name, native_config

    family = FAMILIES.get(published.get("model_type"))
    if family is None or trust_remote_code:
        return published
    architecture = (published.get("architectures") or [family.model_type])[0]
    if (name := class_name(family, published)) is not None:
        check_class(name, architecture)
    native = native_config(published, source).to_dict()
    return {**native, "architectures": [f"{architecture} (read as {native['model_type']})"]}


def loaded_class(published: dict[str, Any], trust_remote_code: bool) -> str | None:
    """The conversions.py class loading `published` gives (None: a native class, or the family's own code when
    remote code is trusted), which rules_for takes: an own class has export rules of its own."""
    from automodel.models.families import FAMILIES, class_name

    family = FAMILIES.get(published.get("model_type"))
    return None if family is None or trust_remote_code else class_name(family, published)


def check_loaded(model) -> None:
    """The writer's own check: a model of one of automodel's own family modules stops, whatever path loaded it."""
    from automodel.models.families import PUBLISHED_CONFIG
    from automodel.models.families.conversions import CONVERTED

    name = type(model).__name__
    if name in CONVERTED:
        published = getattr(model, PUBLISHED_CONFIG, None) or {}
        check_class(name, (published.get("architectures") or [name])[0])


def named_config(model, config: dict[str, Any]) -> dict[str, Any]:
    """`config` (the loaded model's) named after the published architecture of a family's model, as export_config
    names it, for the messages of rules_for."""
    from automodel.models.families import PUBLISHED_CONFIG

    published = getattr(model, PUBLISHED_CONFIG, None)
    if not published:
        return config
    architecture = (published.get("architectures") or [published["model_type"]])[0]
    return {**config, "architectures": [f"{architecture} (read as {config['model_type']})"]}


def with_norm_head(rules, config: dict[str, Any]):
    """Baichuan2's NormHead (automodel/models/families/baichuan.py) computes logits = h @ normalize(W).T, its rows
    normalised at every call while the stored weight stays as trained: the file holds the head the model computes
    with, rows at unit L2 norm, which llama.cpp's plain output matmul then applies as is."""
    if not config.get("baichuan_norm_head"):
        return rules

    def tensor(name: str, weight, config: dict[str, Any]):
        weight = rules.tensor(name, weight, config)
        return F.normalize(weight, dim=-1) if name == "lm_head.weight" else weight

    return dataclasses.replace(rules, tensor=tensor, follows=f"{rules.follows}, Baichuan2's normalised head")
