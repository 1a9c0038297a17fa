"""The one config schema: params.yaml, validated before any stage does work.

``load_params()`` reads params.yaml into typed pydantic models. Any bad value
(unknown key, wrong type, even gamma, scales not ascending...) raises
:class:`ParamsError` whose message is one line naming the key, the value and
what is allowed, e.g.::

    params.yaml: model.gamma = 2 is not allowed: 0, an odd integer (1, 3, 5...) or the reciprocal of one (1/3, 1/5...)

Later stages add their own sections here; nothing reads params.yaml elsewhere.
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path
import os
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

LAYOUTS = ("synthetic", "market1501", "dukemtmc", "cuhk03", "msmt17", "viper", "caviar")  # data.layout
CUHK03_VARIANTS = ("labeled", "detected")  # data.cuhk03_variant

# The standard number of test identities of each dataset's LR protocol
# (PRI Sec. 4.1, FFSR Sec. 5.1); split.test_identities = null picks these.
STANDARD_TEST_IDENTITIES = {
    "market1501": 750,
    "dukemtmc": 702,
    "cuhk03": 100,
    "msmt17": 3060,
    "viper": 316,
    "caviar": 25,
}


class ParamsError(ValueError):
    """params.yaml holds a value no stage can use; the message is one line."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_scales(v: list[float], name: str) -> list[float]:
    if not v:
        raise ValueError(f"a non-empty ascending list of {name} >= 1, e.g. [1, 2, 3, 4]")
    if any(s < 1 for s in v):
        raise ValueError(f"{name} >= 1 only (a value < 1 would up-sample)")
    if any(b <= a for a, b in zip(v, v[1:])):
        raise ValueError(f"{name} in strictly ascending order, e.g. [2, 3, 4]")
    return v


class SyntheticParams(_Section):
    """The procedural default dataset written to data/raw by `lrreid synthesize`."""

    seed: int = 0
    identities: int = Field(300, ge=4)  # the demo's size (presets/claim.yaml: the claim run's)
    train_identities: int = Field(200, ge=2)  # the layout's own bounding_box_train share
    cameras: int = Field(2, ge=2, le=9)
    images_per_camera: int = Field(4, ge=1)
    height: int = Field(128, ge=32)
    width: int = Field(64, ge=16)

    @model_validator(mode="after")
    def _train_fits(self):
        if self.train_identities >= self.identities:
            raise ValueError(
                f"train_identities ({self.train_identities}) must be smaller than identities ({self.identities})"
            )
        return self


class DataParams(_Section):
    layout: Literal[LAYOUTS] = "synthetic"  # type: ignore[valid-type]
    cuhk03_variant: Literal[CUHK03_VARIANTS] = "labeled"  # type: ignore[valid-type]
    synthetic: SyntheticParams = SyntheticParams()


class DegradeParams(_Section):
    """Low-resolution protocols: MLR (SING), VR (FFSR) or genuine LR (CAVIAR)."""

    protocol: Literal["mlr", "vr", "genuine"] = "mlr"
    seed: int = 0
    hr_height: int = Field(64, ge=16)  # canonical HR size (MLR / genuine HR camera)
    hr_width: int = Field(32, ge=8)
    scales: list[float] = [2, 3, 4]  # MLR down-sampling factors r, drawn uniformly
    width_range: tuple[int, int] = (8, 32)  # VR: target width drawn from [lo, hi)
    lr_camera: int | Literal["auto"] = "auto"  # genuine: the LR camera; auto = smaller images
    # sensor noise of the LR camera: Gaussian sigma (8-bit levels) added to an LR image after its
    # down-sampling, one level drawn uniformly per image, independent of r; [] = none
    lr_noise: list[float] = []

    @field_validator("lr_noise")
    @classmethod
    def _lr_noise(cls, v):
        if any(not (0 <= s <= 128) for s in v):
            raise ValueError("sigmas in [0, 128] (8-bit levels), e.g. [0, 8, 24]; [] for no noise")
        return v

    @field_validator("scales")
    @classmethod
    def _scales(cls, v):
        return _check_scales(v, "down-sampling factors")

    @field_validator("width_range")
    @classmethod
    def _width_range(cls, v):
        if not (1 <= v[0] < v[1]):
            raise ValueError("[lo, hi) with 1 <= lo < hi, e.g. [8, 32]")
        return v


class SplitParams(_Section):
    seed: int = 0  # one identity split per seed; the paper's ten re-splits are ten seeds
    test_identities: int | None = Field(None, ge=1)  # null: the dataset's standard size
    repeats: int = Field(10, ge=1, le=100)  # gallery draws within one split
    val_identities: int = Field(50, ge=0)  # training ids held out for validation (curves, tune); 0: none


BACKBONES = ("resnet18", "resnet34", "resnet50", "mobilenet_v3_small")  # model.backbone (P and F)
RESNETS = BACKBONES[:3]  # model.rife.backbone: RIFE splits ResNet stages into two streams
MODELS = ("pri", "ffsr_rife")  # train.model: the PRI paper's model or the FFSR paper's


class SRParams(_Section):
    """G, the recovery module: RDN feature extractor + meta-upscale (Meta-SR)."""

    kind: Literal["rdn", "bicubic"] = "rdn"  # bicubic: the no-parameter baseline
    blocks: int = Field(2, ge=1)  # RDN: D residual dense blocks (paper: 16)
    convs_per_block: int = Field(3, ge=1)  # C (paper: 8)
    growth: int = Field(16, ge=1)  # G (paper: 64)
    channels: int = Field(16, ge=1)  # G0 (paper: 64)
    kernel: int = Field(3, ge=1)  # k of the k x k filter the meta-upscale predicts
    meta_hidden: int = Field(256, ge=1)  # hidden width of the weight-prediction MLP
    weights: str | None = None  # local SR state dict (e.g. pre-trained on DIV2K)

    @field_validator("kernel")
    @classmethod
    def _odd_kernel(cls, v):
        if v % 2 != 1:
            raise ValueError("an odd filter size (1, 3, 5...)")
        return v


class FFSRParams(_Section):
    """FFSR: conv autoencoder with two stride-2 downs / ups and symmetric skips."""

    channels: int = Field(16, ge=1)  # feature channels of the first level (x2 per down)
    sigma: float = Field(0.5, gt=0)  # Gaussian foreground mask, sigma relative to the image size
    weights: str | None = None


class RIFEParams(_Section):
    """RIFE: dual-stream (L / H) ResNet stages fused by predicted weights."""

    backbone: Literal[RESNETS] = "resnet18"  # type: ignore[valid-type]  # paper: resnet50
    feature_dim: int = Field(256, ge=1)  # the final feature f
    weight_hidden: int = Field(64, ge=1)  # FC -> ReLU -> FC -> sigmoid predicting w^L, w^H
    feature_bn: bool = True  # f = BN(FC(GAP)): needed from scratch (paper: none, ImageNet-pretrained ResNet-50)
    r_grad: Literal["streams", "predictors"] = "predictors"  # where L^R's gradient goes (the paper is silent):
    #   predictors: the predictors' FCs only (+6-8 validation rank-1, BENCHMARKS.md); streams: also the DSB streams


class ModelParams(_Section):
    scales: list[float] = [1, 2, 3, 4]  # PRI's alternatives r_1..r_N (also the r_sl set)
    gamma: float = 1.0  # regulatory factor of Eq. 3
    omega: int = Field(1, ge=0)  # refresh soft labels every omega epochs; 0: random per epoch
    label: Literal["soft", "onehot"] = "soft"  # dynamic soft label, or one-hot (PRI Table 3)
    backbone: Literal[BACKBONES] = "resnet18"  # type: ignore[valid-type]  # P and F (paper: resnet50)
    backbone_weights: str | None = None  # local torchvision ImageNet state dict; null: random init
    input_height: int = Field(64, ge=16)  # images are resized to this before F (paper: 384)
    input_width: int = Field(32, ge=8)  # (paper: 128)
    predictor_height: int = Field(64, ge=16)  # ... and to this before P, which only sees x_l (paper: 384)
    predictor_width: int = Field(32, ge=8)  # (paper: 128)
    feature_dim: int = Field(512, ge=1)  # 1x1 conv after pooling (paper: 2048 -> 512)
    width: int = Field(32, ge=8)  # ResNet channels of P, F (and RIFE): 64 = torchvision's (paper); 32 = ~1/4 the cost
    last_stride: Literal[1, 2] = 2  # ResNet layer4 stride: 1 = the re-id "last stride 1" trick (paper), 2 = cheaper
    reid: Literal["resnet", "rife"] = "resnet"  # F: the paper's ResNet module or RIFE ("RIFE + PRI")
    sr: SRParams = SRParams()
    ffsr: FFSRParams = FFSRParams()
    rife: RIFEParams = RIFEParams()

    @field_validator("scales")
    @classmethod
    def _scales(cls, v):
        return _check_scales(v, "scale factors")

    @field_validator("gamma", mode="before")
    @classmethod
    def _gamma(cls, v):
        return parse_gamma(v)

    @model_validator(mode="after")
    def _weights_need_torchvision_width(self):
        if self.backbone_weights is not None and self.width != 64 and self.backbone != "mobilenet_v3_small":
            raise ValueError(f"model.width = {self.width} with model.backbone_weights: ImageNet weights exist only "
                             "for torchvision's width 64; set model.width: 64 or model.backbone_weights: null")
        return self


class LossParams(_Section):
    """Weights of Eq. 6 (PRI) and Eq. 4 / 9 (FFSR + RIFE)."""

    alpha: float = Field(1.0, ge=0)  # L_id
    beta: float = Field(0.1, ge=0)  # L_tri (PRI: 0.01)
    lambda_p: float = Field(1.0, ge=0)  # L_p (PRI: 1)
    margin: float = Field(10.0, gt=0)  # phi of L_tri (PRI: 10)
    beta_r: float = Field(0.1, ge=0)  # RIFE: weight of the resolution weighting losses L^R (Eq. 9)
    alpha_rife: float = Field(1.0, ge=0)  # FFSR + RIFE: weight of L^RIFE against L^FFSR (Eq. 4)


class TrainParams(_Section):
    """Pretraining (T1 epochs) and joint training (T2 epochs) on Ray Train (PRI Sec. 3.5, 4.1)."""

    model: Literal[MODELS] = "pri"  # type: ignore[valid-type]  # which paper's model the drivers train
    identities_per_batch: int = Field(8, ge=2)  # P of the P x K identity sampler
    images_per_identity: int = Field(4, ge=1)  # K
    flip_p: float = Field(0.5, ge=0, le=1)  # joint horizontal flip of {x_h, x_l, x_sl}
    seed: int = 0
    lr_backbone: float = Field(0.001, gt=0)  # Adam (0.9, 0.999) learning rate of the backbones (paper: 0.01)
    lr_head: float = Field(0.001, gt=0)  # ... and of the added layers (1x1 convs, FCs, G's meta layers) (paper: 0.1)
    lr_decay: float = Field(0.1, gt=0, le=1)  # after T1 both rates are multiplied by this (paper: 0.1)
    optimizer: Literal["adam", "sgd"] = "adam"  # both phases (paper: Adam)
    momentum: float = Field(0.9, ge=0, lt=1)  # sgd only
    weight_decay: float = Field(0.0, ge=0)  # L2 on every parameter (paper: not stated)
    pretrain_epochs: int = Field(4, ge=1)  # T1 (paper: 20; CAVIAR 60)
    epochs: int = Field(2, ge=1)  # T2 (paper: 60; CAVIAR 140)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 where native, sound and faster
    label_refresh: Literal["cached", "naive"] = "cached"  # label bank every omega epochs, or every step
    track_images: int = Field(4, ge=0)  # training images whose r_p is logged every joint epoch (PRI Fig. 3)
    num_workers: int = Field(1, ge=1)  # Ray Train workers (DDP)
    use_gpu: bool = False
    # CPUs (and torch threads) of each worker; auto: the machine's / cluster's CPUs shared among the workers
    cpus_per_worker: float | Literal["auto"] = "auto"
    gpus_per_worker: float = Field(1, ge=0)  # used when use_gpu
    loader_workers: int = Field(0, ge=0)  # DataLoader processes per Ray worker
    max_failures: int = Field(1, ge=-1)  # FailureConfig: worker failures to recover from
    storage_path: str = "ray_results"  # Ray checkpoints; on a cluster: shared (NFS path, s3://...)
    ray_address: str | None = None  # join this cluster (RAY_ADDRESS overrides); null: local Ray


    @field_validator("cpus_per_worker", mode="before")
    @classmethod
    def _cpus(cls, v):
        if v == "auto":
            return v
        try:
            cpus = float(v)
        except (TypeError, ValueError):
            cpus = math.nan
        if not cpus > 0:
            raise ValueError("use 'auto' or a number of CPUs above 0 (e.g. 2)")
        return cpus

    def local_cpus(self) -> int:
        """cpus_per_worker as a whole number on this machine alone (benches, a process without Ray):
        "auto" is the CPUs this process may use, shared among num_workers."""
        if self.cpus_per_worker == "auto":
            return max(1, available_cpus() // self.num_workers)
        return max(1, int(self.cpus_per_worker))


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

class StepParams(_Section):
    """One training step of FFSR + RIFE: its length, optimiser and step-decay schedule (FFSR paper Sec. 5.2)."""

    epochs: int = Field(4, ge=1)
    optimizer: Literal["adam", "sgd"] = "sgd"  # the paper's
    lr: float = Field(0.01, gt=0)  # every parameter of the step (the paper has one rate)
    momentum: float = Field(0.9, ge=0, lt=1)  # sgd only (paper: not stated; torchreid's)
    weight_decay: float = Field(0.0005, ge=0)  # (paper: not stated; torchreid's)
    milestones: list[int] = []  # epochs of the step (counted from 0) at which lr is multiplied by lr_decay
    lr_decay: float = Field(0.1, gt=0, le=1)

    @field_validator("milestones")
    @classmethod
    def _ascending(cls, v):
        if any(m < 1 for m in v) or any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError("ascending epochs >= 1 of the step, e.g. [30] (the rate drops before that epoch)")
        return v


class FFSRRIFETrainParams(_Section):
    """The FFSR paper's three training steps (Sec. 5.2), for train.model: ffsr_rife and the ffsr_rife variant.

    Step 1 (ffsr) fits FFSR with L^FFSR, step 2 (rife) RIFE with L^RIFE on FFSR's fixed outputs: both in
    the pretrain stage; step 3 (joint) both with Eq. 4 in the train stage. Loader, precision and Ray
    settings come from train.
    """

    identities_per_batch: int | None = Field(None, ge=2)  # P of the P x K sampler; null: train.identities_per_batch
    ffsr: StepParams = StepParams(epochs=1)
    rife: StepParams = StepParams(epochs=3)
    joint: StepParams = StepParams(epochs=2, lr=0.001)


class EvaluateParams(_Section):
    """The evaluate stage: the 10-repeat MLR protocol, the ablation table, the pictures."""

    repeats: int | None = Field(None, ge=1)  # gallery draws to average over; null: all of the split's
    batch_size: int = Field(64, ge=1)  # images per forward pass
    max_rank: int = Field(50, ge=1)  # CMC length
    predictor: Literal["adaptive", "size_based", "ideal", "fixed"] = "adaptive"  # the headline row
    figure_probes: int = Field(4, ge=0)  # probes drawn in the ranked-list picture
    bootstrap: int = Field(10000, ge=100)  # identity-bootstrap resamples of the paired intervals


class RegistryParams(_Section):
    """The register stage: the MLflow registered model and its aliases."""

    model_name: str = Field("lrreid-pri", min_length=1)  # registered model name in the MLflow registry
    challenger_alias: str = "challenger"  # set on every new version
    champion_alias: str = "champion"  # moved only when the new version's rank-1 beats the champion's


# The extra models of the ablation table (PRI Table 2 + the FFSR paper): name -> params overrides.
VARIANTS: dict[str, dict] = {
    "bicubic": {"model": {"sr": {"kind": "bicubic"}}},  # Bicubic + F: F trained on bicubic-enlarged x_l, no G
    "ffsr_rife": {"train": {"model": "ffsr_rife"}},  # FFSR + RIFE (the FFSR paper's model)
    "rife_pri": {"model": {"reid": "rife"}},  # RIFE as F + PRI (pretrains as long as RIFE alone: variant_overrides)
}


def variant_overrides(params: "Params", name: str) -> dict:
    """VARIANTS[name]; RIFE as F + PRI also pretrains for ffsr_rife.rife.epochs (RIFE alone's step 2), so
    that its RIFE learns as many epochs as the RIFE it is compared with (BENCHMARKS.md, issue 15)."""
    if name == "rife_pri":
        return merge(VARIANTS[name], {"train": {"pretrain_epochs": params.ffsr_rife.rife.epochs}})
    return VARIANTS[name]


class AblationParams(_Section):
    """Variants trained beside the main model (dvc.yaml's pretrain_variant / train_variant) for the table."""

    variants: list[Literal[tuple(VARIANTS)]] = list(VARIANTS)  # type: ignore[valid-type]  # []: none

    @field_validator("variants")
    @classmethod
    def _unique(cls, v):
        if len(set(v)) != len(v):
            raise ValueError(f"each variant once, e.g. {list(VARIANTS)}")
        return v


SEARCHABLE = ("model", "loss", "train")  # the sections tune.space may search (their scalar keys)
DEFAULT_SPACE = {
    "model.gamma": {"choice": ["1/3", 1, 3]},
    "model.omega": {"choice": [1, 2]},
    "loss.alpha": {"choice": [0.5, 1, 2]},
    "loss.beta": {"loguniform": [0.01, 1]},
    "loss.margin": {"choice": [5, 10, 20]},
    "train.lr_backbone": {"loguniform": [0.0001, 0.003]},
    "train.lr_head": {"loguniform": [0.0001, 0.003]},
}


class TuneParams(_Section):
    """`lrreid tune`: a Ray Tune search over training params, ASHA on validation rank-1."""

    num_samples: int = Field(6, ge=1)  # trials (each draws one point of tune.space)
    max_concurrent_trials: int = Field(1, ge=1)  # trials at once; each takes train.num_workers x train.cpus_per_worker
    epochs: int = Field(3, ge=1)  # joint epochs of a trial that is never stopped (ASHA's max_t)
    grace_period: int = Field(1, ge=1)  # epochs before ASHA may stop a trial
    reduction_factor: int = Field(2, ge=2)  # ASHA keeps 1 / reduction_factor of the trials at each rung
    pretrain: Literal["shared", "per_trial"] = "shared"  # shared: trials start from models/pretrain.pt;
    #                                                      per_trial: each trial pretrains (T1) with its own config
    name: str = Field("lrreid-tune", pattern=r"^[A-Za-z0-9_.-]+$")  # the search's folder under train.storage_path
    seed: int = 0  # the search's sampling
    space: dict[str, dict[str, list]] = DEFAULT_SPACE  # dotted key -> {choice|grid: [...]} | {uniform|loguniform: [lo, hi]}


def _check_space(p: "Params") -> None:
    """Every key of tune.space is a scalar training param and every value one it accepts."""
    dump = p.model_dump(mode="json")
    sections = {"model": ModelParams, "loss": LossParams, "train": TrainParams}
    for key, spec in p.tune.space.items():
        name = f"tune.space.{key}"
        parts = key.split(".")
        node = dump
        if parts[0] not in SEARCHABLE or len(parts) < 2:
            raise _KeyError(name, spec, f"a key of the {', '.join(SEARCHABLE)} sections, e.g. model.gamma")
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
            if not isinstance(node, dict):
                raise _KeyError(name, spec, f"a key of the {', '.join(SEARCHABLE)} sections, e.g. model.gamma")
        if parts[-1] not in node or isinstance(node[parts[-1]], (dict, list)):
            known = ", ".join(k for k, v in node.items() if not isinstance(v, (dict, list)))
            raise _KeyError(name, spec, f"a scalar param; known keys here: {known}")
        if len(spec) != 1 or next(iter(spec)) not in ("choice", "grid", "uniform", "loguniform"):
            raise _KeyError(name, spec, "one of {choice: [v1, v2, ...]}, {grid: [v1, v2, ...]}, {uniform: [lo, hi]}, "
                            "{loguniform: [lo, hi]}")
        kind, values = next(iter(spec.items()))
        if kind in ("choice", "grid") and not values:
            raise _KeyError(name, spec, f"a non-empty list of {kind} values")
        if kind not in ("choice", "grid"):
            if len(values) != 2 or not all(isinstance(v, (int, float)) for v in values) or values[0] >= values[1]:
                raise _KeyError(name, spec, f"{kind}: [lo, hi] with lo < hi")
            if kind == "loguniform" and values[0] <= 0:
                raise _KeyError(name, spec, "loguniform: [lo, hi] with 0 < lo < hi")
        for value in values:  # each candidate through the section's own validators (even gamma, lr <= 0, ...)
            section = dict(dump[parts[0]])
            leaf = section
            for part in parts[1:-1]:
                leaf[part] = dict(leaf[part])
                leaf = leaf[part]
            leaf[parts[-1]] = value
            try:
                sections[parts[0]].model_validate(section)
            except ValidationError as exc:
                err = exc.errors()[0]
                msg = str((err.get("ctx") or {}).get("error") or err["msg"]).removeprefix("Value error, ")
                raise _KeyError(name, value, msg) from None


class Params(_Section):
    data: DataParams = DataParams()
    degrade: DegradeParams = DegradeParams()
    split: SplitParams = SplitParams()
    model: ModelParams = ModelParams()
    loss: LossParams = LossParams()
    train: TrainParams = TrainParams()
    ffsr_rife: FFSRRIFETrainParams = FFSRRIFETrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    registry: RegistryParams = RegistryParams()
    ablation: AblationParams = AblationParams()
    tune: TuneParams = TuneParams()

    def batch_identities(self) -> tuple[int, str]:
        """P of the P x K sampler for the model train.model names, and the key it comes from."""
        if self.train.model == "ffsr_rife" and self.ffsr_rife.identities_per_batch is not None:
            return self.ffsr_rife.identities_per_batch, "ffsr_rife.identities_per_batch"
        return self.train.identities_per_batch, "train.identities_per_batch"

    def for_variant(self, name: str | None) -> "Params":
        """These params with ablation variant ``name``'s overrides (VARIANTS); None: unchanged."""
        if name is None:
            return self
        if name not in VARIANTS:
            raise ParamsError(f"ablation variant {name!r} is not known; known variants: {', '.join(VARIANTS)}")
        return validate_params(merge(self.model_dump(mode="json"), variant_overrides(self, name)),
                               f"params + variant {name}")

    @model_validator(mode="after")
    def _cross_checks(self):
        syn = self.data.synthetic
        if self.data.layout == "synthetic" and self.split.test_identities is not None:
            if self.split.test_identities >= syn.identities:
                raise _KeyError(
                    "split.test_identities",
                    self.split.test_identities,
                    f"fewer than the {syn.identities} identities of data.synthetic.identities "
                    "(some must stay for training)",
                )
        if self.data.layout == "synthetic":  # real datasets: checked by the training stages on the split
            n_train = syn.identities - (self.split.test_identities or syn.identities - syn.train_identities)
            P, key = self.batch_identities()
            if n_train < P * self.train.num_workers:
                raise _KeyError(
                    "split.test_identities", self.split.test_identities,
                    f"leaves {n_train} training identities, but a batch needs {key} = "
                    f"{P} per worker ({self.train.num_workers}); lower one of them")
            if n_train - self.split.val_identities < P * self.train.num_workers:
                raise _KeyError(
                    "split.val_identities", self.split.val_identities,
                    f"leaves {n_train - self.split.val_identities} of the {n_train} training identities to train "
                    f"on, but a batch needs {key} = {P} per worker "
                    f"({self.train.num_workers}); lower split.val_identities (0: no validation)")
        if self.degrade.protocol == "mlr" and max(self.degrade.scales) > max(self.model.scales):
            raise _KeyError(
                "degrade.scales", self.degrade.scales,
                f"factors up to the largest of model.scales ({max(self.model.scales):g}): PRI cannot recover "
                "an image down-sampled further; add the factor to model.scales or drop it from degrade.scales")
        if self.degrade.protocol == "vr" and self.degrade.width_range[0] > self.degrade.hr_width:
            raise _KeyError(
                "degrade.width_range", list(self.degrade.width_range),
                f"widths below degrade.hr_width ({self.degrade.hr_width})",
            )
        _check_space(self)
        return self


class _KeyError(ValueError):
    def __init__(self, key: str, value: Any, allowed: str):
        super().__init__(allowed)
        self.key, self.value, self.allowed = key, value, allowed


def parse_gamma(v: Any) -> float:
    """gamma of Eq. 3: 0, an odd integer, or the reciprocal of one ("1/3" or 0.3333...)."""
    allowed = "0, an odd integer (1, 3, 5...) or the reciprocal of one (1/3, 1/5...)"
    try:
        g = float(Fraction(v)) if isinstance(v, str) else float(v)
    except (TypeError, ValueError, ZeroDivisionError):
        raise ValueError(allowed) from None
    if isinstance(v, bool) or not math.isfinite(g) or g < 0:
        raise ValueError(allowed)
    if g == 0:
        return 0.0
    for candidate in (g, 1.0 / g):
        n = round(candidate)
        if abs(candidate - n) < 1e-6 and n % 2 == 1:
            return float(n) if candidate is g else 1.0 / n
    raise ValueError(allowed)


def _format_error(err: dict, source: str, raw: dict) -> str:
    loc = ".".join(str(p) for p in err["loc"] if not isinstance(p, int))
    ctx_err = (err.get("ctx") or {}).get("error")
    if isinstance(ctx_err, _KeyError):
        return f"{source}: {ctx_err.key} = {ctx_err.value!r} is not allowed: {ctx_err.allowed}"
    value = err.get("input")
    kind = err["type"]
    if kind == "extra_forbidden":
        section = _lookup_model(loc.rsplit(".", 1)[0] if "." in loc else "")
        known = ", ".join(section.model_fields) if section else ""
        where = f" under {loc.rsplit('.', 1)[0]}" if "." in loc else ""
        return f"{source}: {loc} is not a known key{where}; known keys: {known} (check the spelling)"
    if kind == "missing":
        return f"{source}: {loc} is missing; add it (see README, params section)"
    msg = str(ctx_err) if ctx_err is not None else err["msg"]
    msg = msg.removeprefix("Value error, ")
    return f"{source}: {loc} = {value!r} is not allowed: {msg}"


def _lookup_model(dotted: str):
    model: type[BaseModel] = Params
    for part in filter(None, dotted.split(".")):
        field = model.model_fields.get(part)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model


def validate_params(raw: dict, source: str = "params.yaml") -> Params:
    """Validate a params mapping; raise ParamsError with one line on the first problem."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections (data, degrade, ...), got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ParamsError(_format_error(exc.errors()[0], source, raw)) from None
    except _KeyError as exc:
        raise ParamsError(f"{source}: {exc.key} = {exc.value!r} is not allowed: {exc.allowed}") from None


PRESETS_DIR = Path(__file__).resolve().parents[1] / "presets"


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                m, first = key_node.start_mark, seen[key]
                raise ParamsError(f"{m.name}: line {m.line + 1}, column {m.column + 1}: key {key!r} is given twice "
                                  f"(first at line {first.line + 1}); keep one")
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> dict:
    """The mapping in YAML file ``path``; ParamsError (one line, with line and column) for a missing,
    malformed or empty file or a key given twice."""
    if not path.exists():
        raise ParamsError(f"{path}: not found; run from the repository root or pass --params")
    text = path.read_text()
    try:
        raw = yaml.load(text, Loader=_make_loader(path))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ParamsError(f"{path}: {where}not valid YAML ({exc.problem or exc.context})") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if raw is None:
        raise ParamsError(f"{path}: holds no params (empty or only comments); restore it with "
                          f"`git checkout {path.name}` or write its sections (see README, params)")
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections (data, degrade, ...), got {type(raw).__name__}")
    return raw


def _make_loader(path: Path):
    """A loader class whose marks name ``path`` (PyYAML names a string stream '<unicode string>')."""

    def loader(stream):
        inst = _UniqueKeyLoader(stream)
        inst.name = str(path)
        return inst

    return loader


def merge(base: dict, overlay: dict) -> dict:
    """Deep-merge ``overlay`` into a copy of ``base`` (mappings merge, other values replace)."""
    out = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def preset_overrides(name: str) -> dict:
    """The overrides of preset ``name`` (presets/<name>.yaml), e.g. ``paper``."""
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
        raise ParamsError(f"preset {name!r} is not known; known presets: {', '.join(known)}")
    return _read_yaml(path)


def load_params(path: str | Path = "params.yaml", preset: str | None = None) -> Params:
    """Read and validate params.yaml (the only reader of that file), optionally with a preset on top.

    Every section must be there (a missing one is a truncated or foreign file); a key left out of a
    section takes the code default, which is the shipped params.yaml's value (tests/test_config.py)."""
    path = Path(path)
    raw = _read_yaml(path)
    missing = [name for name in Params.model_fields if name not in raw]
    if missing:
        raise ParamsError(f"{path}: section{'s' * (len(missing) > 1)} {', '.join(missing)} missing; copy "
                          f"{'them' if len(missing) > 1 else 'it'} from the shipped params.yaml (`git show "
                          f"HEAD:params.yaml`)")
    source = str(path)
    if preset:
        raw = merge(raw, preset_overrides(preset))
        source = f"{path} + preset {preset}"
    return validate_params(raw, source)
