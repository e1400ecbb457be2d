"""One settings object for amdflow, read when called (never at import).

Sources, highest priority first: keyword arguments, ``AMDFLOW_*`` environment
variables, a YAML file (``AMDFLOW_CONFIG_FILE``, else ``~/.amdflow.yaml`` when it
exists), then the defaults below. Unknown keys are an error.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from amdflow.errors import ConfigError

DEFAULT_CONFIG_FILE = Path("~/.amdflow.yaml")


class _YamlSource(PydanticBaseSettingsSource):
    """Reads the optional settings YAML file with ``yaml.safe_load``."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path_str = os.environ.get("AMDFLOW_CONFIG_FILE")
        path = Path(path_str).expanduser() if path_str else DEFAULT_CONFIG_FILE.expanduser()
        if not path.is_file():
            if path_str:
                raise ConfigError(
                    f"settings file {path} (AMDFLOW_CONFIG_FILE) does not exist: "
                    "create it or unset AMDFLOW_CONFIG_FILE"
                )
            return {}
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"settings file {path} is not valid YAML: {err}".replace("\n", " ")) from err
        if not isinstance(data, dict):
            raise ConfigError(f"settings file {path} must hold a mapping of settings, not {type(data).__name__}")
        return data


class AmdflowSettings(BaseSettings):
    """Machine- and site-level settings (campaign science lives in the campaign file)."""

    model_config = SettingsConfigDict(
        env_prefix="AMDFLOW_", extra="forbid", validate_assignment=True, validate_default=True
    )  # validate_default: defaults pass the validators as written values do

    launchpad_file: Path | None = Field(
        None,
        description="LaunchPad YAML of a MongoDB server (e.g. fw_configs/my_launchpad.yaml). "
        "Unset: the embedded single-process store inside the campaign folder.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Torch device for CGCNN and CHGNet; auto picks cuda when available."
    )
    torch_threads: int | None = Field(
        None, ge=1, description="Torch intra-op threads (default: torch's own choice)."
    )
    predict_batch_size: int = Field(256, ge=1, description="Structures per CGCNN forward pass.")
    dedup_batch_size: int = Field(1000, ge=1, description="Dedup Fireworks checked out and decided together (`amdflow run`, "
                                  "`amdflow rocket --stage dedup`).")
    funnel_batch_size: int = Field(64, ge=1, description="Funnel Fireworks relaxed together in one batch (`amdflow run`).")
    funnel_workers: int | None = Field(None, ge=1, description="Processes for a funnel potential without a batched path "
                                       "(CHGNet on CPU); default: the CPU count, at most 8.")
    funnel_max_atoms: int | None = Field(None, ge=8, description="Atoms in one batched forward pass of the funnel's "
                                         "potential (torch-sim); default 512 on CPU, 20000 on a GPU.")
    rocket_log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        "WARNING", description="FireWorks log level on the terminal during `amdflow run`."
    )
    progress: bool = Field(True, description="Show progress bars.")
    generate_workers: int | None = Field(
        None, ge=1, description="Processes for candidate generation (default: the CPU count, at most 8)."
    )
    mp_api_key: str | None = Field(None, description="Materials Project API key (template source 'mp').", repr=False)
    vasp_cmd: str | None = Field(None, description="VASP command (e.g. 'srun vasp_std'); a FWorker's env vasp_cmd takes precedence.")
    vasp_scratch_dir: str | None = Field(None, description="Scratch folder for Custodian (a FWorker's env scratch_dir takes precedence).")
    cp2k_cmd: str | None = Field(None, description="CP2K command (default: cp2k.psmp on PATH); a FWorker's env cp2k_cmd takes precedence.")
    custodian_poll_s: float = Field(10.0, gt=0, le=600, description="Seconds between Custodian's checks of a running job.")
    vasp_potcar_spec: bool = Field(False, description="Write POTCAR.spec (symbols) instead of POTCARs: for the fake VASP in tests only.")

    @field_validator("launchpad_file")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _YamlSource(settings_cls))


def get_settings(**overrides: Any) -> AmdflowSettings:
    """Read the settings now (environment and YAML file), with optional overrides."""
    try:
        return AmdflowSettings(**overrides)
    except ValidationError as err:
        from amdflow.campaign import format_validation_error

        raise ConfigError(format_validation_error(err, "settings")) from None


def resolve_device(settings: AmdflowSettings) -> str:
    """The torch device string the settings ask for."""
    if settings.device != "auto":
        return settings.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
