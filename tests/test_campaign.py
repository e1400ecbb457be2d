from __future__ import annotations

from pathlib import Path

import pytest

from amdflow.campaign import (
    EXAMPLE_CAMPAIGN,
    REFERENCE_PROTOTYPES,
    campaign_from_dict,
    load_campaign,
)
from amdflow.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "campaign.yaml"
    path.write_text(text)
    return path


def test_example_is_valid_and_resolves_paths(tmp_path):
    cfg = load_campaign(write(tmp_path, EXAMPLE_CAMPAIGN))
    assert cfg.elements == ["Ce", "Fe", "In"]
    assert cfg.chemsys == "Ce-Fe-In"
    assert cfg.output_dir == (tmp_path / "CeFeIn").resolve()
    assert cfg.relax.reference_prototypes == [REFERENCE_PROTOTYPES[k] for k in ("fcc", "bcc", "hcp")]
    assert cfg.screen.max_formation_energy_per_atom == 0.0


def test_unknown_key_is_named(tmp_path):
    text = EXAMPLE_CAMPAIGN.replace("  ltol: 0.2", "  ltol: 0.2\n  ltoll: 0.3")
    with pytest.raises(ConfigError) as info:
        load_campaign(write(tmp_path, text))
    msg = str(info.value)
    assert "unknown key 'dedup.ltoll'" in msg and "\n" not in msg


def test_wrong_type_is_named(tmp_path):
    text = EXAMPLE_CAMPAIGN.replace("max_steps: 300", "max_steps: many")
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
