"""YAML recipe configs: loading, overrides, interpolation and building objects from `_target_`."""

from automodel.config.instantiate import build, parse_section, resolve_target
from automodel.config.loader import apply_overrides, did_you_mean, interpolate, load_config, parse_overrides
from automodel.config.sections import SECTIONS, check_sections

__all__ = ["SECTIONS", "apply_overrides", "build", "check_sections", "did_you_mean", "interpolate", "load_config",
           "parse_overrides", "parse_section", "resolve_target"]
