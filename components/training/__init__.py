"""The training engine: one epoch of PRI or FFSR + RIFE, label refresh, checkpoints.

- ``trainers.py``: one trainer per model family, what a driver calls;
- ``pri.py``: PRI's losses and epoch; ``labels.py``: its soft labels (per batch, the
  bank's refresh, tracked scales); ``ffsr_rife.py``: FFSR + RIFE's epoch of each step;
  ``engine.py``: what the loops share (NaN check, backward step, meter);
  ``state.py``: checkpoints and final weights.

Framework-free (no Ray, MLflow or DVC); precision (autocast, the bf16 check) is
components/precision.py. ``trainers.py`` holds one trainer per model family (model,
schedule, optimiser per step, label bank, state); a driver such as the Ray Train
worker (pipelines/ray_train.py) only loops::

    trainer = make_trainer(params, phase, loader, device=device)   # components/training/trainers.py
    for epoch in range(trainer.next_epoch, trainer.epochs):
        metrics = trainer.train_epoch(epoch, precision)   # its step's optimiser and rates, label refresh
        trainer.end_epoch(epoch, metrics)
        trainer.state.save(path)                           # TrainingState: a checkpoint

Where the papers' equations are:

- PRI (Han et al.), :func:`pri_losses`: L_sr (Eq. 2), L_id, L_tri (Eq. 5), L_p (Eq. 4)
  with the soft labels of Eq. 3, total L (Eq. 6). Pre-training (Sec. 3.5) drops P and L_p
  and recovers x_l at a random scale; joint training recovers x_l at r_p = argmax P(x_l)
  (Eq. 1). Optimisers and learning-rate schedules of every step: components/optim.py.
  With RIFE as F ("RIFE + PRI") the resolution weighting loss (FFSR paper Eq. 7) is added.
- FFSR + RIFE (Mao et al.), :func:`run_ffsr_rife_epoch`: the three training steps of
  Sec. 5.2: L^FFSR (Eq. 5, each SR image against its own HR image), L^RIFE = L^X +
  beta sum_t L^R_t (Eq. 7-9) on FFSR's outputs (Eq. 3), jointly L^FFSR + alpha L^RIFE
  (Eq. 4). Resolution r = width / width_max (Sec. 3).

Losses are computed in fp32 outside autocast; a NaN / inf stops training with
:class:`NonFiniteLossError` naming epoch, step and term (engine.py).

Checkpoints (:class:`TrainingState`) and final weights (:func:`save_weights`) hold plain
tensors and python values only: they are written atomically and read with
``torch.load(weights_only=True)``.
"""

from components.training.engine import NonFiniteLossError  # noqa: F401
from components.training.ffsr_rife import FFSR_RIFE_STEPS, run_ffsr_rife_epoch  # noqa: F401
from components.training.labels import batch_labels, refresh_label_bank, tracked_scales  # noqa: F401
from components.training.pri import pri_losses, run_pri_epoch  # noqa: F401
from components.training.state import (STATE_FORMAT, WEIGHTS_FORMAT, TrainingState, load_weights_file,  # noqa: F401
                                       save_weights, save_weights_dict)
