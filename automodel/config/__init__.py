"""YAML recipe configs: loading, overrides, interpolation and building objects from `_target_`."""

from automodel.config.instantiate import build, check_targets, parse_section, resolve_target
from automodel.config.loader import (
    apply_overrides,
    did_you_mean,
    interpolate,
    load_config,
    load_unresolved_config,
    parse_overrides,
)
from automodel.config.redact import REDACTED, config_at_rest, is_secret_key, read_run_config, redact
from automodel.config.sections import SECTIONS, check_sections
from automodel.config.trust import TargetPolicy, target_policy

__all__ = ["REDACTED", "SECTIONS", "TargetPolicy", "apply_overrides", "build", "check_sections", "check_targets",
           "config_at_rest", "did_you_mean", "interpolate", "is_secret_key", "load_config", "load_unresolved_config",
           "parse_overrides", "parse_section", "read_run_config", "redact", "resolve_target", "target_policy"]
