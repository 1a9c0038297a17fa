"""PRI as an MLflow pyfunc model: what the registry stores and `lrreid query` loads.

The logged model holds two artifacts: ``weights`` (models/model.pt, read with
``components.training.load_weights_file``, i.e. ``torch.load(weights_only=True)``)
and ``params`` (a JSON dump of the ``model:`` section of params.yaml). It is logged
as MLflow "models from code" (nothing pickled; pipelines/registry.py
``log_reid_model``): its code is a three-line entry file that sets
:class:`LRReIDModel`, plus the repository's ``components`` and ``pipelines``
packages (``code_paths``), so ``mlflow.pyfunc.load_model("models:/lrreid-pri@champion")``
works in a fresh process with torch, torchvision, pydantic and Pillow installed.

Input: one float32 numpy batch ``[B, 3, H, W]``, RGB in [0, 1], all images of ONE
size per call (a caller with images of several sizes groups them by size, or
resizes them, and calls once per group: ``lrreid query`` does this). No resize
is needed beforehand: P and F resize to their input sizes inside, and G recovers
the probe at the predicted scale.

Params (``params={"role": ...}``):

- ``probe`` (default): low-resolution probes. p = softmax P(x_l) (PRI Eq. 1),
  r_p = argmax p, x_l recovered by G at r_p, embedded by F.
- ``gallery``: high-resolution images, embedded by F only (no P, no G).

Output: a dict of numpy arrays

- ``embedding`` [B, D] float32: compare with Euclidean distances (as evaluate does);
- ``r_p`` [B] float32: the scale factor used (1.0 for every gallery image);
- ``scale_probs`` [B, N] float32: P's probabilities over ``model.scales``
  (for ``gallery``: NaN, since P is not run on HR images).

The model's metadata (``PyFuncModel.metadata.metadata``) records ``scales``,
``input_height`` / ``input_width`` (F's input size, the HR size) and
``feature_dim``.
"""

from __future__ import annotations

import json

import mlflow.pyfunc
import numpy as np

ROLES = ("probe", "gallery")
WEIGHTS_ARTIFACT = "weights"
PARAMS_ARTIFACT = "params"


def inference_params(model_section: dict):
    """The ``model:`` section (a dict) -> ModelParams, without the local weight files.

    ``model.backbone_weights`` and ``model.sr.weights`` name files on the machine
    that trained the model; the trained state dict replaces those weights anyway,
    so the model is built without them (they need not exist where it is loaded).
    """
    from components.config import ModelParams

    d = dict(model_section)
    d = {**d, "backbone_weights": None, "sr": {**d.get("sr", {}), "weights": None}}
    return ModelParams.model_validate(d)


def feature_dim(cfg) -> int:
    """D of F's embedding: model.feature_dim, or model.rife.feature_dim when F is RIFE."""
    return int(cfg.rife.feature_dim if cfg.reid == "rife" else cfg.feature_dim)


def lr_size(cfg) -> tuple[int, int]:
    """A typical LR probe size: F's input (the HR size) down-sampled by 4."""
    return max(1, cfg.input_height // 4), max(1, cfg.input_width // 4)


def signature(cfg):
    """Tensor input [-1, 3, -1, -1] float32; outputs embedding / r_p / scale_probs; param ``role``."""
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    f32 = np.dtype(np.float32)
    return ModelSignature(
        inputs=Schema([TensorSpec(f32, (-1, 3, -1, -1))]),
        outputs=Schema([
            TensorSpec(f32, (-1, feature_dim(cfg)), "embedding"),
            TensorSpec(f32, (-1,), "r_p"),
            TensorSpec(f32, (-1, len(cfg.scales)), "scale_probs"),
        ]),
        params=ParamSchema([ParamSpec("role", "string", "probe")]),
    )


def input_example(cfg, batch: int = 2, seed: int = 0) -> np.ndarray:
    """A small random probe batch at the LR size (HR size / 4)."""
    h, w = lr_size(cfg)
    return np.random.default_rng(seed).random((batch, 3, h, w), dtype=np.float32)


def metadata(cfg) -> dict:
    return {"scales": [float(s) for s in cfg.scales], "input_height": int(cfg.input_height),
            "input_width": int(cfg.input_width), "feature_dim": feature_dim(cfg),
            "input": "float32 [B, 3, H, W] RGB in [0, 1], one size per call",
            "roles": list(ROLES)}


class LRReIDModel(mlflow.pyfunc.PythonModel):
    """PRI (P, G, F) for inference; see the module docstring for input, params and output."""

    def load_context(self, context):
        import torch

        from components.models import build_model
        from components.training import load_weights_file

        with open(context.artifacts[PARAMS_ARTIFACT]) as f:
            cfg = inference_params(json.load(f))
        state, meta = load_weights_file(context.artifacts[WEIGHTS_ARTIFACT])
        if "num_classes" not in meta:
            raise ValueError(f"{context.artifacts[WEIGHTS_ARTIFACT]}: its meta has no num_classes "
                             "(not written by the train stage)")
        pri = build_model("pri", cfg, int(meta["num_classes"]))
        pri.load_state_dict(state, strict=True)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.pri = pri.to(self.device).eval()
        self.cfg = cfg

    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> dict[str, np.ndarray]:
        import torch

        role = (params or {}).get("role") or "probe"
        if role not in ROLES:
            raise ValueError(f"role = {role!r}: use 'probe' (LR, P + G + F) or 'gallery' (HR, F only)")
        x = np.asarray(model_input, dtype=np.float32)
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"input of shape {x.shape}: expected one float32 batch [B, 3, H, W] "
                             "(group images by size, one call per size)")
        B, N = x.shape[0], len(self.cfg.scales)
        if B == 0:
            return {"embedding": np.zeros((0, feature_dim(self.cfg)), np.float32),
                    "r_p": np.zeros((0,), np.float32), "scale_probs": np.zeros((0, N), np.float32)}
        t = torch.from_numpy(np.ascontiguousarray(x)).to(self.device)
        with torch.no_grad():
            if role == "gallery":
                feature = self.pri.embed_gallery(t)
                r_p = torch.ones(B)
                probs = torch.full((B, N), float("nan"))
            else:
                feature, r_p, probs = self.pri.embed_probe(t)  # Adaptive: r_p = argmax P(x_l)
        return {"embedding": feature.float().cpu().numpy(),
                "r_p": r_p.float().cpu().numpy(),
                "scale_probs": probs.float().cpu().numpy()}

    def recover_all(self, x: np.ndarray) -> list[np.ndarray]:
        """G's recoveries of ONE probe [3, H, W] at every scale of model.scales, as [3, rH, rW]
        arrays in [0, 1] (for pictures; reach it with ``PyFuncModel.unwrap_python_model()``)."""
        import torch

        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None].to(self.device)
        with torch.no_grad():
            return [self.pri.G(t, float(r))[0].clamp(0, 1).float().cpu().numpy() for r in self.pri.scales]
