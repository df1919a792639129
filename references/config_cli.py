"""The training config's command line: torchvision's flags (and ours) read from the schema, the YAML
file, ``--print-config``. Precedence: built-in defaults < ``--config FILE.yaml`` < flags given on the
command line."""

from __future__ import annotations

import argparse
import os
from typing import Any, Dict, Optional, Sequence, Tuple

import yaml

from tv_lossfix import LossConfig
from tv_lossfix._suggest import did_you_mean
from tv_lossfix._yaml import NotUTF8Error, load_yaml_file

from config_rules import auto_class_weight, auto_fed_image_counts, finalize
from config_schema import BY_PATH, OPTIONS, SECTIONS, ConfigError, Opt, TrainConfig, defaults_tree, set_path


def _merge_yaml(base: Dict[str, Any], data: Any, prefix: str, source: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix or 'the top level'} must be a mapping, got {type(data).__name__}")
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        allowed = SECTIONS.get(prefix, set())
        if key not in allowed:
            raise ConfigError(
                f"{source}: unknown key {path!r}{did_you_mean(key, allowed, prefix + '.' if prefix else '')} "
                f"(allowed under {prefix or 'the top level'}: {', '.join(sorted(allowed))})"
            )
        if path in BY_PATH:
            set_path(base, path, value)
        else:
            _merge_yaml(base, value, path, source)


def _lower(text: str) -> str:
    return text.lower()


class _HelpFormatter(argparse.HelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=36, width=110)


def _add_flag(p, o: Opt) -> None:
    dest = o.path.replace(".", "__")
    shown = o.default if o.shown is None else o.shown
    default_text = "" if o.kind is bool or "default:" in o.help else f" (default: {shown})"
    if o.kind is bool:
        on_help = o.help + (" (default)" if o.negative and o.default else "")
        p.add_argument(*o.flags, dest=dest, action="store_true", default=argparse.SUPPRESS, help=on_help)
        if o.negative:
            flag, off_help = o.negative
            p.add_argument(flag, dest=dest, action="store_false", default=argparse.SUPPRESS, help=off_help)
    elif o.kind is list:
        p.add_argument(
            *o.flags, dest=dest, nargs="+", type=int, default=argparse.SUPPRESS, metavar="N", help=o.help + default_text
        )
    else:
        conv = _lower if o.lower else {int: int, float: float, str: str}[o.kind]
        p.add_argument(
            *o.flags,
            dest=dest,
            type=conv,
            choices=o.choices,
            default=argparse.SUPPRESS,
            metavar=None if o.choices else o.path.rsplit(".", 1)[-1].upper(),
            help=o.help + default_text,
        )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="references/train.py",
        description="Train / evaluate a torchvision two-stage detector with tv_lossfix's configurable losses. "
        "Flags override the --config file, which overrides the defaults shown.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--config", default=None, metavar="FILE.yaml", help="YAML config (flags given here override it)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    groups = {s: p.add_argument_group(f"{s} (YAML section {s}:)") for s in ("data", "model", "training", "distributed")}
    for o in OPTIONS:
        if o.flags:
            _add_flag(groups[o.path.split(".")[0]], o)
    return p


def read_yaml(path: str, what: str = "--config") -> Any:
    """A YAML file through tv_lossfix's reader (``1e-3`` is a number, a repeated key an error)."""
    if not os.path.isfile(path):
        raise ConfigError(f"{what}: file not found: {path}")
    try:
        return load_yaml_file(path) or {}
    except NotUTF8Error as e:
        raise ConfigError(f"{what} {path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except OSError as e:
        raise ConfigError(f"{what} {path}: cannot read it: {e.strerror or e}") from None


def resolve(
    argv: Optional[Sequence[str]] = None, reads: Optional[Sequence[str]] = None
) -> Tuple[TrainConfig, LossConfig, bool]:
    """Parse the command line, merge defaults < YAML < flags, validate.

    ``reads``: the data files the caller reads (e.g. ("train_ann",) for analyze_data.py); by default
    those a run needs. Returns (config, loss config, whether --print-config was given).
    """
    args = build_parser().parse_args(argv)
    tree = defaults_tree()
    if args.config:
        _merge_yaml(tree, read_yaml(args.config), "", args.config)
    for dest, value in vars(args).items():
        if dest not in ("config", "print_config"):
            set_path(tree, dest.replace("__", "."), value)
    cfg, loss_cfg = finalize(tree, source=args.config or "config", reads=reads)
    return cfg, loss_cfg, args.print_config


# -- writing ------------------------------------------------------------------------------------------
def dump(cfg: TrainConfig, loss_cfg: LossConfig) -> str:
    """The resolved config as YAML, with the effective loss settings spelled out."""
    model = {"rpn_head": loss_cfg.rpn_head.to_dict(), "roi_head": loss_cfg.roi_head.to_dict()}
    if auto_class_weight(cfg.model):  # not resolved yet (train.py rewrites config.yaml with the list)
        model["roi_head"]["class_weight"] = "auto"
    if auto_fed_image_counts(cfg.model):
        model["roi_head"]["fed_image_counts"] = "auto"
    model.update(loss_preset=None, preset=None)  # folded into the explicit values above
    out = cfg.to_dict()
    out["model"].update(model)
    return yaml.safe_dump(out, sort_keys=False)
