"""Argument parsing and error reporting shared by the entry scripts."""
from __future__ import annotations

import argparse
import math
import os
import sys

from engine.config import ConfigError, check_dist_timeout, help_text, load_config
from engine.training.control import NonFiniteLoss
from engine.checkpoints.files import LayoutError
from engine.checkpoints.lock import LockHeld
from engine.checkpoints.writes import SaveFailed

USER_ERRORS = (ConfigError, LayoutError, FileNotFoundError, NonFiniteLoss, LockHeld, SaveFailed)


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one `error:` line and exit 2, like every other bad input."""

    def error(self, message):
        from engine.distributed import report_once

        report_once(f"error: {self.prog}: {message} (see --help)")
        sys.exit(2)


def number(kind, low=None, high=None, low_open=False):
    """An argparse type: `kind` (int/float) within [low, high] (low excluded with low_open)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if not abs(value) < (2**63 if kind is int else math.inf):  # nan, inf, past what torch holds
            raise argparse.ArgumentTypeError(f"must be a finite {'integer below 2**63' if kind is int else 'number'}, "
                                             f"got {text!r}")
        if (low is not None and (value <= low if low_open else value < low)) or (high is not None and value > high):
            lo = f"> {low}" if low_open else f">= {low}"
            rng = f"{lo} and <= {high}" if low is not None and high is not None else lo if low is not None else f"<= {high}"
            raise argparse.ArgumentTypeError(f"must be {rng}, got {text!r}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def config_parser(description: str) -> argparse.ArgumentParser:
    p = Parser(description=description)
    p.add_argument("--config", help="YAML training config (see configs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, dotted for nested keys (e.g. optimizer.params.lr=1e-4)")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and meaning")
    p.add_argument("--verbose", action="store_true",
                   help="every rank prints its messages (prefixed with its rank) and DeepSpeed's INFO lines show "
                        "(the environment's PPLLM_VERBOSE=1 does the same)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return p


def add_plan_args(p: argparse.ArgumentParser, export: bool = True) -> argparse.ArgumentParser:
    """--dry-run (engine/plan.py) and --export-hf (engine/training/export.py)."""
    p.add_argument("--dry-run", action="store_true",
                   help="validate the config against the world size and model_path's config.json, print the "
                        "per-stage memory/time estimate and exit (nothing is allocated; no launcher needed)")
    p.add_argument("--world-size", type=number(int, 1), default=None,
                   help="world size for --dry-run (default: the launcher's)")
    p.add_argument("--gpu-mem-gib", type=number(float, 0, low_open=True), default=None,
                   help="GPU memory for --dry-run's fit check (default 80)")
    if export:
        p.add_argument("--export-hf", metavar="OUT", default=None,
                       help="after training, write the final checkpoint as an HF model dir to OUT (rerunning "
                            "resumes, then exports; skipped when OUT already holds that checkpoint)")
    return p


def run_or_plan(a, cfg, train_fn, pipeline: bool = True):
    """--dry-run: print the plan; otherwise train (and export with --export-hf)."""
    given = [flag for flag, value in (("--world-size", a.world_size), ("--gpu-mem-gib", a.gpu_mem_gib)) if value is not None]
    if given and not a.dry_run:  # a launch takes its world size from the launcher: the flag would be ignored
        raise ConfigError(f"{given[0]} is a --dry-run option; launch with `deepspeed --num_gpus N` (or add --dry-run)")
    if a.dry_run:
        from engine.distributed import world_size
        from engine.plan import dry_run
        from engine.training.deepspeed_setup import check_deepspeed
        from engine.training.preflight import check_build, check_launch

        check_launch(cfg, pipeline)  # what the launch refuses before training, judged as a launch here
        text = dry_run(cfg, a.world_size if a.world_size is not None else world_size(),
                       80.0 if a.gpu_mem_gib is None else a.gpu_mem_gib,
                       pipeline=pipeline)
        check_deepspeed(cfg, pipeline)  # DeepSpeed's own config classes: what passes here passes at launch
        check_build(cfg, pipeline)
        print(text)
        return None
    from engine.distributed import configure
    from engine.training.export import train_and_export

    check_dist_timeout(cfg)  # used before validate() runs: by the rendezvous
    configure(cfg.dist_timeout_s, cfg.model_topo.process_topology if pipeline else None)
    return train_and_export(cfg, train_fn, getattr(a, "export_hf", None))


def plot_or_argv(argv, script: str) -> list[str]:
    """A training script's `plot <save_path> [--out file.png]` subcommand (redraws loss.png from
    metrics.jsonl: no config, no launcher) runs and exits here; any other argv is returned."""
    from engine.training.metrics import plot_command

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plot"]:
        sys.exit(plot_command(argv[1:], prog=f"python {os.path.basename(script)} plot"))
    return argv


def parse_config(p: argparse.ArgumentParser, argv=None):
    a = p.parse_args(argv)
    if a.help_config:
        print(help_text())
        sys.exit(0)
    if not a.config:
        p.error("--config is required")
    cfg = load_config(a.config, a.set)
    if a.verbose:  # read by engine.training.metrics in this process and, inherited, in what it starts
        os.environ["PPLLM_VERBOSE"] = "1"
    if os.environ.get("RANK", "0") == "0":
        for note in getattr(cfg, "notes", []):  # gdGPT-only keys mapped or dropped
            print(f"note: {note}", file=sys.stderr)
    return a, cfg


def run_script(main) -> None:
    """`main()` as a script's whole process (`if __name__ == "__main__"`); in-process callers
    (tests) call main(argv) directly and keep their interpreter."""
    from engine.distributed import enable_stack_dumps, leave, watch_launcher

    enable_stack_dumps()  # `kill -USR2 <rank>`: where a rank waits
    watch_launcher()  # from the first moment: a rank orphaned while it loads must not train on unattended
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    leave(code)


def user_errors(fn):
    """Run `fn`; a bad input becomes one `error:` line on stderr and exit status 2, a collective
    that waited past dist_timeout_s one line naming the rank, its stage and the operation and exit
    status 1. Whichever rank fails first prints (engine/distributed.py report_once): the others,
    failing later or killed by the launcher meanwhile, add nothing."""
    from engine.distributed import collective_timeout, report_once, reported

    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS + _data_errors() as e:
            report_once(f"error: {e}")
            if getattr(e, "every_rank", False):  # raised by all ranks together (agreed): leave together, so
                from engine.distributed import barrier  # none is killed by the launcher before its clean-up

                barrier()  # (rank 0's run lock is released on the way out)
            sys.exit(2)
        except RuntimeError as e:
            line = collective_timeout(e)
            if line is None and not (_peer_gone(e) and reported()):
                raise  # an internal error keeps its traceback
            if line is not None:  # a peer that printed the run's error and left is no news either
                report_once(line)
            sys.exit(1)
    return wrapped


def _peer_gone(e: RuntimeError) -> bool:
    """gloo/NCCL's error in a collective whose peer process exited."""
    text = str(e).lower()
    return any(s in text for s in ("connection closed by peer", "connection reset by peer", "broken pipe"))


def _data_errors() -> tuple:
    from models import UnsupportedModel

    try:
        from data.samples import SampleError
        from data.templates import TemplateError
        return (SampleError, TemplateError, UnsupportedModel)
    except ImportError:
        return (UnsupportedModel,)
