"""The training configuration: one typed, frozen schema for the YAML file and the command line.

Each section is a frozen dataclass (``cfg.training.lr``, ``cfg.model.anchor_sizes``) whose fields are
the schema: type, default, command-line flags, help and the key's policies live in one place, so that
``--help``, ``--print-config`` and the saved ``config.yaml`` cannot drift apart.

Precedence: built-in defaults < ``--config FILE.yaml`` < flags given on the command line. Every flag of
torchvision's ``references/detection/train.py`` keeps its spelling, casing rules, meaning and default
(our kebab-case spellings stay as aliases). Unknown keys are errors that name the key. All rules across
fields run in one step, :func:`validate`, before any data is read. A config is never changed in place:
:meth:`TrainConfig.replace` returns a new one.

This module is the recipe's one import for the config; the parts live in
  config_schema.py  the sections, :func:`setting` and each key's policies (range, mode, resume, Lightning)
  config_rules.py   value checks, derived values and the rules across keys (:func:`finalize`, :func:`validate`)
  config_cli.py     the command line, the YAML file and ``--print-config`` (:func:`resolve`, :func:`dump`)
"""

from config_cli import build_parser, dump, read_yaml, resolve
from config_rules import (
    auto_class_weight,
    auto_fed_image_counts,
    check_class_agnostic,
    check_tile_keys,
    defaults,
    finalize,
    known_num_classes,
    shapes_spec,
    validate,
)
from config_schema import (
    BY_PATH,
    OPTIONS,
    SECTIONS,
    TORCHVISION_COCO_PATH,
    ConfigError,
    DataConfig,
    DistributedConfig,
    GradientClipConfig,
    ModelConfig,
    Opt,
    TrainConfig,
    TrainingConfig,
    defaults_tree,
    flatten,
    mid_epoch_fixed_paths,
    on_resume,
    set_path,
    setting,
)

__all__ = [
    "BY_PATH",
    "OPTIONS",
    "SECTIONS",
    "TORCHVISION_COCO_PATH",
    "ConfigError",
    "DataConfig",
    "DistributedConfig",
    "GradientClipConfig",
    "ModelConfig",
    "Opt",
    "TrainConfig",
    "TrainingConfig",
    "auto_class_weight",
    "auto_fed_image_counts",
    "build_parser",
    "check_class_agnostic",
    "check_tile_keys",
    "defaults",
    "defaults_tree",
    "dump",
    "finalize",
    "flatten",
    "known_num_classes",
    "mid_epoch_fixed_paths",
    "on_resume",
    "read_yaml",
    "resolve",
    "set_path",
    "setting",
    "shapes_spec",
    "validate",
]
