"""One typed configuration tree: the single source of defaults.

Defaults are the paper's ImageNet recipe (Siddiqui et al. 2024, section "Recipe"); the CPU-scale recipes in
``configs/`` override what they need. YAML files and ``key=value`` overrides are merged onto the defaults and
validated, so a typo or a bad value fails before any compute starts, naming the key and the allowed values.

``schema`` holds the dataclasses, ``load`` the coercion (recipes, overrides, saved runs, resuming), ``checks`` and
``plan`` the policy (cross-field checks; the scheme's switches resolved once); the first three are importable from
here.
"""

from blockssl.config.checks import check_lr_convention, parse_blocks, parse_projector, validate
from blockssl.config.load import (
    RESUMABLE_KEYS,
    apply_overrides,
    describe_keys,
    diff_configs,
    dump_config,
    from_dict,
    load_config,
    parse_override,
    read_recipe,
    resume_config,
    to_dict,
)
from blockssl.config.schema import (
    Config,
    ConfigError,
    DataConfig,
    DatasetName,
    LossConfig,
    ModelConfig,
    NoiseConfig,
    OnlineProbeConfig,
    ProbeConfig,
    RobustnessConfig,
    TrainConfig,
)

__all__ = [
    "RESUMABLE_KEYS", "Config", "ConfigError", "DataConfig", "DatasetName", "LossConfig", "ModelConfig", "NoiseConfig",
    "OnlineProbeConfig", "ProbeConfig", "RobustnessConfig", "TrainConfig", "apply_overrides", "check_lr_convention",
    "describe_keys", "diff_configs", "dump_config", "from_dict", "load_config", "parse_blocks", "parse_override",
    "parse_projector", "read_recipe", "resume_config", "to_dict", "validate",
]
