from __future__ import annotations

from pathlib import Path

import pytest

from amdflow.campaign import (
    EXAMPLE_CAMPAIGN,
    campaign_from_dict,
    load_campaign,
)
from amdflow.errors import AmdflowError, ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "campaign.yaml"
    path.write_text(text)
    return path


def test_example_is_valid_and_resolves_paths(tmp_path):
    cfg = load_campaign(write(tmp_path, EXAMPLE_CAMPAIGN))
    assert cfg.elements == ["Ce", "Fe", "In"]
    assert cfg.chemsys == "Ce-Fe-In"
    assert cfg.output_dir == (tmp_path / "CeFeIn").resolve()
    assert cfg.relax.reference_ground_state and cfg.relax.reference_prototypes == []  # MP's ground states, no extras
    assert cfg.relax.reference_structures() == ["ground_state"]
    assert (cfg.screen.mode, cfg.screen.top_k, cfg.screen.max_formation_energy_per_atom) == ("top_k", 3, 1.0)  # recall-first
    assert cfg.funnel.max_e_above_hull == 0.05


def test_unknown_key_is_named(tmp_path):
    text = EXAMPLE_CAMPAIGN.replace("  ltol: 0.2", "  ltol: 0.2\n  ltoll: 0.3")
    with pytest.raises(ConfigError) as info:
        load_campaign(write(tmp_path, text))
    msg = str(info.value)
    assert "unknown key 'dedup.ltoll'" in msg and "\n" not in msg


def test_wrong_type_is_named(tmp_path):
    text = EXAMPLE_CAMPAIGN.replace("max_steps: 300\n  relax_cell: true\n  reference_ground_state", "max_steps: many\n  relax_cell: true\n  reference_ground_state")
    assert text != EXAMPLE_CAMPAIGN
    with pytest.raises(ConfigError, match=r"key 'relax.max_steps'.*'many'"):
        load_campaign(write(tmp_path, text))


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"elements": ["Fe"]}, "elements"),
        ({"elements": ["Fe", "Xx"]}, "unknown element 'Xx'"),
        ({"elements": ["Fe", "Fe"]}, "repeat"),
        ({"name": "../evil"}, "key 'name'"),
        ({"screen": {"max_formation_energy_per_atom": 1e6}}, "max_formation_energy_per_atom"),
        ({"analyze": {"promising_e_above_hull": -1}}, "promising_e_above_hull"),
        ({"templates": [{"source": "zip"}]}, "templates.0"),
        ({"relax": {"engine": "vasp6"}}, "relax.engine"),
    ],
)
def test_bad_values(change, pattern):
    base = {"name": "x", "elements": ["Fe", "Al"], "templates": [{"source": "aflow"}]}
    with pytest.raises(ConfigError, match=pattern):
        campaign_from_dict({**base, **change})


def test_missing_key_and_yaml_syntax(tmp_path):
    with pytest.raises(ConfigError, match="missing key 'templates'"):
        campaign_from_dict({"name": "x", "elements": ["Fe", "Al"]})
    with pytest.raises(ConfigError, match="YAML syntax error at line 3"):
        load_campaign(write(tmp_path, "name: x\nelements: [Fe, Al\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_campaign(tmp_path / "nope.yaml")


def test_config_hash_ignores_output_dir_but_not_science():
    base = {"name": "x", "elements": ["Fe", "Al"], "templates": [{"source": "aflow"}]}
    a = campaign_from_dict({**base, "output_dir": "/tmp/a"})
    b = campaign_from_dict({**base, "output_dir": "/tmp/b"})
    c = campaign_from_dict({**base, "screen": {"max_formation_energy_per_atom": -0.2}})
    assert a.config_hash() == b.config_hash() != c.config_hash()


# ---------------------------------------------------------------- defaults are validated like written values
_REQUIRED = {  # the least each model needs to be built; every other field takes its default
    "CampaignConfig": {"name": "x", "elements": ["Al", "Ni"], "templates": [{"source": "aflow"}]},
    "AflowTemplates": {"source": "aflow"},
    "FolderTemplates": {"source": "folder", "path": "t"},
    "MPTemplates": {"source": "mp", "chemsys": ["Al-Ni"]},
    "RandomTemplates": {"source": "random"},
    "KnownPhasesConfig": {"source": "folder", "path": "k"},
    "RoundsConfig": {"size": 5},
}


def _models() -> list[type]:
    """Every pydantic model of the campaign file (walked from CampaignConfig's fields) and the settings."""
    import typing

    from pydantic import BaseModel

    from amdflow.campaign import CampaignConfig
    from amdflow.settings import AmdflowSettings

    seen: list[type] = []

    def walk(tp: object) -> None:
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if tp in seen:
                return
            seen.append(tp)
            for f in tp.model_fields.values():
                walk(f.annotation)
        for arg in typing.get_args(tp):
            walk(arg)

    walk(CampaignConfig)
    return [*seen, AmdflowSettings]


def test_every_model_validates_its_defaults():
    models = _models()
    names = {m.__name__ for m in models}
    assert {"CampaignConfig", "RelaxConfig", "VaspConfig", "Cp2kConfig", "GenerateConfig", "ScreenConfig",
            "KnownPhasesConfig", "AnalyzeConfig", "AflowTemplates", "AmdflowSettings"} <= names
    for model in models:
        assert model.model_config.get("validate_default") is True, f"{model.__name__}: defaults skip the validators"


def test_a_default_equals_the_same_value_written_for_every_validated_field():
    """For every field with a validator: omitting it gives what writing its default explicitly gives
    (an earlier relax.reference_prototypes default, [fcc, bcc, hcp], became AFLOW labels only when written)."""
    checked = []
    for model in _models():
        validated = {name for dec in model.__pydantic_decorators__.field_validators.values() for name in dec.info.fields}
        base = _REQUIRED.get(model.__name__, {})
        for name in sorted(validated):
            field = model.model_fields[name]
            if field.is_required():
                continue
            raw = field.get_default(call_default_factory=True)
            omitted = getattr(model.model_validate(base), name)
            written = getattr(model.model_validate({**base, name: raw}), name)
            assert omitted == written, f"{model.__name__}.{name}: default {raw!r} gives {omitted!r}, written {written!r}"
            checked.append(f"{model.__name__}.{name}")
    assert {"RelaxConfig.reference_prototypes", "GenerateConfig.lattice_scales", "GenerateConfig.exclude_elements",
            "VaspConfig.handlers", "VaspConfig.incar", "AmdflowSettings.launchpad_file"} <= set(checked), checked


def test_short_reference_prototypes_become_aflow_labels_that_build():
    cfg = campaign_from_dict({**_REQUIRED["CampaignConfig"], "relax": {"reference_prototypes": ["fcc", "bcc", "hcp"]}})
    assert cfg.relax.reference_prototypes == ["A_cF4_225_a", "A_cI2_229_a", "A_hP2_194_c"]
    assert cfg.relax.reference_structures() == ["ground_state", "A_cF4_225_a", "A_cI2_229_a", "A_hP2_194_c"]
    from amdflow.stages import reference_structure

    for label in cfg.relax.reference_structures():  # each one builds (the stage's own lookup)
        assert reference_structure("Al", label).composition.reduced_formula == "Al"


def test_no_reference_at_all_is_a_config_error():
    with pytest.raises(ConfigError, match="no elemental reference"):
        campaign_from_dict({**_REQUIRED["CampaignConfig"], "relax": {"reference_ground_state": False}})


def test_init_file_and_a_file_of_only_the_required_keys_give_the_same_config(tmp_path):
    """`amdflow init` writes every default: keeping only its required keys changes nothing, hash included."""
    import yaml

    full = load_campaign(write(tmp_path, EXAMPLE_CAMPAIGN))
    data = yaml.safe_load(EXAMPLE_CAMPAIGN)
    minimal = {k: data[k] for k in ("name", "elements", "templates")}
    (tmp_path / "minimal.yaml").write_text(yaml.safe_dump(minimal))
    short = load_campaign(tmp_path / "minimal.yaml")
    assert short.model_dump(mode="json") == full.model_dump(mode="json")
    assert short.config_hash() == full.config_hash()
    assert set(data) - set(minimal) == {"generate", "screen", "dedup", "funnel", "relax", "analyze"}  # what was left out


@pytest.mark.parametrize(("value", "says"), [
    ("fcx", "'fcx' is neither a short name (fcc, bcc, hcp, diamond, sc) nor a one-element label of pymatgen's AFLOW "
            "prototype library (`amdflow prototypes --elements 1` lists them)"),
    ("AB_cP2_221_b_a", "'AB_cP2_221_b_a' is an AFLOW prototype of more than one element"),
])
def test_bad_reference_prototype_names_what_was_looked_up_and_where_names_come_from(value, says):
    with pytest.raises(ConfigError) as info:
        campaign_from_dict({**_REQUIRED["CampaignConfig"], "relax": {"reference_prototypes": ["fcc", value]}})
    msg = str(info.value)
    assert "relax.reference_prototypes" in msg and says in msg
    assert "'fcc'" not in msg  # the valid value beside it is not what is named


def test_reference_prototype_names_are_normalised_and_deduplicated():
    cfg = campaign_from_dict({**_REQUIRED["CampaignConfig"], "relax": {"reference_prototypes": ["fcc", "A_cF4_225_a", "A_tI2_139_a#2"]}})
    assert cfg.relax.reference_prototypes == ["A_cF4_225_a", "A_tI2_139_a#2"]


def test_a_stored_campaign_of_unnormalised_defaults_is_the_same_campaign(db):
    """A campaign stored by an amdflow that left defaults unnormalised ('fcc'): `amdflow add` of the same file
    is not 'different settings'; the stored config takes today's form; a stored reference Firework's 'fcc' still builds."""
    from amdflow.ops import register_campaign
    from amdflow.stages import campaign_doc, reference_structure

    extras = {"relax": {"reference_prototypes": ["fcc", "bcc", "hcp"]}}
    cfg = campaign_from_dict({**_REQUIRED["CampaignConfig"], **extras})
    old = campaign_doc(cfg).to_mongo()
    old["config"]["relax"]["reference_prototypes"] = ["fcc", "bcc", "hcp"]
    old["config_hash"] = "0" * 64  # what the old code hashed (its own, different value)
    db.campaigns.insert_one(old)
    stored = register_campaign(db, cfg)
    assert stored["config_hash"] == cfg.config_hash()
    assert stored["config"]["relax"]["reference_prototypes"] == ["A_cF4_225_a", "A_cI2_229_a", "A_hP2_194_c"]
    assert reference_structure("Ni", "fcc").composition.reduced_formula == "Ni"
    changed = campaign_from_dict({**_REQUIRED["CampaignConfig"], **extras, "dedup": {"ltol": 0.3}})
    with pytest.raises(AmdflowError, match="exists with different settings"):
        register_campaign(db, changed)


def test_screen_is_recall_first_with_the_funnel_and_exa_amds_threshold_without():
    """With the funnel on (the default) CGCNN keeps the 3 lowest of each formula up to +1 eV/atom; with
    funnel: none it is the last filter before the final relax, and its unset fields take exa-AMD's 0.0 cut."""
    base = {"name": "t", "elements": ["Al", "Ni"], "templates": [{"source": "aflow", "prototypes": ["AB_cP2_221_b_a"]}]}
    on = campaign_from_dict(base).screen
    assert (on.mode, on.top_k, on.max_formation_energy_per_atom) == ("top_k", 3, 1.0)
    off = campaign_from_dict({**base, "funnel": {"engine": "none"}}).screen
    assert (off.mode, off.max_formation_energy_per_atom) == ("threshold", 0.0)
    chosen = campaign_from_dict({**base, "funnel": {"engine": "none"}, "screen": {"mode": "top_k", "top_k": 2}}).screen
    assert (chosen.mode, chosen.top_k, chosen.max_formation_energy_per_atom) == ("top_k", 2, 0.0)  # what was written stays
    stored = campaign_from_dict({**base, "funnel": {"engine": "none"}, "screen": on.model_dump()}).screen
    assert stored.mode == "top_k" and stored.max_formation_energy_per_atom == 1.0  # a stored (complete) config is kept as is
