"""YAML configs validated into pydantic models; errors name the file and the field."""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from pathlib import Path
from typing import Annotated, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from mscnn.fields import omit_later
from mscnn.models import ARCHS, NetConfig
from pipelines.pyramid import PyramidConfig

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A config file that cannot be read or does not validate."""


def packaged_configs() -> Path:
    """The folder of the configs shipped with the package (``configs/`` in a checkout is a link
    to it), found through ``importlib.resources`` so a plain ``pip install`` has them too."""
    from importlib.resources import files

    return Path(str(files("pipelines") / "configs"))


def find_config(path: str | os.PathLike) -> Path:
    """``path`` if it exists; else, for a bare name or ``configs/NAME`` (the README's spelling),
    the packaged config of that name; else ``ConfigError`` listing the packaged ones."""
    p = Path(path)
    if p.exists():
        return p
    shipped = packaged_configs()
    if len(p.parts) == 1 or (len(p.parts) == 2 and p.parts[0] == "configs"):
        if (shipped / p.name).is_file():
            return shipped / p.name
    names = ", ".join(sorted(f.name for f in shipped.glob("*.yaml")))
    raise ConfigError(f"config file not found: {p} (shipped configs, usable by name: {names})")


def load_config(path: str | os.PathLike, model: type[M], overrides: dict | None = None) -> M:
    """Read ``path`` (YAML; a shipped config also by its name, see ``find_config``), apply
    ``overrides`` (dotted keys, list indices as numbers, e.g.
    ``{"source.limit": 100, "levels.0.epochs": 2}``) and validate it as ``model``."""
    path = find_config(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        apply_overrides(raw, overrides or {})
    except KeyError as e:
        raise ConfigError(f"{path}: {e.args[0]}") from None
    try:
        return model.model_validate(raw, context={"base": str(path.parent)})
    except ValidationError as e:
        lines = [f"{path}: invalid {model.__name__}:"]
        for err in e.errors():
            field = ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"  {field}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None


def apply_overrides(raw: dict, overrides: dict) -> dict:
    """Set dotted keys (list indices as numbers) in the nested dict ``raw``, in place; a key that
    addresses nothing raises ``KeyError`` naming it."""
    for key, value in overrides.items():
        node = raw
        *parents, last = key.split(".")
        try:
            for p in parents:
                node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
            node[int(last) if isinstance(node, list) else last] = value
        except (IndexError, ValueError, TypeError, AttributeError):
            raise KeyError(f"cannot apply override {key}={value!r}") from None
    return raw


def parse_overrides(items: list[str]) -> dict:
    """``["a.b=3", "c=x"]`` -> ``{"a.b": 3, "c": "x"}`` (values parsed as YAML scalars)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        out[k] = yaml.safe_load(v)
    return out


# ---------------------------------------------------------------- schedules



class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OptimConfig(_Strict):
    """``adam``/``adamw``/``sgd`` (torch.optim, ``lr``, ``cosine``) or ``bcd``: the paper's
    block-coordinate Gauss-Newton/Newton (``mscnn.optim.BCD``; one iteration per batch)."""

    name: Literal["adam", "adamw", "sgd", "bcd"] = "adam"
    lr: float = Field(1e-2, gt=0)
    batch_size: int = Field(128, ge=1)
    cosine: bool = True  # anneal the learning rate to 0 over the level's epochs
    alpha_time: float = Field(1e-3, ge=0)  # bcd: smoothness in time of the propagation
    alpha_space: float = Field(1e-4, ge=0)  # bcd: spatial smoothness of the classifier weights
    newton_steps: int = Field(5, ge=1)  # bcd
    cg_iters: int = Field(10, ge=1)  # bcd
    damping: float = Field(1e-3, ge=0)  # bcd: Levenberg-Marquardt shift of the Gauss-Newton system


def _model_fields(config_cls: type, per_level: set[str]) -> dict:
    """pydantic fields for a network config dataclass, less the fields a level sets (n, steps):
    the one model description stays the dataclass (``mscnn.models.ARCHS``); a field added there
    is a schedule field at once. Values are checked by the dataclass itself (``model_config_for``)."""
    hints = typing.get_type_hints(config_cls)
    return {f.name: (hints[f.name] | list[int] if "tuple" in str(hints[f.name]) else hints[f.name],
                     f.default)
            for f in dataclasses.fields(config_cls) if f.name not in per_level}


# one pydantic model per architecture, generated from its config dataclass, discriminated on arch
_MODELS = {arch: create_model(f"{kind.__name__}Fields", __base__=_Strict,
                              arch=(Literal[arch], arch), **_model_fields(kind, {"n", "steps"}))
           for arch, (kind, _) in ARCHS.items()}
ModelConfig = Annotated[typing.Union[tuple(_MODELS.values())], Field(discriminator="arch")]  # noqa: UP007


class EstimatorConfig(_Strict):
    """How a level estimates its gradient: ``mge`` is multilevel gradient estimation
    (``mscnn.mge.MultilevelStep``) over ``levels`` grids ending at the level's ``n``, with
    ``batch_sizes`` images per grid (coarsest first; they add up to ``optim.batch_size``)."""

    name: Literal["mge"] = "mge"
    levels: int = Field(2, ge=2)
    batch_sizes: list[int] = Field(min_length=2)
    # how free stencils reach the coarser grids (mscnn.mge.MOVES); dilate needs model.dilation of
    # the level's network >= 2**(levels-1) (e.g. after a dilating handover)
    move: Literal["galerkin", "naive", "dilate"] = "galerkin"


class LevelConfig(_Strict):
    """One stage: train at resolution ``n`` with ``steps`` Euler steps per unit. It starts from the
    previous level's best checkpoint moved by ``to_resolution`` (when ``n`` changes) and
    ``to_depth`` (when ``steps`` changes) -- or from random weights with ``init: random``."""

    n: int = Field(ge=1)
    steps: int | list[int] = 2
    epochs: int = Field(1, ge=1)
    optim: OptimConfig = OptimConfig()
    patience: int | None = Field(None, ge=1)  # early stopping on val accuracy, in epochs
    init: Literal["transfer", "random"] = "transfer"
    naive: bool = False  # to_resolution(naive=True): keep the stencils, move only W
    lam: float = Field(0.0, ge=0)  # regularised stencil prolongation (mscnn.transfer.prolong_stencil)
    galerkin: list[Literal["opening", "units"]] = ["opening", "units"]  # groups given Galerkin stencils
    # the network moved into this level blurs its input to the bandwidth of the previous level's
    # images (ODENetConfig.input_blur; to_resolution(prefilter=sigma)): true -> sigma =
    # mscnn.hierarchy.handover_sigma(pyramid.sigma, pyramid.pair), the pyramid's blur and the
    # restriction's own smoothing (1.22 px for sigma 1 with full weighting; measured best,
    # benchmarks/RESULTS.md); a number -> that sigma in pixels (1.0: the pyramid's blur alone, the
    # meaning of `true` before session 12); false or 0 -> none
    prefilter: bool | float = False
    # to_resolution(dilate=True): free stencils keep their weights and their physical tap offsets
    # (model.dilation times the grid ratio from here on); the moved network computes what the
    # previous one did on each sub-grid. Combine with prefilter; not with naive or a consistent kind
    dilate: bool = False
    estimator: EstimatorConfig | None = None  # None: the plain gradient of each batch

    @field_validator("prefilter")
    @classmethod
    def _prefilter_sigma(cls, v):
        if not isinstance(v, bool) and not (v >= 0 and math.isfinite(v)):
            raise ValueError(f"prefilter: {v} is not true, false or a sigma >= 0 in pixels")
        return v

    @model_validator(mode="after")
    def _check_estimator(self) -> LevelConfig:
        e = self.estimator
        if e is None:
            return self
        if len(e.batch_sizes) != e.levels or sum(e.batch_sizes) != self.optim.batch_size:
            raise ValueError(f"estimator.batch_sizes: {e.batch_sizes} needs {e.levels} entries adding "
                             f"up to optim.batch_size={self.optim.batch_size}")
        if self.n % 2 ** (e.levels - 1) or self.optim.name == "bcd":
            raise ValueError(f"estimator: mge needs n={self.n} divisible by 2**{e.levels - 1} and a "
                             "torch optimiser (not bcd)")
        return self

    def mge_sizes(self) -> list[int]:
        """The grids of the multilevel estimator, coarsest first (empty without one)."""
        e = self.estimator
        return [self.n >> k for k in reversed(range(e.levels))] if e else []


def _dilated(dilation: int, n_prev: int, lv: LevelConfig) -> int:
    """``model.dilation`` after the handover into ``lv`` (``to_resolution(dilate=True)``)."""
    if not lv.dilate:
        return dilation
    taps = dilation * lv.n / n_prev
    if taps < 1 or taps % 1:
        raise ValueError(f"dilate: a network with dilation {dilation} moved from n={n_prev} to n={lv.n} "
                         f"would space its taps {taps:g} pixels apart (must be a whole number >= 1)")
    return round(taps)


class ScalingModel(_Strict):
    num_workers: int = Field(1, ge=0)  # 0: run in the driver (fast tests; no checkpoints persisted)
    # auto: GPUs when the cluster has them now or its autoscaler's node types offer them (then as
    # true; pipelines.stage.scalable_gpus); true: GPUs, waiting up to gpu_wait_s for an
    # autoscaler to add GPU nodes (their resources are requested), else a clear error
    use_gpu: bool | Literal["auto"] = "auto"
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(1.0, gt=0)
    gpu_wait_s: float = Field(900.0, ge=0)
    # each worker keeps its shard of a level as tensors when it is at most this size (MB per
    # split; 0: stream from Ray Data every epoch); MNIST 28x28: 60,000 images are 188 MB
    worker_cache_mb: float = Field(2048.0, ge=0)
    # how the workers get the level: ray_data (get_dataset_shard; materialised or streamed, see
    # materialize_data), worker (each worker reads the split's Parquet shards with pyarrow into its
    # cache: no Ray Data pass; the pyramid must be a path every node sees), auto: worker when each
    # split of the level fits worker_cache_mb and the pyramid is a path, else ray_data
    reader: Literal["auto", "ray_data", "worker"] = "auto"
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # Ray Train V2's extras around each stage: its preemption watcher (one more actor per stage,
    # polling the nodes' drain state) and its Prometheus metrics callbacks. on: Ray's default; auto:
    # off on a one-node Ray (nothing to preempt; pipelines.stage.train_extras_env), on for a cluster
    # of several nodes. Measured on 2 cores: no difference in a stage's fixed cost (RESULTS.md)
    train_extras: Literal["auto", "on", "off"] = "on"
    # how often Ray Train's controller polls its workers (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S; Ray's
    # default 2 s), which is also how soon it sees a worker group start, a report and the end: at
    # 0.5 s the demo's schedule ended 3.6 s sooner after its last report (benchmarks/RESULTS.md)
    train_poll_s: float = Field(0.5, gt=0)
    # schedule: the unfinished levels of a schedule run one after another in one Ray Train run
    # (one worker group, started and stopped once; the handover done in the workers); level: each
    # level a Ray Train run of its own (its own worker group). The same networks to the bit; the
    # demo's two-level schedule took 29 s against 47 (benchmarks/RESULTS.md, issue 18)
    worker_group: Literal["schedule", "level"] = "schedule"


class ScheduleConfig(_Strict):
    """An ordered list of levels trained one after another, each a Ray Train stage."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    kind: Literal["single", "multiscale", "depth"]
    pyramid: PyramidConfig
    pyramid_root: str = "outputs/pyramids"
    model: ModelConfig = _MODELS["odenet"]()
    levels: list[LevelConfig] = Field(min_length=1)
    scaling: ScalingModel = ScalingModel()
    max_failures: int = Field(1, ge=-1)
    materialize_data: bool = True  # read each level into the object store once; False: stream
    storage_path: str = "outputs/ray_results"  # shared path or URI on a cluster
    experiment: str = "mscnn"
    register_model: str | None = None  # also register the final model in MLflow's registry as this
    seed: int = 0
    random_init: bool = False  # every level from random weights (the comparison for transfers)

    @field_validator("model", mode="before")
    @classmethod
    def _default_arch(cls, v):
        return {"arch": "odenet", **v} if isinstance(v, dict) and "arch" not in v else v

    @field_validator("pyramid", mode="before")
    @classmethod
    def _pyramid_file(cls, v, info: ValidationInfo):
        if isinstance(v, str):  # a path to a pyramid YAML, relative to the schedule's file
            p = Path(v)
            base = (info.context or {}).get("base")
            if not p.is_absolute() and base and not p.exists():
                p = Path(base) / p
            try:
                return yaml.safe_load(p.read_text())
            except FileNotFoundError:
                raise ValueError(f"pyramid file not found: {p}") from None
        return v

    @model_validator(mode="after")
    def _check_levels(self) -> ScheduleConfig:
        sizes = [self.pyramid.source.image_size >> k for k in range(self.pyramid.levels)]
        for i, lv in enumerate(self.levels):  # checked here, before Ray starts
            if lv.dilate and lv.naive:
                raise ValueError(f"levels.{i}.dilate: choose dilate or naive (both keep the stencils' "
                                 "weights; dilate also keeps their physical tap offsets)")
            if lv.dilate and getattr(self.model, "stencil", "free") != "free":
                raise ValueError(f"levels.{i}.dilate: moves free stencils; model.stencil "
                                 f"{self.model.stencil!r} is re-discretised on each grid")
            try:
                net = self.model_config_for(i)
            except ValueError as e:
                raise ValueError(f"levels.{i}: {e}") from None
            e = lv.estimator
            if e and e.move == "dilate" and getattr(net, "dilation", 1) < 2 ** (e.levels - 1):
                raise ValueError(f"levels.{i}.estimator.move: dilate needs the level's network to space "
                                 f"its taps >= {2 ** (e.levels - 1)} pixels apart (model.dilation "
                                 f"{getattr(net, 'dilation', 1)}; a dilating handover gives it)")
            if lv.n not in sizes:
                raise ValueError(f"levels.{i}.n: n={lv.n} is not a level of pyramid "
                                 f"{self.pyramid.name} (has n in {sizes})")
            if self.model.arch != "odenet":
                if lv.optim.name == "bcd":
                    raise ValueError(f"levels.{i}.optim.name: bcd trains the ODE network "
                                     "(model.arch: odenet), not resnet34")
                if lv.dilate:
                    raise ValueError(f"levels.{i}.dilate: dilated stencils are an ODE-network "
                                     "handover (model.arch: odenet), not resnet34")
                if set(lv.galerkin) != {"opening", "units"}:
                    raise ValueError(f"levels.{i}.galerkin: layer groups are ODE-network parts; "
                                     "a resnet34 moves all its 3x3 convolutions (or none: naive)")
        return self

    def model_config_for(self, i: int) -> NetConfig:
        """The network config of level ``i``: the model's fields plus the level's ``n`` (and
        ``steps`` where the architecture has steps), validated by the config dataclass."""
        lv, m = self.levels[i], self.model.model_dump()
        kind = ARCHS[m.pop("arch")][0]
        per_level = {"n": lv.n} | ({"steps": lv.steps} if "steps" in kind.__dataclass_fields__ else {})
        if "input_blur" in m:  # what the prefiltered handovers since the last fresh start added
            m["input_blur"] = self._since_fresh(i, m["input_blur"], self._prefiltered)
        if "dilation" in m:  # and what the dilating ones did to the taps' offsets
            m["dilation"] = self._since_fresh(i, m["dilation"], _dilated)
        return kind(**m, **per_level)

    def _since_fresh(self, i: int, base, move):
        """A handover-carried model field at level ``i``: ``base`` at every fresh start (level 0,
        ``init: random``, ``random_init``), then ``move(value, previous n, level)`` per handover."""
        value = base
        for j, lv in enumerate(self.levels[: i + 1]):
            fresh = j == 0 or lv.init == "random" or self.random_init
            value = base if fresh else move(value, self.levels[j - 1].n, lv)
        return value

    def prefilter_px(self, lv: LevelConfig) -> float:
        """The prefilter sigma, in pixels, of the handover into level ``lv`` (0: none)."""
        from mscnn.hierarchy import handover_sigma

        if lv.prefilter is True:
            return handover_sigma(self.pyramid.sigma, self.pyramid.pair)
        return float(lv.prefilter or 0.0)

    def _prefiltered(self, blur: float, n_prev: int, lv: LevelConfig) -> float:
        from mscnn.hierarchy import prefiltered_blur

        return prefiltered_blur(blur, n_prev, lv.n, self.prefilter_px(lv))

    def config_hash(self) -> str:
        import hashlib
        import json

        # the pyramid enters by its name and PyramidConfig.identity (not where its source was
        # read from: the build refuses another content under the same name)
        d = self.model_dump(exclude={"storage_path", "experiment", "scaling", "register_model"})
        # fields added later leave the hash of a schedule that does not use them unchanged
        omit_later(d["model"], {"input_blur": 0.0, "dilation": 1, "subgrid_connectives": False,
                                "stencil_length": None, "stencil_scale_growth": 1.0})
        if d["model"]["arch"] == "resnet34":  # its stencil fields came later than the ODE network's
            omit_later(d["model"], {"stencil": "free", "stencil_scale": 0.05})
        for lv in d["levels"]:
            if lv.get("prefilter") is True:  # its sigma changed in session 12: not resumed as before
                lv["prefilter"] = "handover_sigma"
            omit_later(lv, {"prefilter": False, "dilate": False})
            omit_later(lv["estimator"] or {}, {"move": "galerkin"})
        d["pyramid"] = {**self.pyramid.identity(), "name": self.pyramid.name}
        blob = json.dumps(d, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]
