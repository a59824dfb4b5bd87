"""The supported-models table is one source of truth: it matches the promised table, transformers' classes,
the docs page and what `automodel models` prints."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from automodel.cli.main import main
from automodel.models import registry
from automodel.models.registry import (ARCHITECTURES, BY_NAME, FSDP2_VERIFIED, NOT_YET, PARTLY, TESTED, family_rows,
                                      native_rows, remote_rows)
from automodel.models.table import markdown_page
from tests.conftest import ASSETS, REPO_ROOT

PROMISED_TABLE = ASSETS.parent / "ARCHITECTURES.md"
EXTRA_NATIVE = {"DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM", "Exaone4ForCausalLM"}


def promised_rows() -> dict[str, dict]:
    """Rows of ../shared/ARCHITECTURES.md: architecture -> models, checkpoints, transformers class, model_type."""
    rows = {}
    for line in PROMISED_TABLE.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].startswith("`"):
            arch, models, checkpoints, native, model_type = cells
            rows[arch.strip("`")] = {"models": models, "checkpoints": tuple(c.strip() for c in checkpoints.split(",")),
                                     "class": native.removeprefix("native: ") if native.startswith("native") else None,
                                     "model_type": None if model_type == "-" else model_type}
    return rows


@pytest.mark.skipif(not PROMISED_TABLE.is_file(), reason=f"{PROMISED_TABLE} not present")
def test_registry_holds_every_promised_row_unchanged():
    promised = promised_rows()
    assert len(promised) == 46
    assert set(BY_NAME) == set(promised) | EXTRA_NATIVE
    for name, want in promised.items():
        row = BY_NAME[name]
        got = {"models": row.models, "checkpoints": row.checkpoints, "class": row.native_class,
               "model_type": row.model_type}
        assert got == want, name


def test_every_native_row_names_the_class_transformers_loads_it_with():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    for row in native_rows():
        assert MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(row.model_type) == row.native_class, row.architecture
        assert row.tokenizer and (ASSETS / "tokenizers" / row.tokenizer).is_dir(), row.architecture
        assert row.lora_targets and row.status == TESTED
    remote = [row for row in ARCHITECTURES if row not in native_rows()]
    assert len(remote) == 12 and remote == [r for r in ARCHITECTURES if r in family_rows() or r in remote_rows()]
    assert all(r.status == NOT_YET and r.reason for r in remote_rows())


def test_every_family_row_loads_into_a_native_class_automodel_translates_to():
    """Remote-code rows marked tested: automodel/models/families reads their published model_type into the
    named transformers class (tests/models/test_families.py checks the math)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from automodel.models.families import FAMILIES

    for row in family_rows():
        assert row.model_type is None and row.native_class is None, "transformers has no class of its own"
        assert row.published_type in FAMILIES and row.loads_into in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
        assert row.status == (PARTLY if row.untested_variants else TESTED) and row.route and row.lora_targets
        assert (ASSETS / "tokenizers" / row.tokenizer).is_dir(), row.architecture


def test_docs_page_is_generated_from_the_registry():
    page = (REPO_ROOT / "docs" / "supported_models.md").read_text()
    assert page == markdown_page(), "regenerate: automodel models --markdown > docs/supported_models.md"
    for row in ARCHITECTURES:
        assert f"`{row.architecture}`" in page and row.checkpoints[0] in page


def test_fsdp2_verified_rows_are_native_and_cover_every_kind():
    """The list the FSDP2 test runs and the docs page shows: native rows only, known modes, every family."""
    assert set(FSDP2_VERIFIED) <= {row.architecture for row in registry.tested_rows()}
    assert all(modes and set(modes) <= {"sft", "lora"} for modes in FSDP2_VERIFIED.values())
    assert {BY_NAME[name].kind for name in FSDP2_VERIFIED} == {"dense", "moe", "hybrid", "gpt2-style"}
    assert sum("lora" in modes for modes in FSDP2_VERIFIED.values()) >= 2


def test_runtime_capabilities_name_the_table_s_model_types():
    """automodel/models/capabilities.py holds its own sets (the runtime does not read the docs table); they name only
    model types the table has (or Baichuan-13B's, a family variant), and its MoE types are the table's MoE rows."""
    from automodel.models.capabilities import LAST_LAYER_ROWS_VERIFIED, MOE_TYPES, PADDING_FREE_VERIFIED

    assert MOE_TYPES == {row.model_type for row in ARCHITECTURES if row.kind == "moe"}
    assert PADDING_FREE_VERIFIED <= {row.model_type for row in native_rows()} | {"jais", "baichuan_alibi"}
    assert not LAST_LAYER_ROWS_VERIFIED & MOE_TYPES


def test_models_command_prints_every_row_with_its_status(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for row in ARCHITECTURES:
        line = next(l for l in out.splitlines() if l.startswith(row.architecture[:31]))
        assert re.search(rf"\s{row.status}\s", line) and line.endswith(row.checkpoints[0]), line
    assert main(["models", "--markdown"]) == 0
    assert capsys.readouterr().out == markdown_page()
    assert main(["models", "--bogus"]) == 2
    assert "automodel models: unknown argument '--bogus'" in capsys.readouterr().err


def test_models_command_and_its_help_do_not_import_torch():
    code = ("import sys; from automodel.cli.main import main; main(['models']); main(['models', '--help']); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "usage: automodel models" in done.stdout
