"""An exponential moving average (EMA) of a model's weights, and the hook that keeps it during training.

After each optimizer step the EMA moves towards the model: ``ema = decay * ema + (1 - decay) * weight`` for
every floating-point parameter. Buffers (BatchNorm running statistics, counters) and non-floating-point
parameters are copied, not averaged: they are statistics of the data, not weights that SGD moved, and the
model's own are already a running average.

Evaluate with the averaged weights by swapping them in for the duration of a block::

    ema_hook = EMAHook(decay=0.999)
    trainer.register_hooks([ema_hook])
    ...
    with ema_hook.ema.apply_to(trainer.model):
        results = inference_on_dataset(trainer.model, loader, evaluator)
"""
import contextlib
import logging
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from trainkit.checkpoint.model_loading import unwrap_model
from trainkit.engine.train_loop import HookBase

__all__ = ["ModelEMA", "EMAHook"]

logger = logging.getLogger(__name__)


def _named_tensors(model: nn.Module) -> List[Tuple[str, torch.Tensor]]:
    """The parameters and then the buffers of ``model`` (unwrapped from DDP), by name, detached."""
    model = unwrap_model(model)
    return [(n, p.detach()) for n, p in model.named_parameters()] + [
        (n, b.detach()) for n, b in model.named_buffers()
    ]


class ModelEMA:
    """An exponential moving average of a model's parameters, with copies of its buffers.

    The EMA holds its own tensors (one copy of the model's weights), on ``device`` or on the model's devices.
    :meth:`update` is a few ``torch._foreach_*`` kernels with a Python-float decay: it never waits for the
    device. The EMA tensors have the model's dtypes, so a half-precision model has a half-precision average;
    keep the model in float32 if the average must be accurate.

    The model may be wrapped in DistributedDataParallel: the wrapped module is used. Under several processes
    each one keeps its own EMA; their models are equal after each step, and so are their EMAs.

    Args:
        model: the model to average. Its weights now are the average's starting value.
        decay: the weight of the old average in each update, in ``[0, 1]``.
        device: where to keep the average (e.g. ``"cpu"`` to spare GPU memory); None: beside each weight.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, device: Optional[Union[str, torch.device]] = None):
        _check_decay(decay)
        self.decay = float(decay)
        self.device = None if device is None else torch.device(device)
        self.num_updates = 0
        named = _named_tensors(model)
        num_params = sum(1 for _ in unwrap_model(model).parameters())
        self._names = [n for n, _ in named]
        self._weights = [t.to(self.device, copy=True) if self.device is not None else t.clone() for _, t in named]
        # Which tensors are averaged (floating-point parameters) and which copied (buffers, integer tensors).
        self._averaged = [i for i, t in enumerate(self._weights) if i < num_params and t.is_floating_point()]
        averaged = set(self._averaged)
        self._copied = [i for i in range(len(self._weights)) if i not in averaged]

    # ---- updating --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, model: nn.Module, decay: Optional[float] = None) -> None:
        """Moves the average towards ``model``'s weights and copies its buffers.

        Args:
            model: the model the EMA was made from (or one of the same structure), possibly DDP-wrapped.
            decay: this update's decay instead of ``self.decay`` (for a warm-up); 0 copies the weights.
        """
        if decay is None:
            decay = self.decay
        else:
            _check_decay(decay)
        source = self._matching_tensors(model)
        if self.device is not None:
            source = [t.to(self.device, non_blocking=True) for t in source]
        if self._averaged:
            torch._foreach_lerp_(
                [self._weights[i] for i in self._averaged], [source[i] for i in self._averaged], 1.0 - float(decay)
            )
        if self._copied:
            torch._foreach_copy_([self._weights[i] for i in self._copied], [source[i] for i in self._copied])
        self.num_updates += 1

    def _matching_tensors(self, model: nn.Module) -> List[torch.Tensor]:
        tensors = [t for _, t in _named_tensors(model)]
        if len(tensors) != len(self._weights):
            raise ValueError(
                f"The model has {len(tensors)} parameters and buffers, the EMA {len(self._weights)}: pass the "
                "model the ModelEMA was made from (or one of the same structure)."
            )
        return tensors

    # ---- using the average -------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def apply_to(self, model: nn.Module) -> Iterator[nn.Module]:
        """Within the block, ``model`` holds the EMA weights; its own are restored afterwards, also on errors.

        The weights are copied in place, so the model's parameters stay the same objects (an optimizer
        holding them is unaffected). Costs one extra copy of the weights for the duration of the block.

        Yields:
            ``model``.
        """
        targets = self._matching_tensors(model)
        with torch.no_grad():
            originals = [t.clone() for t in targets]
            try:
                torch._foreach_copy_(targets, self._weights)
                yield model
            finally:
                torch._foreach_copy_(targets, originals)

    def weights(self) -> Dict[str, torch.Tensor]:
        """The EMA's parameters and buffers by name, as in the model's ``state_dict()`` (not copies)."""
        return dict(zip(self._names, self._weights))

    # ---- state -----------------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """``{"num_updates": int, "weights": {name: tensor}}``: tensors and plain data only."""
        return {"num_updates": self.num_updates, "weights": self.weights()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restores what :meth:`state_dict` returned (copied into the EMA's tensors, on their devices).

        Raises:
            KeyError: the state's weight names differ from the model's.
            ValueError: a weight's shape differs.
        """
        weights = state_dict["weights"]
        if list(weights) != self._names:
            missing = sorted(set(self._names) - set(weights))
            unexpected = sorted(set(weights) - set(self._names))
            raise KeyError(
                f"The EMA state does not match the model: missing {missing}, unexpected {unexpected}. Load the "
                "state of an EMA of the same model."
            )
        for name, mine in zip(self._names, self._weights):
            if weights[name].shape != mine.shape:
                raise ValueError(
                    f"EMA weight {name!r} has shape {tuple(weights[name].shape)} in the state and "
                    f"{tuple(mine.shape)} in the model; load the state of an EMA of the same model."
                )
        with torch.no_grad():
            torch._foreach_copy_(self._weights, [weights[n] for n in self._names])
        self.num_updates = int(state_dict["num_updates"])


def _check_decay(decay: float) -> None:
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1] (e.g. 0.999), got {decay!r}.")


class EMAHook(HookBase):
    """Keeps a :class:`ModelEMA` of ``trainer.model``, updated after every iteration's optimizer step.

    The EMA is made from the model at ``before_train`` (so weights loaded before training are its start), or
    when a checkpoint's state is loaded into the hook. Its weights and number of updates are the hook's state,
    saved with the trainer's, so a resumed run continues the exact same average.

    Warm-up: during the first ``warmup_iters`` updates the decay grows linearly from 0 (the first update
    copies the model) to ``decay``: update ``n`` (0-based) uses ``decay * min(1, n / warmup_iters)``. This keeps
    a long-memory average from being dominated by the random initial weights.

    Register it before the checkpointing hooks (``DefaultTrainer.register_hooks`` does) so that a checkpoint
    holds the average after its iteration. To evaluate the average periodically, register an
    :class:`~trainkit.engine.hooks.EvalHook` after this hook whose function runs under
    ``with ema_hook.ema.apply_to(trainer.model):``.

    Args:
        decay: the EMA's decay after warm-up, in ``[0, 1]``.
        warmup_iters: updates over which the decay ramps up from 0 (0: no warm-up).
        device: where to keep the average; None: beside the model's weights.
    """

    def __init__(self, decay: float = 0.999, warmup_iters: int = 0, device: Optional[Union[str, torch.device]] = None):
        _check_decay(decay)
        if not isinstance(warmup_iters, int) or warmup_iters < 0:
            raise ValueError(f"EMAHook warmup_iters must be an int >= 0 (number of updates), got {warmup_iters!r}.")
        self._decay = float(decay)
        self._warmup_iters = warmup_iters
        self._device = device
        self.ema: Optional[ModelEMA] = None

    def _get_ema(self) -> ModelEMA:
        if self.ema is None:
            self.ema = ModelEMA(self.trainer.model, self._decay, self._device)
        return self.ema

    def decay_at(self, num_updates: int) -> float:
        """The decay of the update that follows ``num_updates`` earlier ones."""
        if num_updates >= self._warmup_iters:
            return self._decay
        return self._decay * num_updates / self._warmup_iters

    def before_train(self) -> None:
        self._get_ema()

    def after_step(self) -> None:
        ema = self._get_ema()
        ema.update(self.trainer.model, decay=self.decay_at(ema.num_updates))

    def state_dict(self) -> Dict[str, Any]:
        return {} if self.ema is None else self.ema.state_dict()

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self._get_ema().load_state_dict(state_dict)
        logger.info("EMAHook: loaded the EMA weights after %d updates.", self.ema.num_updates)
