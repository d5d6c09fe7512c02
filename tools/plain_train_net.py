#!/usr/bin/env python
"""The same job as tools/train_net.py, as a hand-written loop: copy this file and edit it.

No DefaultTrainer and no hooks: every step of a training iteration is in `do_train`, top to bottom. The
library provides the parts (config, data, model, solver, checkpointer, metric storage, writers, comm).

    python tools/plain_train_net.py --config-file configs/digits/mlp.yaml
    python tools/plain_train_net.py --config-file configs/digits/mlp.yaml --resume
    python tools/plain_train_net.py --config-file configs/digits/mlp.yaml --eval-only MODEL.WEIGHTS model.pth
"""
import contextlib
import logging
from datetime import timedelta
import math

import torch
from torch.nn.parallel import DistributedDataParallel

from trainkit.checkpoint import Checkpointer, PeriodicCheckpointer
from trainkit.config import get_cfg
from trainkit.data import build_test_loader, build_train_loader, set_train_loader_start
from trainkit.engine import (
    compile_model, create_ddp_model, default_argument_parser, default_setup, default_writers, launch
)
from trainkit.evaluation import ClassificationEvaluator, inference_on_dataset, print_csv_format
from trainkit.evaluation.testing import flatten_results_dict
from trainkit.modeling import build_model
from trainkit.solver import build_lr_scheduler, build_optimizer
from trainkit.utils import comm
from trainkit.utils.events import EventStorage

logger = logging.getLogger("trainkit.tools.plain_train_net")


def do_test(cfg, model):
    results = {}
    for dataset_name in cfg.DATASETS.TEST:
        data_loader = build_test_loader(cfg, dataset_name)
        results[dataset_name] = inference_on_dataset(model, data_loader, ClassificationEvaluator(dataset_name))
        if comm.is_main_process():
            print_csv_format(results[dataset_name])
    return results[cfg.DATASETS.TEST[0]] if len(results) == 1 else results


def do_train(cfg, model, resume=False):
    model.train()
    optimizer = build_optimizer(cfg, model)
    scheduler = build_lr_scheduler(cfg, optimizer)
    checkpointer = Checkpointer(
        model, cfg.OUTPUT_DIR, save_to_disk=comm.is_main_process(), optimizer=optimizer, scheduler=scheduler
    )
    resumed = resume and checkpointer.has_checkpoint()
    extra = checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=resume)
    start_iter = extra.get("iteration", -1) + 1 if resumed else 0
    max_iter = cfg.SOLVER.MAX_ITER
    log_period = cfg.SOLVER.LOG_PERIOD
    periodic_checkpointer = PeriodicCheckpointer(checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD, max_iter=max_iter)
    writers = default_writers(cfg.OUTPUT_DIR, max_iter) if comm.is_main_process() else []
    results = {}

    # Gradient accumulation: one iteration is one optimizer step over `accum` micro-batches, and the loader
    # yields micro-batches (SOLVER.IMS_PER_BATCH / (processes * accum) samples each).
    accum = cfg.SOLVER.GRAD_ACCUM_STEPS
    data_loader = build_train_loader(cfg)
    set_train_loader_start(data_loader, start_iter * accum)  # continue the data order where the checkpoint left it
    data_iter = iter(data_loader)
    logger.info("Starting training from iteration %d", start_iter)
    with EventStorage(start_iter) as storage:
        for iteration in range(start_iter, max_iter):
            storage.iter = iteration

            optimizer.zero_grad()
            loss_sums = {}
            for micro in range(accum):
                # Under DDP only the last micro-batch's backward all-reduces the gradients.
                last_micro = micro == accum - 1 or not isinstance(model, DistributedDataParallel)
                with contextlib.nullcontext() if last_micro else model.no_sync():
                    micro_losses = model(next(data_iter))
                    (sum(micro_losses.values()) / accum).backward()
                for k, v in micro_losses.items():
                    loss_sums[k] = loss_sums[k] + v.detach() if k in loss_sums else v.detach()
            optimizer.step()
            loss_dict = {k: v / accum for k, v in loss_sums.items()}  # each loss's mean over the micro-batches
            storage.put_scalar("lr", optimizer.param_groups[0]["lr"], smoothing_hint=False)
            scheduler.step()

            # Tensors go into the storage as they are: no host sync here. reduce_dict averages the losses
            # over processes (an all-reduce; nothing with one process).
            reduced = comm.reduce_dict(loss_dict)
            storage.put_scalars(total_loss=sum(reduced.values()), **reduced)

            last = iteration == max_iter - 1
            if cfg.TEST.EVAL_PERIOD > 0 and ((iteration + 1) % cfg.TEST.EVAL_PERIOD == 0 or last):
                results = do_test(cfg, model)
                storage.put_scalars(**flatten_results_dict(results), smoothing_hint=False)
                comm.synchronize()
            if (iteration + 1) % log_period == 0 or last:
                # Reading the storage moves the pending losses to the host, once per log period.
                recent = storage.history("total_loss").values()[-log_period:]
                bad = [it for value, it in recent if not math.isfinite(value)]
                if bad:
                    raise FloatingPointError(f"Loss became infinite or NaN at iteration={bad[0]}!")
                for writer in writers:
                    writer.write()
            periodic_checkpointer.step(iteration)
    for writer in writers:
        writer.close()
    return results


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
    model = build_model(cfg)
    logger.info("Model:\n%s", model)
    if cfg.MODEL.COMPILE:  # in place, before DDP wraps it (see trainkit/engine/compile.py)
        compile_model(model, cfg.MODEL.COMPILE_MODE, cfg.MODEL.COMPILE_BACKEND, off_switch="MODEL.COMPILE False")
    if args.eval_only:
        Checkpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        return do_test(cfg, model)
    model = create_ddp_model(model, broadcast_buffers=False)
    results = do_train(cfg, model, resume=args.resume)
    return results or do_test(cfg, model)


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
