#!/usr/bin/env python
"""Train (or evaluate) a model from a config file with DefaultTrainer.

    python tools/train_net.py --config-file configs/digits/mlp.yaml
    python tools/train_net.py --config-file configs/digits/mlp.yaml --resume
    python tools/train_net.py --config-file configs/digits/mlp.yaml --eval-only MODEL.WEIGHTS output/digits_mlp/model_final.pth
    python tools/train_net.py --config-file configs/digits/mlp.yaml --num-gpus 2      # 2 processes (gloo on CPU)

Trailing KEY VALUE pairs override the config, e.g. ``SOLVER.MAX_ITER 100 OUTPUT_DIR /tmp/run``.
"""
import logging
from datetime import timedelta

from trainkit.checkpoint import Checkpointer
from trainkit.config import get_cfg
from trainkit.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from trainkit.utils import comm

logger = logging.getLogger("trainkit.tools.train_net")


def load_config(args):
    """The config: defaults, then the file, then the command-line overrides."""
    cfg = get_cfg()
    if args.config_file:
        cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    return cfg


def setup(args):
    """The config, then the usual setup (output folder, logs, seeds)."""
    cfg = load_config(args)
    default_setup(cfg, args)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = DefaultTrainer.build_model(cfg)
        Checkpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        results = DefaultTrainer.test(cfg, model)
        if comm.is_main_process():
            logger.info("Evaluation results: %s", results)
        return results
    trainer = DefaultTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
        timeout=timedelta(seconds=load_config(args).DIST.TIMEOUT_S),  # how long the processes wait to meet
    )
