"""Ray Train (V2) driver shared by the `pretrain` and `train` stages.

``fit()`` connects to Ray (a local instance, or the cluster named by
``RAY_ADDRESS`` / ``train.ray_address``), checks that the requested workers can
be placed, and runs :func:`train_loop_per_worker` in a ``TorchTrainer`` with
``ScalingConfig`` / ``RunConfig(storage_path, name)`` / ``FailureConfig`` from
params. Every epoch each worker reports its metrics and rank 0 a checkpoint
(model, optimiser, label bank, epoch, RNG state); MLflow is written by a
driver-side callback only (pipelines/tracking.py). Joining Ray and checking
the workers fit: pipelines/cluster.py.

The run name is the stage plus a hash of its params, inputs and code, so running
the stage again after a crash re-creates the trainer with the same
``(storage_path, name)`` and Ray Train resumes from the last checkpoint, while
changed params, data or code start a new run.
"""

from __future__ import annotations

import logging
import math
import resource
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import torch

from components.config import Params
from pipelines.cluster import check_resources, connect, storage_root
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
    log.info("%s: %d worker(s), storage %s/%s", phase, t.num_workers, storage, name)
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
def epoch_step(params: Params, phase: str, epoch: int) -> tuple[str, int]:
    """The training step an epoch of ``phase`` belongs to, and the epoch's position in it.

    PRI: the step is the phase. FFSR + RIFE (Sec. 5.2): pretrain = step 1 "ffsr"
    (ffsr_rife.ffsr.epochs) then step 2 "rife" (ffsr_rife.rife.epochs); joint = step 3 "joint".
    """
    if params.train.model == "pri" or phase == "joint":
        return phase, epoch
    n_ffsr = params.ffsr_rife.ffsr.epochs
    return ("ffsr", epoch) if epoch < n_ffsr else ("rife", epoch - n_ffsr)


def step_optim(params: Params, step: str):
    """The OptimSpec of a training step (components/optim.py)."""
    from components.optim import pri_spec, step_spec

    if params.train.model == "pri":
        return pri_spec(params.train, step)
    return step_spec(getattr(params.ffsr_rife, step))


def phase_epochs(params: Params, phase: str) -> int:
    t, s = params.train, params.ffsr_rife
    if t.model == "ffsr_rife":
        return s.joint.epochs if phase == "joint" else s.ffsr.epochs + s.rife.epochs
    return t.epochs if phase == "joint" else t.pretrain_epochs


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: data shard, model (DDP), resume, one report + checkpoint per epoch."""
    import ray
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    from components.data.dataset import make_train_loader
    from components.models import build_model
    from components.soft_label import LabelBank
    from components.precision import PrecisionError, guard_onednn
    from components.optim import make_optimizer, set_epoch_lr
    from components.models import unwrap
    from components.training import (NonFiniteLossError, TrainingState, refresh_label_bank, run_ffsr_rife_epoch,
                                     run_pri_epoch, tracked_scales)

    capped = guard_onednn()  # before this process's first convolution
    params = Params.model_validate(config["params"])
    phase = config["phase"]
    m, t = params.model, params.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(t.seed * 1000 + rank)
    table, pairs = ray.get(config["table"]), ray.get(config["pairs"])
    loader = make_train_loader(table, pairs, scales=m.scales, P=params.batch_identities()[0], K=t.images_per_identity,
                               flip_p=t.flip_p, seed=t.seed, num_workers=t.loader_workers,
                               num_replicas=world, rank=rank)
    dataset = loader.dataset
    joint = phase == "joint"
    pri = t.model == "pri"
    model = build_model(t.model, m, dataset.num_classes, with_predictor=joint)
    if config.get("init_state") is not None:  # joint training starts from the pretrained weights
        missing, unexpected = model.load_state_dict(ray.get(config["init_state"]), strict=False)
        bad = [k for k in missing if not k.startswith("P.")] + list(unexpected)
        if bad:
            raise ValueError(f"pretrained weights do not fit the model: {bad[:5]}")
    if pri:
        model = ray.train.torch.prepare_model(model.to(device))  # DDP when num_workers > 1
    else:  # FFSR and RIFE are called separately: each gets its own DDP wrapper
        model = model.to(device)
        ffsr, rife = (ray.train.torch.prepare_model(part) for part in (model.ffsr, model.rife))

    def step_optimizer(step: str):  # a step trains what its loss reaches: FFSR + RIFE's steps 1-2 one part each
        part = unwrap(model) if pri or step == "joint" else getattr(unwrap(model), step)
        return make_optimizer(part, step_optim(params, step))

    checkpoint = ray.train.get_checkpoint()
    resumed = -1  # the checkpoint's last finished epoch: its step's optimiser is the one to restore
    if checkpoint:
        with checkpoint.as_directory() as d:
            if (Path(d) / "state.pt").exists():  # a stop before the first epoch's end leaves none
                resumed = TrainingState.peek(Path(d) / "state.pt")["epoch"]
    step = epoch_step(params, phase, max(resumed, 0))[0]
    optimizer = step_optimizer(step)
    bank = None
    if pri and joint:
        bank = LabelBank(len(dataset), len(m.scales), m.omega, kind=m.label, gamma=m.gamma, seed=t.seed)
    generator = torch.Generator().manual_seed(t.seed + rank)  # pretrain: the random scale of x_l
    state = TrainingState(unwrap(model), optimizer, bank, phase=phase)
    if checkpoint:  # a restarted worker group, or the stage run again after a crash
        with checkpoint.as_directory() as d:
            if (Path(d) / "state.pt").exists():  # a stop before the first epoch's end leaves none
                state.load(Path(d) / "state.pt")
        if "generator" in state.extra:
            generator.set_state(state.extra["generator"])
        if rank == 0:
            log.info("[%s] resuming after epoch %d", phase, state.epoch + 1)
    if capped and rank == 0:
        log.info("%s", capped)
    saved = None  # rank 0: the folder of the last epoch's checkpoint (a stop report re-sends it)
    try:
        precision = worker_precision(model, loader, phase, device, t.precision)
    except PrecisionError as exc:  # before training; the driver raises it as a StageError
        report_stop(str(exc), -1, rank, saved)
        return
    epochs = phase_epochs(params, phase)
    validation = None
    if config.get("validation") is not None and rank == 0:
        from components.evaluation import load_test_set

        validation = load_test_set(ray.get(config["validation"]), 1, source="the validation hold-out")
    train_start_unix = time.time()  # the first step is next: a search's scheduling overhead ends here
    if checkpoint and state.extra.get("history"):  # the checkpointed epoch's result once more, for a driver
        # that died before it got it (MLflow and Tune skip an epoch they have seen); this run's start time
        ray.train.report({**state.extra["history"][-1], "train_start_unix": train_start_unix})
    for epoch in range(state.epoch + 1, epochs):
        start = time.perf_counter()
        extra = {}
        current, epoch_in_step = epoch_step(params, phase, epoch)
        if current != step:  # a new step: its own optimiser, from its first epoch
            step = current
            optimizer = state.optimizer = step_optimizer(step)
        set_epoch_lr(optimizer, step_optim(params, step), epoch_in_step)
        try:
            if pri:
                if bank is not None and not config["naive_labels"] and bank.should_refresh(epoch):
                    extra["refresh_seconds"] = refresh_label_bank(unwrap(model), dataset, bank, epoch,
                                                                  device=device, precision=precision)
                metrics = run_pri_epoch(model, loader, optimizer, phase=phase, epoch=epoch, loss=params.loss,
                                        bank=bank, naive_labels=config["naive_labels"], device=device,
                                        precision=precision, generator=generator)
            else:
                metrics = run_ffsr_rife_epoch(ffsr, rife, loader, optimizer,
                                              step=step, epoch=epoch,
                                              loss=params.loss, device=device, precision=precision,
                                              hr_width=params.degrade.hr_width, sigma=m.ffsr.sigma)
        except NonFiniteLossError as exc:  # stop now: a retry from the checkpoint would fail the same way
            report_stop(f"{exc} (precision {precision}); {NAN_HINT[precision]}", epoch, rank, saved)
            return
        metrics.update(extra, epoch=epoch, epochs_done=config.get("epoch_offset", 0) + epoch + 1,
                       train_start_unix=train_start_unix,
                       epoch_seconds=time.perf_counter() - start,
                       peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # Linux: KiB
        if validation is not None:  # rank 0 only: the others wait at the next step's all-reduce
            from components.evaluation import validate, validate_ffsr_rife

            if pri:
                metrics.update(validate(unwrap(model), validation, hr_height=params.degrade.hr_height, device=device))
            else:
                metrics.update(validate_ffsr_rife(unwrap(model), validation, device=device,
                                                  hr_size=(params.degrade.hr_height, params.degrade.hr_width)))
        if bank is not None:
            metrics["label_bank_entropy"] = bank.entropy()
            # what a predictor that learned nothing scores: L_p of the uniform P, the flattest labels
            metrics["L_p_uniform"] = metrics["label_bank_entropy_max"] = math.log(len(m.scales))
            metrics.update(tracked_scales(model, dataset, bank, t.track_images, device=device, precision=precision))
        state.epoch = epoch
        state.extra["generator"] = generator.get_state()
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        state.extra["history"] = list(state.extra.get("history", [])) + [numeric]  # for MLflow backfill
        if rank == 0:
            # logging, not print: Train V2 tees a worker's print to stdout and to its logger (every line twice)
            log.info("[%s] epoch %d/%d  loss %.4f  %.1f samples/s  %.1f s", phase, epoch + 1, epochs,
                     metrics["L"], metrics["samples_per_s"], metrics["epoch_seconds"])
        if rank == 0:
            previous, saved = saved, tempfile.mkdtemp(prefix="lrreid-ckpt-")
            state.save(Path(saved) / "state.pt")
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(saved))
            if previous:
                shutil.rmtree(previous, ignore_errors=True)
        else:
            ray.train.report(metrics)
    if saved:
        shutil.rmtree(saved, ignore_errors=True)


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


def worker_precision(model, loader, phase: str, device, requested: str) -> str:
    """train.precision on this worker's device; bf16 on a CPU only where it matches fp32 on the model's
    own layers and one real batch's shapes (components.precision)."""
    from components.models.pri import PRI
    from components.precision import bf16_fault, checked_precision, layer_inputs
    from components.models import unwrap

    net = unwrap(model)

    def forward():
        batch = next(iter(loader)).to(device)
        if isinstance(net, PRI):
            return net(batch, mode=phase, generator=torch.Generator().manual_seed(0))
        x = torch.cat([batch.x_h, batch.x_h])  # FFSR and RIFE see 2B images of the HR size
        return net.ffsr(x, tuple(batch.x_h.shape[-2:])), net.rife(x)

    return checked_precision(device, requested, lambda: bf16_fault(layer_inputs(net, forward), device))


# ---------------------------------------------------------------------- one stage
def _md5(path: Path) -> str:
    import hashlib

    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_r_p_history(history: list[dict], path: Path) -> None:
    """The tracked images' r_p and optimal scale per joint epoch (PRI Fig. 3), as a DVC plots CSV."""
    import csv

    from components.fsutil import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "image", "r_p", "r_opt"])
        for metrics in history:
            for key, value in sorted(metrics.items()):
                if key.startswith("r_p/"):
                    image = key[len("r_p/"):]
                    w.writerow([int(metrics["epoch"]), image, value, metrics.get(f"r_opt/{image}", "")])


CURVE_COLUMNS = ("epoch", "L", "L_id", "L_tri", "L_sr", "L_p", "val_rank1", "val_mAP", "lr_backbone", "lr_head",
                 "L_ffsr", "L_x", "L_r")  # the last three: FFSR + RIFE


def write_curve(history: list[dict], path: Path) -> None:
    """One row per epoch: the losses, the validation rank-1 / mAP and the rates (a DVC plots CSV)."""
    import csv

    from components.fsutil import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CURVE_COLUMNS)
        for metrics in history:
            w.writerow([int(metrics["epoch"])] + [metrics.get(k, "") for k in CURVE_COLUMNS[1:]])


def read_curve(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def code_md5() -> str:
    """md5 of the package's Python sources: changed code is a new Ray run, never a resumed old one."""
    import hashlib

    root = Path(__file__).resolve().parents[1]
    h = hashlib.md5()
    for path in sorted([*root.glob("components/**/*.py"), *root.glob("pipelines/**/*.py")]):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def run_stage(params: Params, *, phase: str, split_dir: Path, out: Path, report: Path,
              init: Path | None = None, variant: str | None = None) -> dict:
    """Train one phase end to end: MLflow run, Ray Train fit, final weights + metrics JSON (the DVC outs).
    ``variant``: an ablation variant (params already carry its overrides; only tags and the r_p plot differ)."""
    from components.data import table as T
    from components.data.splits import training_rows
    from components.fsutil import write_json
    from components.training import load_weights_file, save_weights_dict
    from pipelines import tracking

    split_file, pairs_file = split_dir / "split.parquet", split_dir / "pairs.parquet"
    table, pairs, validation = training_rows(T.read_table(split_file, T.SPLIT_SCHEMA),
                                             T.read_table(pairs_file, T.PAIRS_SCHEMA),
                                             n_val=params.split.val_identities, seed=params.split.seed)
    init_state = None
    inputs = {"split": _md5(split_file), "pairs": _md5(pairs_file), "code": code_md5(),
              "val_identities": params.split.val_identities}
    if init is not None:
        init_state, _ = load_weights_file(init)
        inputs["init"] = _md5(init)
    sections = params.model_dump(mode="json")
    key = {k: sections[k] for k in ("model", "loss", "train", "ffsr_rife")} | {"phase": phase, "inputs": inputs}
    name = f"{phase}-{tracking.params_hash(key)}"
    tags = {"stage": phase, "ray_run": name, "model": params.train.model, "variant": variant or "main"}
    run_id = tracking.start_run(phase if variant is None else f"{phase}-{variant}", sections,
                                Path(".lrreid") / "runs" / f"{name}.mlflow_run_id", tags=tags)
    started = time.perf_counter()
    try:
        state, metrics = fit(params, phase=phase, name=name, table=table, pairs=pairs, run_id=run_id,
                             init_state=init_state, validation=validation)
    except BaseException:
        tracking.end_run(run_id, "FAILED")
        raise
    meta = {"phase": phase, "model": params.train.model, "num_classes": int(len(set(table[T.PERSON_ID].to_pylist()))),
            "epochs": int(state["epoch"]) + 1, "mlflow_run_id": run_id, "ray_run": name, "variant": variant or ""}
    save_weights_dict(state["model"], out, meta)
    history = state["extra"].get("history", [])
    # losses and validation rank-1 per epoch (the main model's: evaluate draws them)
    write_curve(history, Path(report).parent / ("plots" if variant is None else "") / f"{phase}_curve.csv")
    if phase == "joint" and params.train.model == "pri" and variant is None:  # the main model's Fig. 3
        write_r_p_history(history, Path(report).parent / "plots" / "r_p_history.csv")
    summary = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    summary["wall_seconds"] = time.perf_counter() - started
    write_json(report, summary)
    tracking.log_artifact(run_id, report)
    tracking.end_run(run_id)
    log.info("wrote %s and %s (MLflow run %s)", out, report, run_id)
    return summary
