"""`harness <stage>`: thin entry points; each parses paths + config and calls one function.

    harness config show model.spin.use_meta_judge=true model.spin.meta_judge_pcnt=0.1
"""

from __future__ import annotations

import argparse
import sys

from harness import config as C
from harness.io import DataError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default="params.yaml",
                   help="params file (default: params.yaml; 'none' for the built-in defaults)")
    p.add_argument("overrides", nargs="*", help="NeMo/Hydra overrides: key=value, +key=value, ++key=value")


def load_config(args) -> C.Config:
    path = None if args.config in ("none", "") else args.config
    return C.load(path, args.overrides, warn=lambda m: print(m, file=sys.stderr))


def cmd_config_show(args) -> int:
    print(C.dump(load_config(args)), end="")
    return 0


def cmd_config_keys(args) -> int:
    from harness.config_keys import markdown_table

    print(markdown_table())
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="harness", description="Self-Rewarding / Meta-Rewarding alignment harness")
    sub = ap.add_subparsers(dest="command", required=True, metavar="<stage>")
    cfg = sub.add_parser("config", help="inspect the resolved configuration")
    cfg_sub = cfg.add_subparsers(dest="action", required=True)
    show = cfg_sub.add_parser("show", help="print the resolved config (params file + overrides) as YAML")
    _add_config_args(show)
    show.set_defaults(func=cmd_config_show)
    cfg_sub.add_parser("keys", help="print every config key with its meaning and default (README's table)"
                       ).set_defaults(func=cmd_config_keys)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (C.ConfigError, DataError) as e:
        print(f"harness: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
