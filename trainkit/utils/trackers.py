"""Writers to experiment trackers: :class:`MLflowWriter` and :class:`WandbWriter`.

Each one is an :class:`~trainkit.utils.events.EventWriter`: it reads the storage like the JSON writer and
sends the same scalars, with ``step=iteration``. The packages are optional (``pip install trainkit[mlflow]``,
``trainkit[wandb]``) and imported only when a writer first writes. Select them with the config's ``WRITERS``
list (``"mlflow"``, ``"wandb"``).

Both keep their run's id in their state, which :class:`~trainkit.engine.hooks.PeriodicWriter` saves in
every checkpoint: a resumed run continues the same tracker run, and logs no step twice. Only the main
process logs.
"""
import importlib
import json
import logging
import os
import re
import sys
import time
from typing import Any, Callable, Dict, List, Mapping, Optional

from trainkit.utils import comm
from trainkit.utils.events import EventWriter, _new_scalars_by_iter, get_event_storage

__all__ = ["MLflowWriter", "WandbWriter", "flatten_config"]

logger = logging.getLogger(__name__)


def _import(module: str, extra: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"The {extra!r} writer needs the {module.split('.')[0]!r} package, which is not installed: "
            f"pip install 'trainkit[{extra}]' (or remove {extra!r} from the config's WRITERS)."
        ) from e


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> Dict[str, str]:
    """``{"SOLVER.BASE_LR": "0.1", ...}``: a nested config (a CfgNode) as flat string parameters."""
    flat: Dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


class _TrackerWriter(EventWriter):
    # The part both trackers share: main process only, start or continue the run at the first write, log
    # each iteration after the last one the run holds, log the evaluation and end the run at close().

    def __init__(
        self,
        output_dir: str,
        config: Optional[Mapping[str, Any]],
        window_size: int,
        evaluation_results: Optional[Callable[[], Optional[Mapping[str, Any]]]],
    ) -> None:
        self._output_dir = output_dir
        self._config = config
        self._evaluation_results = evaluation_results
        self._window_size = window_size
        self._run_id: Optional[str] = None
        self._started = False
        self._last_write = -1

    def state_dict(self) -> Dict[str, Any]:
        return {} if self._run_id is None else {"run_id": self._run_id}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._run_id = state.get("run_id")

    def write(self) -> None:
        if not comm.is_main_process():
            return
        storage = get_event_storage()
        if not self._started:
            kept = self._kept_through(storage.start_iter)
            resume = storage.start_iter > 0 and self._run_id is not None
            self._last_write = max(kept, self._start(resume, storage.start_iter))
            self._started = True
            self._continue_after = None
        new = _new_scalars_by_iter(storage, self._window_size, self._last_write)
        if new:
            self._log(new)
            self._last_write = max(new)

    def close(self) -> None:
        if not self._started:
            return
        self._started = False
        # PeriodicWriter closes its writers in after_train, which also runs while an exception ends training:
        # the run is then marked failed (a resume continues it all the same).
        failed = sys.exc_info()[0] is not None
        results = self._evaluation_results() if self._evaluation_results is not None else None
        self._finish(dict(results or {}), failed)

    def _config_text(self) -> str:
        dump = getattr(self._config, "dump", None)
        return dump() if dump is not None else json.dumps(dict(self._config or {}), indent=1, default=str)

    # Implemented by each tracker.
    def _start(self, resume: bool, start_iter: int) -> int:
        """Starts a run or continues ``self._run_id``; returns the last step the run already holds (-1)."""
        raise NotImplementedError

    def _log(self, scalars_by_iter: Dict[int, Dict[str, float]]) -> None:
        raise NotImplementedError

    def _finish(self, evaluation: Dict[str, Any], failed: bool) -> None:
        raise NotImplementedError


class MLflowWriter(_TrackerWriter):
    """Logs to an MLflow tracking store through ``MlflowClient`` (``pip install trainkit[mlflow]``).

    * Store: ``tracking_uri``, else the ``MLFLOW_TRACKING_URI`` environment variable, else a SQLite file in
      the output folder, ``sqlite:///<output_dir>/mlflow.db``, which needs no server (``mlflow ui
      --backend-store-uri sqlite:///<output_dir>/mlflow.db`` shows it). With that default store the
      artifacts go to ``<output_dir>/mlartifacts``.
    * A new run logs the flattened config as parameters (``SOLVER.BASE_LR``, ...) and ``config.yaml`` as an
      artifact; every write logs its scalars with ``step=iteration`` in ``log_batch`` calls (one per 1000
      values: one round trip per write, not one per value); ``close()`` logs what ``evaluation_results()``
      returns (DefaultTrainer's last evaluation) as ``final_evaluation.json`` and marks the run ``FINISHED`` (``FAILED`` when an exception ended
      training).
    * A resumed run (the run id comes back from the checkpoint) continues the same MLflow run. MLflow cannot
      delete logged values, so it skips the steps that the interrupted run logged after its checkpoint
      (the resumed run computes them again, with the same values when the resume is exact); no step is
      logged twice. A changed config is logged as ``config.resumed_at_<iteration>.yaml``; the parameters keep
      the first run's values (MLflow parameters cannot change).

    Args:
        output_dir: the run's folder (for the default store).
        config: the run's config (a CfgNode or a nested mapping), logged as parameters; None logs none.
        experiment_name: the MLflow experiment (created when missing).
        run_name: the MLflow run name (MLflow picks one when None).
        tracking_uri: the store; see above.
        window_size: window of the median for metrics with a smoothing hint.
        evaluation_results: called at ``close()``; the results it returns (``{"task": {"metric": value}}``, or
            None) are logged as the final evaluation. DefaultTrainer gives its last evaluation's results.
    """

    # MLflow's limits per log_batch call.
    _MAX_METRICS, _MAX_PARAMS = 1000, 100

    def __init__(
        self,
        output_dir: str,
        config: Optional[Mapping[str, Any]] = None,
        experiment_name: str = "trainkit",
        run_name: Optional[str] = None,
        tracking_uri: Optional[str] = None,
        window_size: int = 20,
        evaluation_results: Optional[Callable[[], Optional[Mapping[str, Any]]]] = None,
    ) -> None:
        super().__init__(output_dir, config, window_size, evaluation_results)
        self._experiment_name = experiment_name
        self._run_name = run_name
        self._tracking_uri = tracking_uri
        self._client: Any = None
        self._names: Dict[str, str] = {}  # scalar name -> MLflow metric name

    @property
    def tracking_uri(self) -> str:
        """The store this writer logs to (see the class docstring)."""
        default = "sqlite:///" + os.path.abspath(os.path.join(self._output_dir, "mlflow.db"))
        return self._tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default

    @property
    def run_id(self) -> Optional[str]:
        """The MLflow run's id (None before the first write of a fresh run)."""
        return self._run_id

    def _experiment_id(self) -> str:
        experiment = self._client.get_experiment_by_name(self._experiment_name)
        if experiment is not None:
            return experiment.experiment_id
        local = self._tracking_uri is None and not os.environ.get("MLFLOW_TRACKING_URI")
        location = None
        if local:  # beside the default store, not in the current directory
            location = "file://" + os.path.abspath(os.path.join(self._output_dir, "mlartifacts"))
        return self._client.create_experiment(self._experiment_name, artifact_location=location)

    def _start(self, resume: bool, start_iter: int) -> int:
        tracking = _import("mlflow.tracking", "mlflow")
        self._client = tracking.MlflowClient(tracking_uri=self.tracking_uri)
        if resume:
            run = self._client.get_run(self._run_id)
            self._client.update_run(self._run_id, status="RUNNING")
            self._client.log_text(self._run_id, self._config_text(), f"config.resumed_at_{start_iter}.yaml")
            logger.info("Continuing MLflow run %s in %s", self._run_id, self.tracking_uri)
            return max((m.step for key in run.data.metrics for m in self._client.get_metric_history(self._run_id, key)),
                       default=-1)
        run = self._client.create_run(self._experiment_id(), run_name=self._run_name)
        self._run_id = run.info.run_id
        if self._config is not None:
            entities = _import("mlflow.entities", "mlflow")
            params = [entities.Param(k, v) for k, v in sorted(flatten_config(self._config).items())]
            for i in range(0, len(params), self._MAX_PARAMS):
                self._client.log_batch(self._run_id, params=params[i : i + self._MAX_PARAMS])
            self._client.log_text(self._run_id, self._config_text(), "config.yaml")
        logger.info("Logging to MLflow run %s in %s", self._run_id, self.tracking_uri)
        return -1

    def _log(self, scalars_by_iter: Dict[int, Dict[str, float]]) -> None:
        entities = _import("mlflow.entities", "mlflow")
        now = int(time.time() * 1000)
        metrics: List[Any] = [
            entities.Metric(self._metric_name(name), value, now, itr) for itr, scalars in scalars_by_iter.items()
            for name, value in scalars.items()
        ]
        for i in range(0, len(metrics), self._MAX_METRICS):
            self._client.log_batch(self._run_id, metrics=metrics[i : i + self._MAX_METRICS])

    def _metric_name(self, name: str) -> str:
        # MLflow refuses names with other characters than these (the whole batch would fail): replace them.
        valid = self._names.get(name)
        if valid is None:
            valid = self._names[name] = re.sub(r"[^\w\-. :/]", "_", name)
            if valid != name:
                logger.warning("MLflow does not take the metric name %r: it is logged as %r.", name, valid)
        return valid

    def _finish(self, evaluation: Dict[str, Any], failed: bool) -> None:
        if evaluation:
            self._client.log_dict(self._run_id, evaluation, "final_evaluation.json")
        self._client.set_terminated(self._run_id, "FAILED" if failed else "FINISHED")


class WandbWriter(_TrackerWriter):
    """Logs to Weights & Biases (``pip install trainkit[wandb]``).

    W&B's own settings apply: ``WANDB_MODE`` (``offline`` writes the run under ``<output_dir>/wandb`` for a
    later ``wandb sync``; ``disabled`` logs nothing), ``WANDB_PROJECT``, ``WANDB_API_KEY`` and so on. The run
    holds the flattened config as its config and ``trainkit_config.yaml`` as a file, every scalar at
    ``step=iteration``, and what ``evaluation_results()`` returns at the end in its summary. A resumed run continues the same
    run id (``resume="allow"``) and starts after the last step the interrupted run wrote before its
    checkpoint.

    Args:
        output_dir: the run's folder; W&B's files go to ``<output_dir>/wandb``.
        config: the run's config (a CfgNode or a nested mapping); None logs none.
        project: the W&B project (``WANDB_PROJECT`` when None).
        run_name: the run's display name.
        window_size: window of the median for metrics with a smoothing hint.
        evaluation_results: called at ``close()``; its results go into the run's summary as
            ``final_evaluation`` (see :class:`MLflowWriter`).
        init_kwargs: more arguments of ``wandb.init`` (``entity``, ``tags``, ``group``, ...).
    """

    def __init__(
        self,
        output_dir: str,
        config: Optional[Mapping[str, Any]] = None,
        project: Optional[str] = None,
        run_name: Optional[str] = None,
        window_size: int = 20,
        evaluation_results: Optional[Callable[[], Optional[Mapping[str, Any]]]] = None,
        **init_kwargs: Any,
    ) -> None:
        super().__init__(output_dir, config, window_size, evaluation_results)
        self._project = project
        self._run_name = run_name
        self._init_kwargs = init_kwargs
        self._run: Any = None

    @property
    def run_id(self) -> Optional[str]:
        """The W&B run's id (None before the first write of a fresh run)."""
        return self._run_id

    def _start(self, resume: bool, start_iter: int) -> int:
        wandb = _import("wandb", "wandb")
        os.makedirs(self._output_dir, exist_ok=True)
        kwargs = dict(project=self._project, name=self._run_name, dir=self._output_dir, **self._init_kwargs)
        if resume:
            kwargs.update(id=self._run_id, resume="allow")
        elif self._config is not None:
            kwargs["config"] = flatten_config(self._config)
        self._run = wandb.init(**kwargs)
        self._run_id = self._run.id
        if not resume and self._config is not None:
            path = os.path.join(self._run.dir, "trainkit_config.yaml")  # W&B writes its own config.yaml
            with open(path, "w") as f:
                f.write(self._config_text())
            self._run.save(path, base_path=self._run.dir, policy="now")
        logger.info("Logging to W&B run %s (%s)", self._run_id, "continued" if resume else "new")
        # Online, a continued run knows its next step (offline it is 0): skip what the run already holds.
        return int(getattr(self._run, "step", 0) or 0) - 1 if resume else -1

    def _log(self, scalars_by_iter: Dict[int, Dict[str, float]]) -> None:
        for itr, scalars in scalars_by_iter.items():
            self._run.log(scalars, step=itr)

    def _finish(self, evaluation: Dict[str, Any], failed: bool) -> None:
        if evaluation:
            self._run.summary["final_evaluation"] = evaluation
        self._run.finish(exit_code=1 if failed else 0)
        self._run = None
