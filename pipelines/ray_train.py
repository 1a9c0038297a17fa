"""The fit: Ray Train (V2) driver and worker of the `pretrain` and `train` stages (and of `tune`'s trials).

``fit()`` connects to Ray (a local instance, or the cluster named by
``RAY_ADDRESS`` / ``train.ray_address``), checks that the requested workers can
be placed, and runs :func:`train_loop_per_worker` in a ``TorchTrainer`` with
``ScalingConfig`` / ``RunConfig(storage_path, name)`` / ``FailureConfig`` from
params. Every epoch each worker reports its metrics and rank 0 a checkpoint
(model, optimiser, label bank, epoch, RNG state); MLflow is written by a
driver-side callback only (pipelines/tracking.py). The worker is a loop over a
trainer's epochs (components/training/trainers.py). Joining Ray and checking the
workers fit: pipelines/cluster.py; the stages around a fit: pipelines/training_stage.py.

Called again with the same ``(storage_path, name)``, Ray Train resumes from the
last checkpoint.
"""

from __future__ import annotations

import logging
import resource
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import torch

from components.config import Params
from pipelines.cluster import check_resources, connect, resolve_cpus, storage_root
from pipelines.common import StageError

log = logging.getLogger("lrreid")


# ---------------------------------------------------------------------- driver side
def check_batch_fits(params: Params, pairs: pa.Table) -> None:
    """Fail before Ray starts when the training identities cannot fill one P x K batch on every worker."""
    import pyarrow.compute as pc

    t = params.train
    P, key = params.batch_identities()
    n = len(pc.unique(pairs["person_id"]))
    if n < P * t.num_workers:
        raise StageError(f"the split has {n} training identities with an (x_l, x_h) pair, but a batch needs "
                         f"{key} = {P} on each of train.num_workers = "
                         f"{t.num_workers}; lower {key}, or split.test_identities")


def fit(params: Params, *, phase: str, name: str, table: pa.Table, pairs: pa.Table, run_id: str | None,
        init_state: dict | None = None, naive_labels: bool | None = None, callbacks: list | None = None,
        validation: pa.Table | None = None, epoch_offset: int = 0, storage_path: str | None = None):
    """Run the TorchTrainer for one phase; returns (final training state dict, last metrics).

    ``run_id``: the MLflow run the epochs are logged to (None: not logged here, e.g. a
    Tune trial, whose driver logs). ``validation``: a split table whose query / gallery
    rows are scored on rank 0 after every epoch (val_rank1, val_mAP). ``epoch_offset``
    is added to ``epochs_done`` (a search's clock across pretrain and joint)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.tracking import make_train_callback, tracking_uri

    check_batch_fits(params, pairs)
    connect(params)
    params = resolve_cpus(params)  # cpus_per_worker "auto": this cluster's CPUs among the workers
    check_resources(params)
    t = params.train
    storage_path = storage_path or t.storage_path
    storage = storage_root(storage_path)
    config = {
        "params": params.model_dump(mode="json"),
        "phase": phase,
        "table": ray.put(table),
        "pairs": ray.put(pairs),
        "init_state": ray.put(init_state) if init_state is not None else None,
        "naive_labels": (t.label_refresh == "naive") if naive_labels is None else naive_labels,
        "validation": ray.put(validation) if validation is not None else None,
        "epoch_offset": epoch_offset,
    }
    callbacks = list(callbacks or [])
    if run_id is not None:
        callbacks.append(make_train_callback(run_id, tracking_uri()))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=t.num_workers, use_gpu=t.use_gpu,
            resources_per_worker={"CPU": t.cpus_per_worker, **({"GPU": t.gpus_per_worker} if t.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=name, storage_path=storage,
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
    )
    log.info("%s: %d worker(s) x %g CPU(s), storage %s/%s", phase, t.num_workers, t.cpus_per_worker, storage, name)
    result = trainer.fit()
    if result.error is not None:
        raise StageError(f"{phase} failed: {result.error}")
    metrics = dict(result.metrics or {})
    if metrics.get("stopped"):  # a NaN loss or a broken precision: the worker's stop report says why
        raise StageError(f"{phase} stopped: {metrics.get('error')}")
    if result.checkpoint is None:
        raise StageError(f"{phase} finished without a checkpoint in {storage}/{name}")
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)
    if run_id is not None:
        backfill_history(run_id, state["extra"].get("history", []))
    return state, metrics


def backfill_history(run_id: str, history: list[dict]) -> None:
    """Log epochs the callback missed (the driver died between a checkpoint and its MLflow write)."""
    from pipelines.tracking import log_metrics, logged_epochs

    seen = logged_epochs(run_id)
    for metrics in history:
        epoch = int(metrics["epoch"])
        if epoch not in seen:
            log.info("MLflow: logging epoch %d from the checkpoint's history", epoch)
            log_metrics(run_id, metrics, step=epoch)


# ---------------------------------------------------------------------- worker side
def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: its data shard and trainer (components/training/trainers.py), resume
    from Train's checkpoint, then one report (rank 0: with a checkpoint) per epoch."""
    import ray.train

    from components.precision import PrecisionError, guard_onednn
    from components.training.engine import agree_on_precision
    from components.training import NonFiniteLossError

    capped = guard_onednn()  # before this process's first convolution
    params = Params.model_validate(config["params"])
    threads = set_threads(params)
    trainer, rank = worker_trainer(config, params)
    resumed = resume_from_train(trainer, rank)
    if capped and rank == 0:
        log.info("%s", capped)
    try:
        choice, error = trainer.choose_precision(params.train.precision), None
    except PrecisionError as exc:
        choice, error = None, str(exc)
    choice, error = agree_on_precision(choice, error, trainer.device)  # every rank the same precision, or the same stop
    if error is not None:  # before training; the driver raises it as a StageError
        report_stop(error, -1, rank, None)
        return
    precision = choice.precision
    if rank == 0:  # what the stage runs, and why: its log line, and (in every report) its MLflow tags
        log.info("[%s] precision %s; %d torch thread(s) per worker x %d worker(s)", trainer.phase, choice,
                 threads, params.train.num_workers)
    run_info = {"precision": precision, "precision_reason": choice.reason, "torch_threads": threads}
    validation = validation_set(config, rank)
    train_start_unix = time.time()  # the first step is next: a search's scheduling overhead ends here
    if resumed and trainer.history:  # the checkpointed epoch's result once more, for a driver that
        # died before it got it (MLflow and Tune skip an epoch they have seen); this run's start time
        ray.train.report({**trainer.history[-1], **run_info, "train_start_unix": train_start_unix})
    saved = None  # rank 0: the folder of the last epoch's checkpoint (a stop report re-sends it)
    for epoch in range(trainer.next_epoch, trainer.epochs):
        start = time.perf_counter()
        try:
            metrics = trainer.train_epoch(epoch, precision)
        except NonFiniteLossError as exc:  # stop now: a retry from the checkpoint would fail the same way
            report_stop(f"{exc} (precision {precision}); {NAN_HINT[precision]}", epoch, rank, saved)
            return
        metrics.update(run_info, epoch=epoch, epochs_done=config.get("epoch_offset", 0) + epoch + 1,
                       train_start_unix=train_start_unix, epoch_seconds=time.perf_counter() - start,
                       peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # Linux: KiB
        if validation is not None:  # rank 0 only: the others wait at the next step's all-reduce
            metrics.update(trainer.validate(validation))
        trainer.end_epoch(epoch, metrics)
        saved = report_epoch(trainer, metrics, rank, saved)
    if saved:
        shutil.rmtree(saved, ignore_errors=True)


def set_threads(params: Params) -> int:
    """A CPU worker's torch threads: its train.cpus_per_worker (resolved from "auto" by the driver,
    pipelines/cluster.py), at least one. A GPU worker keeps torch's default."""
    if not params.train.use_gpu:
        torch.set_num_threads(max(1, int(float(params.train.cpus_per_worker))))
    return torch.get_num_threads()


def worker_trainer(config: dict, params: Params):
    """This worker's shard of the training pairs and its trainer (DDP-wrapped by Train); returns
    (trainer, world rank)."""
    import ray
    import ray.train
    import ray.train.torch

    from components.data.dataset import make_train_loader
    from components.training.trainers import make_trainer

    t = params.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(t.seed * 1000 + rank)
    loader = make_train_loader(ray.get(config["table"]), ray.get(config["pairs"]), scales=params.model.scales,
                               P=params.batch_identities()[0], K=t.images_per_identity, flip_p=t.flip_p,
                               seed=t.seed, num_workers=t.loader_workers, num_replicas=world, rank=rank)
    init = config.get("init_state")
    trainer = make_trainer(params, config["phase"], loader, device=ray.train.torch.get_device(), rank=rank,
                           wrap=ray.train.torch.prepare_model, init_state=ray.get(init) if init is not None else None,
                           naive_labels=config["naive_labels"])
    return trainer, rank


def resume_from_train(trainer, rank: int) -> bool:
    """Load Train's latest checkpoint into ``trainer`` (a restarted worker group, or the stage run
    again after a crash); False where there is none."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return False
    with checkpoint.as_directory() as d:
        if (Path(d) / "state.pt").exists():  # a stop before the first epoch's end leaves none
            trainer.resume(Path(d) / "state.pt")
    if rank == 0:
        log.info("[%s] resuming after epoch %d", trainer.phase, trainer.next_epoch)
    return True


def validation_set(config: dict, rank: int):
    """Rank 0's validation hold-out (a TestSet with one gallery draw), or None."""
    import ray

    if config.get("validation") is None or rank != 0:
        return None
    from components.evaluation import load_test_set

    return load_test_set(ray.get(config["validation"]), 1, source="the validation hold-out")


def report_epoch(trainer, metrics: dict, rank: int, saved: str | None) -> str | None:
    """Report an epoch to Train; rank 0 with a checkpoint of the trainer's state (the previous one's
    folder is removed once Train has it). Returns rank 0's new checkpoint folder."""
    import ray.train
    from ray.train import Checkpoint

    if rank != 0:
        ray.train.report(metrics)
        return saved
    # logging, not print: Train V2 tees a worker's print to stdout and to its logger (every line twice)
    log.info("[%s] epoch %d/%d  loss %.4f  %.1f samples/s  %.1f s", trainer.phase, metrics["epoch"] + 1,
             trainer.epochs, metrics["L"], metrics["samples_per_s"], metrics["epoch_seconds"])
    folder = tempfile.mkdtemp(prefix="lrreid-ckpt-")
    trainer.state.save(Path(folder) / "state.pt")
    ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder))
    if saved:
        shutil.rmtree(saved, ignore_errors=True)
    return folder


NAN_HINT = {
    "bf16": "try train.precision: fp32 (bf16 kernels of some CPUs return NaN), then lower learning rates",
    "fp16": "try train.precision: bf16 or fp32 (fp16 overflows), then lower learning rates",
    "fp32": "try lower train.lr_backbone / train.lr_head, or a smaller loss weight",
}


def report_stop(message: str, epoch: int, rank: int, saved: str | None) -> None:
    """End a Train run with an error the driver raises: rank 0 re-sends the last epoch's checkpoint
    (or an empty one) with the message, so it is the run's result (Train V2's result holds the
    metrics of the latest checkpoint) and a re-run resumes after the last good epoch."""
    import ray.train
    from ray.train import Checkpoint

    metrics = {"epoch": epoch, "stopped": 1.0, "error": message}
    if rank != 0:
        ray.train.report(metrics)
        return
    folder = saved or tempfile.mkdtemp(prefix="lrreid-ckpt-")
    (Path(folder) / "stopped.txt").write_text(message + "\n")
    ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder))
    shutil.rmtree(folder, ignore_errors=True)

