"""From a config to a training run: DefaultTrainer, default_writers, create_ddp_model.

``default_argument_parser`` and ``default_setup`` (the command line) are in :mod:`trainkit.engine.command_line`
and importable from here, as in detectron2.

This is the one module that turns a config into objects. Every ``build_*`` is a classmethod (or method) that
a subclass can override to change one part of the run and keep the rest. Nothing in the library imports
this module: only tools and users do.
"""
import contextlib
import logging
import os
import weakref
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch
from fvcore.nn.precise_bn import get_bn_modules
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainkit.checkpoint import Checkpointer, CheckpointError
from trainkit.checkpoint.sharded import ShardedCheckpointer
from trainkit.config import CfgNode
from trainkit.config.checks import check_config_values, check_writer_names
from trainkit.config.resume import check_resumed_config
from trainkit.data import (
    MetadataCatalog,
    build_test_loader,
    build_train_loader,
    get_train_loader_seed,
    set_train_loader_start,
)
from trainkit.engine import hooks
from trainkit.engine.command_line import default_argument_parser, default_setup
from trainkit.engine.compile import compile_model
from trainkit.engine.parallel import check_equal_batches, create_fsdp_model, is_fsdp_model
from trainkit.engine.train_loop import AMPTrainer, HookBase, SimpleTrainer, TrainerBase
from trainkit.evaluation import ClassificationEvaluator, DatasetEvaluator, inference_on_dataset, print_csv_format
from trainkit.modeling import build_model, parameter_summary
from trainkit.solver import build_lr_scheduler, build_optimizer
from trainkit.utils import comm
from trainkit.utils.env import get_rng_state, set_rng_state
from trainkit.utils.events import CommonMetricPrinter, CSVWriter, EventWriter, JSONWriter, TensorboardXWriter
from trainkit.utils.logger import setup_logger
from trainkit.utils.output_dir import lock_output_dir, unlock_output_dir

__all__ = [
    "create_ddp_model",
    "default_argument_parser",
    "default_setup",
    "default_writers",
    "DefaultTrainer",
]

logger = logging.getLogger(__name__)

_NO_COMPILE = "set MODEL.COMPILE False (e.g. `MODEL.COMPILE False` at the end of the command line)"


def create_ddp_model(model: nn.Module, *, fp16_compression: bool = False, **kwargs: Any) -> nn.Module:
    """Wraps ``model`` in DistributedDataParallel when there is more than one process; else returns it.

    Args:
        model: the model, already on its device.
        fp16_compression: compress gradients to float16 for the all-reduce (less traffic, a little less
            precision).
        kwargs: passed to DistributedDataParallel. ``device_ids`` defaults to this process's local GPU for a
            CUDA model.
    """
    if comm.get_world_size() == 1:
        return model
    on_cuda = next(model.parameters()).is_cuda
    if not on_cuda and torch.distributed.get_backend() == torch.distributed.Backend.NCCL:
        raise ValueError(
            "The process group uses NCCL, which only communicates CUDA tensors, but the model is on the CPU "
            "(MODEL.DEVICE cpu). Set MODEL.DEVICE cuda, or hide the GPUs (CUDA_VISIBLE_DEVICES=) so that "
            "launch() starts CPU processes with gloo."
        )
    if "device_ids" not in kwargs and on_cuda:
        kwargs["device_ids"] = [comm.get_local_rank()]
    ddp = DistributedDataParallel(model, **kwargs)
    if fp16_compression:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        ddp.register_comm_hook(state=None, hook=default_hooks.fp16_compress_hook)
    return ddp


def default_writers(
    output_dir: str,
    max_iter: Optional[int] = None,
    names: Sequence[str] = ("json", "tensorboard", "console"),
    config: Optional[CfgNode] = None,
    evaluation_results: Optional[Callable[[], Optional[Mapping[str, Any]]]] = None,
) -> List[EventWriter]:
    """The writers named in ``names`` (the config's ``WRITERS``), writing into ``output_dir``.

    ``"console"`` (:class:`CommonMetricPrinter`, with ETA), ``"json"`` (``metrics.json``), ``"tensorboard"``,
    ``"csv"`` (``metrics.csv``), ``"mlflow"`` and ``"wandb"`` (:mod:`trainkit.utils.trackers`; they log
    ``config`` as the run's parameters, and what ``evaluation_results()`` returns at the end as its final
    evaluation). The console writer comes first whatever the order of ``names``, so
    that the ``eta_seconds`` it puts reaches the files. With the defaults, detectron2's three writers.

    Raises:
        ValueError: an unknown or repeated name (the message lists the known ones).
        ImportError: a tracker whose package is not installed (the message names the extra to install).
    """
    check_writer_names(names)
    os.makedirs(output_dir, exist_ok=True)
    ordered = sorted(names, key=lambda n: n != "console")  # stable: the rest keep their order
    return [_build_writer(name, output_dir, max_iter, config, evaluation_results) for name in ordered]


def _build_writer(
    name: str, output_dir: str, max_iter: Optional[int], config: Optional[CfgNode], evaluation_results: Any
) -> EventWriter:
    if name == "console":
        return CommonMetricPrinter(max_iter)
    if name == "json":
        return JSONWriter(os.path.join(output_dir, "metrics.json"))
    if name == "tensorboard":
        return TensorboardXWriter(output_dir)
    if name == "csv":
        return CSVWriter(os.path.join(output_dir, "metrics.csv"))
    from trainkit.utils import trackers  # optional packages: imported only when asked for

    if name == "mlflow":
        return trackers.MLflowWriter(output_dir, config=config, evaluation_results=evaluation_results)
    if name == "wandb":
        return trackers.WandbWriter(output_dir, config=config, evaluation_results=evaluation_results)
    raise AssertionError(f"check_writer_names let {name!r} through without a writer for it")


class _LoopStateOfInnerTrainer:
    """A DefaultTrainer attribute that lives on its inner trainer: one object owns the loop's state (the
    iteration, the storage, ...), which the inner trainer's step and this trainer's hooks both read."""

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    def __get__(self, trainer: Any, owner: Optional[type] = None) -> Any:
        return self if trainer is None else getattr(trainer._trainer, self._name)

    def __set__(self, trainer: Any, value: Any) -> None:
        setattr(trainer._trainer, self._name, value)


class _RunAfterBackwardOf(HookBase):
    """Registered on the inner trainer: its step calls the DefaultTrainer's ``after_backward`` hooks."""

    def __init__(self, trainer: TrainerBase) -> None:
        self._outer = weakref.proxy(trainer)

    def after_backward(self) -> None:
        self._outer.after_backward()


class DefaultTrainer(TrainerBase):
    """A trainer built from a config: model, optimizer, LR schedule, data, checkpointer, evaluation, writers.

    Example::

        cfg = get_cfg()
        cfg.merge_from_file("configs/digits/mlp.yaml")
        trainer = DefaultTrainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()

    Customise a run by subclassing and overriding a ``build_*`` method (``build_model``,
    ``build_optimizer``, ``build_lr_scheduler``, ``build_train_loader``, ``build_test_loader``,
    ``build_evaluator``, ``build_hooks``, ``build_writers``).

    The default hooks, in order: IterationTimer, LRScheduler, PreciseBN (with ``TEST.PRECISE_BN.ENABLED`` and
    a BatchNorm layer), EMAHook (with ``MODEL_EMA.ENABLED``), EvalHook (``TEST.EVAL_PERIOD`` and after the last
    iteration; on the EMA weights with ``MODEL_EMA.USE_FOR_EVAL``), TorchMemoryStats (``SOLVER.LOG_PERIOD``),
    PeriodicWriter (``SOLVER.LOG_PERIOD``; main process only), PeriodicCheckpointer
    (``SOLVER.CHECKPOINT_PERIOD``; in the background with ``SOLVER.CHECKPOINT_ASYNC``), PreemptionHandler
    (SIGTERM/SIGINT: finish the step, save, stop). The last
    three stay last when more hooks are registered, so the writers write everything the iteration put, and a
    checkpoint taken at an evaluation iteration holds the state of the hooks that reacted to that evaluation
    (best checkpoint, early stopping) and comes after that iteration's metrics lines. (detectron2 checkpoints
    before evaluating; a resumed run then forgets the evaluation made at the checkpoint's iteration.)

    Checkpoints hold the model, the optimizer, the LR scheduler, the grad scaler, the iteration, every hook's
    state, the training data seed and the RNG states of every process: a resumed run continues exactly.

    ``SOLVER.GRAD_ACCUM_STEPS`` makes one iteration one optimizer step over that many micro-batches (the loader
    yields micro-batches); ``MODEL.COMPILE`` compiles the model in place with torch.compile before wrapping it
    in DDP, after checking that this machine can compile (see :mod:`trainkit.engine.compile`).

    The step is that of the inner ``SimpleTrainer``/``AMPTrainer`` (``self._trainer``, as in detectron2). It
    owns the loop's state: ``iter``, ``start_iter``, ``max_iter``, ``stop_reason`` and ``storage`` of this
    trainer are its attributes.
    """

    iter = _LoopStateOfInnerTrainer()
    start_iter = _LoopStateOfInnerTrainer()
    max_iter = _LoopStateOfInnerTrainer()
    stop_reason = _LoopStateOfInnerTrainer()
    storage = _LoopStateOfInnerTrainer()

    def __init__(self, cfg: CfgNode) -> None:
        trainkit_logger = logging.getLogger("trainkit")
        if not trainkit_logger.isEnabledFor(logging.INFO) or not trainkit_logger.handlers:
            setup_logger()
        check_config_values(cfg)
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        self.cfg = cfg

        model = self.build_model(cfg)
        self._sharded = cfg.MODEL.PARALLEL == "fsdp"
        if self._sharded:
            model = create_fsdp_model(
                model, wrap_classes=cfg.MODEL.FSDP.WRAP_CLASSES, **_fsdp_precision(cfg.SOLVER.AMP)
            )
        # After sharding: the optimizer holds the sharded parameters (DDP does not replace them).
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        if cfg.MODEL.COMPILE:
            model = self._compiled(cfg, model)
        if not self._sharded:
            model = create_ddp_model(model, broadcast_buffers=False)
        trainer_cls = AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer
        kwargs: Dict[str, Any] = {
            "gather_metric_period": cfg.SOLVER.LOG_PERIOD, "grad_accum_steps": cfg.SOLVER.GRAD_ACCUM_STEPS
        }
        if cfg.SOLVER.AMP.ENABLED:
            kwargs["precision"] = _amp_dtype(cfg.SOLVER.AMP.PRECISION)
        self._trainer = trainer_cls(model, data_loader, optimizer, **kwargs)
        self._trainer.register_hooks([_RunAfterBackwardOf(self)])
        super().__init__()  # after the inner trainer exists: the loop's state is set on it

        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        if self._sharded:  # every process writes its shards; the optimizer is saved by parameter name
            self.checkpointer: Checkpointer = ShardedCheckpointer(
                model, cfg.OUTPUT_DIR, optimizer=optimizer, async_save=cfg.SOLVER.CHECKPOINT_ASYNC,
                trainer=weakref.proxy(self),
            )
        else:
            self.checkpointer = Checkpointer(
                model, cfg.OUTPUT_DIR, save_to_disk=comm.is_main_process(), trainer=weakref.proxy(self)
            )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self._last_eval_results: Optional[Dict[str, Any]] = None
        self.register_hooks(self.build_hooks())

    def _compiled(self, cfg: CfgNode, model: nn.Module) -> nn.Module:
        # MODEL.COMPILE: the inner module, before DDP wraps it, as torch's docs advise: dynamo does not trace
        # DDP's hooks well, and DDP then all-reduces the compiled module's gradients as usual. (With FSDP it is
        # refused by check_config_values: FSDP2 wants each block compiled before it is sharded.)
        return compile_model(model, cfg.MODEL.COMPILE_MODE, cfg.MODEL.COMPILE_BACKEND, off_switch=_NO_COMPILE)

    # ---- the parts of the inner trainer, as attributes of this one -----------------------------------------
    @property
    def model(self) -> nn.Module:
        return self._trainer.model

    @property
    def data_loader(self) -> Any:
        return self._trainer.data_loader

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self._trainer.optimizer

    # ---- running -------------------------------------------------------------------------------------------
    # Hooks that write and save what an iteration produced: they run after every other hook of the iteration,
    # the writers first, so that a checkpoint taken at a write iteration comes after that write (a kill between
    # the two then loses no metrics line: the resumed run writes from the last write before its checkpoint).
    _TAIL_HOOKS = (hooks.PeriodicWriter, hooks.PeriodicCheckpointer, hooks.PreemptionHandler)

    def register_hooks(self, hooks_: Sequence[Optional[HookBase]]) -> None:
        """Appends hooks, but keeps the PeriodicWriter and then the checkpointing hooks last, so that what a
        later-registered hook does in an iteration (its state, the metrics it puts) reaches the writers and is
        in that iteration's checkpoint."""
        super().register_hooks(hooks_)
        tail = [h for kind in self._TAIL_HOOKS for h in self._hooks if type(h) is kind]
        if self._hooks[len(self._hooks) - len(tail):] != tail:
            self._hooks = [h for h in self._hooks if h not in tail] + tail

    def resume_or_load(self, resume: bool = True) -> None:
        """Resumes from the last checkpoint in ``OUTPUT_DIR`` when ``resume`` and one exists; otherwise loads
        ``MODEL.WEIGHTS`` (if set) and starts at iteration 0.

        Resuming restores everything and makes the training data continue from the saved iteration.
        With several processes every process calls it, and reads the checkpoint itself.

        Raises:
            RuntimeError: the processes would start at different iterations (some did not find the checkpoint,
                e.g. an OUTPUT_DIR that is not shared between machines); otherwise they would deadlock.
        """
        has_checkpoint = resume and self.checkpointer.has_checkpoint()
        if resume and not has_checkpoint:
            logger.info("--resume: no checkpoint in %r; starting from scratch.", self.cfg.OUTPUT_DIR)
        self._restored_state = False
        self.checkpointer.resume_or_load(self.cfg.MODEL.WEIGHTS, resume=resume)
        if has_checkpoint and not self._restored_state:
            path = self.checkpointer.get_checkpoint_file()
            raise CheckpointError(
                f"Cannot resume from {path}: it has no trainer state (no 'trainer' entry: iteration, optimizer, "
                "scheduler, hooks), only weights. To start a new run from these weights, give MODEL.WEIGHTS "
                f"{path} and a new OUTPUT_DIR, without --resume."
            )
        if has_checkpoint:
            # load_state_dict set self.iter to the last finished iteration.
            self.start_iter = self.iter + 1
            logger.info("Resuming from iteration %d", self.start_iter)
        start_iters = comm.all_gather(self.start_iter)
        if len(set(start_iters)) > 1:
            raise RuntimeError(
                f"The processes would start training at different iterations (by rank: {start_iters}): not all of "
                f"them found the checkpoint in OUTPUT_DIR={self.cfg.OUTPUT_DIR!r}. Put OUTPUT_DIR on a file "
                "system that every machine shares, or copy the checkpoint and its last_checkpoint tag to that "
                "path on every machine."
            )
        # The loader counts micro-batches: GRAD_ACCUM_STEPS of them per iteration.
        loader_start = self.start_iter * self.cfg.SOLVER.GRAD_ACCUM_STEPS
        if self.start_iter > 0 and not set_train_loader_start(self.data_loader, loader_start):
            logger.warning(
                "The training loader is not one of trainkit's: its data order restarts from the beginning "
                "instead of continuing at iteration %d.", self.start_iter
            )

    def train(self) -> Optional[Dict[str, Any]]:
        """Runs training; returns the last evaluation results (None if there was no evaluation).

        The main process holds the lock of ``OUTPUT_DIR`` meanwhile (see :func:`lock_output_dir`): a second
        run into the same folder gets a clear error instead of overwriting this one's checkpoints.
        """
        took_lock = comm.is_main_process() and bool(self.cfg.OUTPUT_DIR) and lock_output_dir(self.cfg.OUTPUT_DIR)
        try:
            super().train(self.start_iter, self.max_iter)
        finally:
            if took_lock:
                unlock_output_dir(self.cfg.OUTPUT_DIR)
        return self._last_eval_results

    def run_step(self) -> None:
        self._trainer.run_step()

    def flush_metrics(self) -> None:
        """See :meth:`SimpleTrainer.flush_metrics`."""
        self._trainer.flush_metrics()

    def after_train(self) -> None:
        try:
            self._trainer.after_train()  # writes the metrics still pending; may find a non-finite loss
        finally:
            try:
                super().after_train()
            finally:
                self.checkpointer.wait()  # a background save in flight (any checkpointer) is written and published

    # ---- state ---------------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        ret = super().state_dict()
        ret["_trainer"] = self._trainer.state_dict()
        ret["_trainer"].pop("storage", None)  # the same storage as this trainer's, saved above
        if self._sharded:
            del ret["_trainer"]["optimizer"]  # sharded: the ShardedCheckpointer saves it beside the model
        # Every rank's RNG state: the rest of the run consumes them (dropout, augmentation in the main process).
        ret["rng"] = comm.all_gather(get_rng_state())
        ret["data_seed"] = get_train_loader_seed(self.data_loader)
        ret["config"] = self.cfg.dump()  # a resumed run compares its config with it
        return ret

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if "config" in state_dict:  # before anything is restored: a refused change leaves this trainer as it was
            check_resumed_config(state_dict["config"], self.cfg.dump(), self.checkpointer.get_checkpoint_file())
        super().load_state_dict(state_dict)
        trainer_state = state_dict["_trainer"]
        if self._sharded and "optimizer" not in trainer_state:
            # The ShardedCheckpointer has already restored the optimizer from the shards.
            trainer_state = {**trainer_state, "optimizer": self.optimizer.state_dict()}
        self._trainer.load_state_dict(trainer_state)
        self._restored_state = True
        saved_seed, seed = state_dict.get("data_seed"), get_train_loader_seed(self.data_loader)
        if saved_seed is not None and saved_seed != seed:
            if self.cfg.SEED < 0 and seed is not None:
                # SEED < 0 drew a seed at random; continue with the interrupted run's draw. (The loader has not
                # been iterated yet, so replacing it costs nothing.)
                cfg = self.cfg.clone()
                cfg.defrost()
                cfg.SEED = saved_seed
                self._trainer.reset_data_loader(lambda: self.build_train_loader(cfg))
                logger.info("Resuming with the checkpoint's training data seed %d (SEED is negative).", saved_seed)
            else:
                logger.warning(
                    "The checkpoint's training data seed is %d but this run's is %s (SEED was changed, or the "
                    "loader is not trainkit's): the data order after resuming differs from the interrupted run's.",
                    saved_seed, seed,
                )
        rng = state_dict.get("rng")
        if rng:
            if len(rng) != comm.get_world_size():
                logger.warning(
                    "The checkpoint holds RNG states of %d processes but %d are running: RNG states are not "
                    "restored, so the resumed run is not bit-exact.", len(rng), comm.get_world_size()
                )
            else:
                set_rng_state(rng[comm.get_rank()])

    # ---- building blocks (override in a subclass) ----------------------------------------------------------
    def build_hooks(self) -> List[Optional[HookBase]]:
        """The default hooks (see the class docstring)."""
        cfg = self.cfg
        weak_self = weakref.proxy(self)  # the eval closure must not keep the trainer alive

        ema = hooks.EMAHook(cfg.MODEL_EMA.DECAY, cfg.MODEL_EMA.WARMUP_ITERS) if cfg.MODEL_EMA.ENABLED else None
        eval_ema = ema if cfg.MODEL_EMA.USE_FOR_EVAL else None

        def test_and_save_results() -> Dict[str, Any]:
            # With MODEL_EMA.USE_FOR_EVAL the model holds the averaged weights for the evaluation only.
            with eval_ema.ema.apply_to(weak_self.model) if eval_ema else contextlib.nullcontext():
                weak_self._last_eval_results = weak_self.test(weak_self.cfg, weak_self.model)
            return weak_self._last_eval_results

        precise_bn = None
        if cfg.TEST.PRECISE_BN.ENABLED and get_bn_modules(self.model):
            # A loader of its own: the training loader's stream must not skip the batches PreciseBN reads.
            precise_bn = hooks.PreciseBN(
                cfg.TEST.EVAL_PERIOD, self.model, self.build_train_loader(cfg), cfg.TEST.PRECISE_BN.NUM_ITER
            )
        return [
            hooks.IterationTimer(),
            hooks.LRScheduler(),
            # After the step, before the evaluation of the same iteration. PreciseBN before the EMA: the EMA
            # copies the model's buffers, so an evaluated average gets the recomputed statistics too.
            precise_bn,
            ema,
            hooks.EvalHook(cfg.TEST.EVAL_PERIOD, test_and_save_results),
            hooks.TorchMemoryStats(period=cfg.SOLVER.LOG_PERIOD),
            (
                hooks.PeriodicWriter(self.build_writers(), period=cfg.SOLVER.LOG_PERIOD)
                if comm.is_main_process()
                else None
            ),
            hooks.PeriodicCheckpointer(
                self.checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD,
                max_to_keep=cfg.SOLVER.CHECKPOINT_MAX_TO_KEEP or None, async_save=cfg.SOLVER.CHECKPOINT_ASYNC,
            ),
            hooks.PreemptionHandler(self.checkpointer, check_period=cfg.SOLVER.LOG_PERIOD),
        ]

    def build_writers(self) -> List[EventWriter]:
        """The writers of the PeriodicWriter hook: :func:`default_writers` of the config's ``WRITERS``. The
        trackers log the results of the last evaluation at the end."""
        weak_self = weakref.proxy(self)
        return default_writers(self.cfg.OUTPUT_DIR, self.max_iter, names=self.cfg.WRITERS, config=self.cfg,
                               evaluation_results=lambda: weak_self._last_eval_results)

    @classmethod
    def build_model(cls, cfg: CfgNode) -> nn.Module:
        """``trainkit.modeling.build_model(cfg)``, and logs the model and (main process) its parameter counts."""
        model = build_model(cfg)
        logger.info("Model:\n%s", model)
        if comm.is_main_process():
            logger.info("Parameters per top-level module:\n%s", parameter_summary(model))
        return model

    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model: nn.Module) -> torch.optim.Optimizer:
        """``trainkit.solver.build_optimizer(cfg, model)``."""
        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg: CfgNode, optimizer: torch.optim.Optimizer) -> Any:
        """``trainkit.solver.build_lr_scheduler(cfg, optimizer)``."""
        return build_lr_scheduler(cfg, optimizer)

    @classmethod
    def build_train_loader(cls, cfg: CfgNode) -> Any:
        """``trainkit.data.build_train_loader(cfg)``."""
        return build_train_loader(cfg)

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: str) -> Any:
        """``trainkit.data.build_test_loader(cfg, dataset_name)``."""
        return build_test_loader(cfg, dataset_name)

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str) -> DatasetEvaluator:
        """A :class:`ClassificationEvaluator` for data sets whose metadata ``evaluator_type`` is
        ``"classification"``.

        Raises:
            NotImplementedError: for other data sets; override this method or pass ``evaluators`` to
                :meth:`test`.
        """
        evaluator_type = getattr(MetadataCatalog.get(dataset_name), "evaluator_type", None)
        if evaluator_type == "classification":
            return ClassificationEvaluator(dataset_name)
        raise NotImplementedError(
            f"No evaluator for dataset {dataset_name!r} (evaluator_type={evaluator_type!r}). Override "
            "DefaultTrainer.build_evaluator in a subclass to return one, or pass evaluators= to DefaultTrainer.test()."
        )

    @classmethod
    def test(
        cls, cfg: CfgNode, model: nn.Module, evaluators: Optional[Sequence[DatasetEvaluator]] = None
    ) -> Dict[str, Any]:
        """Evaluates ``model`` on every data set of ``DATASETS.TEST``.

        Args:
            evaluators: one per data set; built with :meth:`build_evaluator` when None.

        Returns:
            ``{dataset name: results}``, or just the results when there is one data set.
        """
        if evaluators is not None and len(evaluators) != len(cfg.DATASETS.TEST):
            raise ValueError(
                f"test() got {len(evaluators)} evaluators for {len(cfg.DATASETS.TEST)} data sets in "
                f"DATASETS.TEST ({list(cfg.DATASETS.TEST)}); pass one per data set."
            )
        results: Dict[str, Any] = OrderedDict()
        for idx, dataset_name in enumerate(cfg.DATASETS.TEST):
            data_loader = cls.build_test_loader(cfg, dataset_name)
            if is_fsdp_model(model):
                check_equal_batches(data_loader, dataset_name)
            evaluator = evaluators[idx] if evaluators is not None else cls.build_evaluator(cfg, dataset_name)
            results_i = inference_on_dataset(model, data_loader, evaluator)
            results[dataset_name] = results_i
            if comm.is_main_process() and results_i:
                logger.info("Evaluation results for %s in csv format:", dataset_name)
                print_csv_format(results_i)
        if len(results) == 1:
            return list(results.values())[0]
        return results

    @staticmethod
    def auto_scale_workers(cfg: CfgNode, num_workers: int) -> CfgNode:
        """Scales the batch size, learning rate, iterations and periods linearly when ``num_workers`` differs
        from ``SOLVER.REFERENCE_WORLD_SIZE`` (0 disables scaling), keeping the per-process batch fixed
        (``SOLVER.GRAD_ACCUM_STEPS`` is kept, so the per-process micro-batch stays fixed too).

        Returns:
            the (new) config; the given one is not modified.
        """
        old_world_size = cfg.SOLVER.REFERENCE_WORLD_SIZE
        if old_world_size == 0 or old_world_size == num_workers:
            return cfg
        cfg = cfg.clone()
        frozen = cfg.is_frozen()
        cfg.defrost()
        if cfg.SOLVER.IMS_PER_BATCH % old_world_size != 0:
            raise ValueError(
                f"SOLVER.IMS_PER_BATCH ({cfg.SOLVER.IMS_PER_BATCH}) must be divisible by "
                f"SOLVER.REFERENCE_WORLD_SIZE ({old_world_size}) to scale it."
            )
        scale = num_workers / old_world_size
        bs = cfg.SOLVER.IMS_PER_BATCH = int(round(cfg.SOLVER.IMS_PER_BATCH * scale))
        lr = cfg.SOLVER.BASE_LR = cfg.SOLVER.BASE_LR * scale
        max_iter = cfg.SOLVER.MAX_ITER = int(round(cfg.SOLVER.MAX_ITER / scale))
        cfg.SOLVER.WARMUP_ITERS = int(round(cfg.SOLVER.WARMUP_ITERS / scale))
        cfg.SOLVER.STEPS = tuple(int(round(s / scale)) for s in cfg.SOLVER.STEPS)
        # A period stays at least 1 when it was on (EVAL_PERIOD 0 stays 0: no periodic evaluation).
        cfg.TEST.EVAL_PERIOD = max(int(cfg.TEST.EVAL_PERIOD > 0), int(round(cfg.TEST.EVAL_PERIOD / scale)))
        cfg.SOLVER.CHECKPOINT_PERIOD = max(1, int(round(cfg.SOLVER.CHECKPOINT_PERIOD / scale)))
        cfg.SOLVER.REFERENCE_WORLD_SIZE = num_workers
        logger.info(
            "Auto-scaling the config to %d processes: IMS_PER_BATCH=%d, BASE_LR=%g, MAX_ITER=%d.",
            num_workers, bs, lr, max_iter,
        )
        if frozen:
            cfg.freeze()
        return cfg


def _fsdp_precision(amp_cfg: CfgNode) -> Dict[str, Any]:
    # FSDP's mixed precision from SOLVER.AMP: compute in the AMP dtype, reduce gradients in float32.
    if not amp_cfg.ENABLED:
        return {}
    return {"param_dtype": _amp_dtype(amp_cfg.PRECISION), "reduce_dtype": torch.float32}


def _amp_dtype(name: str) -> torch.dtype:
    dtypes = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name.lower() not in dtypes:
        raise ValueError(f"SOLVER.AMP.PRECISION is {name!r}; use 'float16' or 'bfloat16'.")
    return dtypes[name.lower()]
