"""The command line of the tools: ``default_argument_parser`` and ``default_setup`` (output folder, logs,
config dump, seeds), with the checks that keep a command from overwriting an earlier run's work.

detectron2 has these in ``engine/defaults.py``; they are imported from :mod:`trainkit.engine.defaults` (and
:mod:`trainkit.engine`) as there. They live here because they are about the command line, not about turning
a config into objects.
"""
import argparse
import logging
import os
from typing import Any, Optional

import torch

from trainkit.config import CfgNode
from trainkit.config.checks import check_config_values
from trainkit.utils import comm
from trainkit.utils.env import collect_env_info, seed_all_rng
from trainkit.utils.logger import setup_logger
from trainkit.utils.output_dir import LOCK_FILE, lock_output_dir

__all__ = ["default_argument_parser", "default_setup"]

logger = logging.getLogger(__name__)


class _ArgumentParser(argparse.ArgumentParser):
    """argparse reads a flag that comes after the ``KEY VALUE`` overrides as one more override; say so."""

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        parsed, extra = super().parse_known_args(args, namespace)
        flags = [o for o in getattr(parsed, "opts", None) or [] if isinstance(o, str) and o.startswith("--")]
        if flags:
            self.error(
                f"{flags[0]} comes after the KEY VALUE config overrides, where it would be read as a config key. Move "
                f"it before them, e.g. --config-file FILE {flags[0]} SOLVER.MAX_ITER 100."
            )
        return parsed, extra


def default_argument_parser(epilog: Optional[str] = None) -> argparse.ArgumentParser:
    """The command-line arguments of ``tools/train_net.py``: config file, resume, eval-only, processes.

    Trailing ``KEY VALUE`` pairs override config options, e.g. ``SOLVER.MAX_ITER 100``.
    """
    parser = _ArgumentParser(
        epilog=epilog
        or "Examples:\n  Train:    %(prog)s --config-file configs/digits/mlp.yaml\n"
        "  Resume:   %(prog)s --config-file configs/digits/mlp.yaml --resume\n"
        "  Evaluate: %(prog)s --config-file configs/digits/mlp.yaml --eval-only MODEL.WEIGHTS output/model_final.pth\n"
        "  2 procs:  %(prog)s --config-file configs/digits/mlp.yaml --num-gpus 2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", default="", metavar="FILE", help="path to the config file")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the last checkpoint in OUTPUT_DIR (MODEL.WEIGHTS is ignored when one exists)",
    )
    parser.add_argument("--eval-only", action="store_true", help="evaluate MODEL.WEIGHTS and exit")
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="with --eval-only: evaluate the model as initialised, without MODEL.WEIGHTS (a baseline)",
    )
    parser.add_argument(
        "--start-over",
        action="store_true",
        help="train from iteration 0 in an OUTPUT_DIR that holds an earlier run's checkpoints; what is there "
        "moves to OUTPUT_DIR/earlier_run_N",
    )
    parser.add_argument(
        "--num-gpus", type=int, default=1, help="processes per machine (one per GPU; CPU processes without CUDA)"
    )
    parser.add_argument("--num-machines", type=int, default=1, help="total number of machines")
    parser.add_argument("--machine-rank", type=int, default=0, help="rank of this machine (0 is the main one)")
    parser.add_argument(
        "--dist-url",
        default="auto",
        help="URL where the processes meet, e.g. tcp://10.0.0.1:29500 (machine 0's address); "
        "'auto' picks a free local port (one machine only)",
    )
    parser.add_argument(
        "opts",
        default=None,
        nargs=argparse.REMAINDER,
        help="config overrides as space-separated KEY VALUE pairs at the end, e.g. SOLVER.MAX_ITER 100",
    )
    return parser


def default_setup(cfg: CfgNode, args: argparse.Namespace) -> None:
    """The usual start of a run: output folder, logging to console and file, environment info, config dump,
    seeds.

    Seeds every RNG with ``cfg.SEED + rank`` (a fresh random seed when ``SEED`` is negative; it is logged).
    """
    check_config_values(cfg)
    output_dir = cfg.OUTPUT_DIR
    rank = comm.get_rank()
    if comm.is_main_process() and output_dir:
        # Before anything is written there: a second run into the folder of a live one stops here, with an
        # error naming the folder and the PID holding it. Held until this process ends.
        lock_output_dir(output_dir)
        _check_output_dir_for_this_run(cfg, args)
    comm.synchronize()
    setup_logger(output_dir or None, distributed_rank=rank, name="trainkit")
    logger.info("Rank of current process: %d. World size: %d", rank, comm.get_world_size())
    logger.info("Environment info:\n%s", collect_env_info())
    logger.info("Command line arguments: %s", args)
    if getattr(args, "config_file", ""):
        logger.info("Config file %s", args.config_file)
    if comm.is_main_process() and output_dir:
        path = cfg.dump_to(output_dir, _config_file_name(cfg, args))
        logger.info("Full config saved to %s", path)
    seed = seed_all_rng(None if cfg.SEED < 0 else cfg.SEED + rank)
    logger.info("Seeded the RNGs of rank %d with %d", rank, seed)
    if not getattr(args, "eval_only", False):
        torch.backends.cudnn.benchmark = cfg.CUDNN_BENCHMARK


def _check_output_dir_for_this_run(cfg: CfgNode, args: argparse.Namespace) -> None:
    # The command-line mistakes that would silently lose work: a fresh run over an earlier run's checkpoints,
    # and an evaluation of random weights. Only for the flags of default_argument_parser: a script that builds
    # its own Namespace without them says nothing about resuming.
    if not hasattr(args, "resume"):
        return
    tag = os.path.join(cfg.OUTPUT_DIR, "last_checkpoint")
    resume, eval_only = args.resume, getattr(args, "eval_only", False)
    if eval_only:
        has_weights = bool(cfg.MODEL.WEIGHTS) or (resume and os.path.exists(tag))
        if not has_weights and not getattr(args, "random_weights", False):
            raise ValueError(
                "--eval-only needs weights to evaluate: give MODEL.WEIGHTS path/to/model.pth (at the end of the "
                f"command), or --resume to evaluate the last checkpoint in OUTPUT_DIR={cfg.OUTPUT_DIR!r}, or "
                "--random-weights to evaluate the untrained model on purpose."
            )
        return
    if resume or not os.path.exists(tag):
        return
    if not getattr(args, "start_over", False):
        with open(tag, "rb") as f:
            named = f.read(200).decode("utf-8", "replace").strip()
        raise FileExistsError(
            f"OUTPUT_DIR {cfg.OUTPUT_DIR!r} holds the checkpoints of an earlier run ({tag} names {named!r}); a fresh "
            "run would overwrite them. Continue that run with --resume, start over with --start-over (what is there "
            "moves to OUTPUT_DIR/earlier_run_N), or give this run another OUTPUT_DIR."
        )
    n = 1
    while os.path.exists(os.path.join(cfg.OUTPUT_DIR, f"earlier_run_{n}")):
        n += 1
    keep = os.path.join(cfg.OUTPUT_DIR, f"earlier_run_{n}")
    os.makedirs(keep)
    for name in os.listdir(cfg.OUTPUT_DIR):
        if name != LOCK_FILE and not name.startswith("earlier_run_"):
            os.replace(os.path.join(cfg.OUTPUT_DIR, name), os.path.join(keep, name))
    logger.warning("--start-over: moved what the earlier run left in %s to %s", cfg.OUTPUT_DIR, keep)


def _config_file_name(cfg: CfgNode, args: argparse.Namespace) -> str:
    # A resumed run keeps the config.yaml of the run it continues; a changed config goes next to it.
    old = os.path.join(cfg.OUTPUT_DIR, "config.yaml")
    if not getattr(args, "resume", False) or not os.path.exists(old):
        return "config.yaml"
    with open(old) as f:
        if f.read() == cfg.dump():
            return "config.yaml"
    n = 1
    while os.path.exists(os.path.join(cfg.OUTPUT_DIR, f"config.resume_{n}.yaml")):
        n += 1
    return f"config.resume_{n}.yaml"
