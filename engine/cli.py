"""Argument parsing and error reporting shared by the entry scripts."""
from __future__ import annotations

import argparse
import os
import sys

from .config import ConfigError, help_text, load_config
from .control import NonFiniteLoss
from .layout import LayoutError

USER_ERRORS = (ConfigError, LayoutError, FileNotFoundError, NonFiniteLoss)


def config_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", help="YAML training config (see configs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, dotted for nested keys (e.g. optimizer.params.lr=1e-4)")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and meaning")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return p


def parse_config(p: argparse.ArgumentParser, argv=None):
    a = p.parse_args(argv)
    if a.help_config:
        print(help_text())
        sys.exit(0)
    if not a.config:
        p.error("--config is required")
    return a, load_config(a.config, a.set)


def user_errors(fn):
    """Run `fn`; a bad input becomes one line on stderr (rank 0 only) and exit status 2."""
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS + _data_errors() as e:
            if os.environ.get("RANK", "0") == "0":
                print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    return wrapped


def _data_errors() -> tuple:
    from models import UnsupportedModel

    try:
        from data.samples import SampleError
        return (SampleError, UnsupportedModel)
    except ImportError:
        return (UnsupportedModel,)
