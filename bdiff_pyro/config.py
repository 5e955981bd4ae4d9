"""Experiment configuration: YAML file -> typed dataclasses, validated once, at the edge.

Every error names the file (or ``--set``) and the dotted key, e.g.
``heartbeat.yaml: model.T must be >= 2 (got 1)``.
"""

import copy
import dataclasses
import math
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from bdiff_pyro import registry
from bdiff_pyro.errors import UserError
from bdiff_pyro.programs.spec import ModelSpec

MAX_SEED = 2 ** 32 - 1  # pyro.set_rng_seed also seeds NumPy, whose seeds are 32-bit
DEVICES = ("auto", "cpu", "cuda")  # the key ``device``; bdiff_pyro.distributed.resolve_device reads it


@dataclass
class DataConfig:
    kind: str = "heartbeat"  # heartbeat | text | npy | digits | npz
    n: int = 20  # heartbeat: sequence length
    period: int = 5  # heartbeat: one pulse every `period` positions
    levels: int = 2  # states per position K (2: bits); heartbeat pulses decay one level a step
    alphabet: typing.Optional[str] = None  # text: the symbols, in code order (default 0, 1, ...)
    train: typing.Optional[str] = None  # text / npy: training file (relative to the config)
    val: typing.Optional[str] = None  # text / npy: held-out file
    split_seed: int = 0  # digits: the seeded train / validation / test split
    file: typing.Optional[str] = None  # npz: one .npz with arrays train, valid, test (relative to the config)

    def validate(self, where):
        _choice(where, "data.kind", self.kind, ("heartbeat", "text", "npy", "digits", "npz"))
        _at_least(where, "data.levels", self.levels, 2)
        if self.alphabet is not None and (len(self.alphabet) != self.levels or len(set(self.alphabet)) != self.levels):
            raise UserError(f"{where('data.alphabet', 'data.levels')}: data.alphabet must be {self.levels} distinct "
                            f"symbols (got {self.alphabet!r})")
        if self.kind == "digits":
            _choice(where, "data.levels", self.levels, (2, 4))
        elif self.kind == "heartbeat":
            _at_least(where, "data.n", self.n, 1)
            _at_least(where, "data.period", self.period, 1)
            if self.period > self.n:
                raise UserError(f"{where('data.period', 'data.n')}: data.period must be <= data.n "
                                f"(got {self.period} > {self.n})")
        elif self.kind == "npz":
            if self.file is None:
                raise UserError(f"{where('data.kind')}: data.file is required when data.kind is 'npz'")
        else:
            for key in ("train", "val"):
                if getattr(self, key) is None:
                    raise UserError(f"{where('data.kind')}: data.{key} is required when data.kind is {self.kind!r}")

    def unused_keys(self):
        """The keys that do not apply to this data.kind (the others are read from the files
        or fixed by the data set)."""
        return {"heartbeat": ("train", "val", "split_seed", "file"), "text": ("n", "period", "split_seed", "file"),
                "npy": ("n", "period", "split_seed", "file"), "digits": ("n", "period", "train", "val", "file"),
                "npz": ("n", "period", "split_seed", "train", "val")}[self.kind]


@dataclass
class ModelConfig:
    kernel: str = "bernoulli"  # a name in registry.KERNELS
    T: int = 200
    schedule: str = "cosine"  # a name in registry.SCHEDULES
    schedule_power: float = 2.0  # power schedule: beta~_t = (t/T)^power
    pi_1: typing.Union[float, str] = 0.5  # stationary P(bit = 1), or "data" for the training mean
    parameterisation: str = "x0"  # one of registry.PARAMETERISATIONS
    inputs: str = "state"  # one of registry.INPUTS (programs/reverse.py says what each code is)
    add_own_evidence: bool = True  # evidence inputs, through x^0: add log q(x^t_i | x^0_i) to the logits
    network: str = "mlp"  # a name in registry.NETWORKS: mlp | resmlp | conv1d | conv2d | transformer
    hidden: typing.List[int] = field(default_factory=lambda: [128, 128])
    activation: str = "silu"  # a name in registry.ACTIVATIONS
    time_embedding: int = 32
    film: bool = False  # time also scales and shifts every hidden layer (see reverse.MLP)
    dropout: float = 0.0  # every network: probability of zeroing a hidden unit while training
    members: int = 1  # every network: an ensemble of this many, their reverse steps mixed
    channels: int = 64  # conv1d, conv2d, transformer: numbers per position in every block
    blocks: int = 2  # conv1d, conv2d: residual blocks; transformer: encoder layers
    kernel_size: int = 5  # conv1d, conv2d: odd width of every convolution
    padding: str = "circular"  # conv1d, conv2d: circular (shift-equivariant) | zeros
    image_shape: typing.Optional[typing.List[int]] = None  # conv2d: [height, width] (default: square)
    heads: int = 4  # transformer: attention heads (a divisor of channels)
    position_code: str = "learned"  # transformer: learned | sinusoidal | none (permutation-equivariant)

    def validate(self, where):
        _choice(where, "model.kernel", self.kernel, tuple(registry.KERNELS))
        _at_least(where, "model.T", self.T, 2)
        _choice(where, "model.schedule", self.schedule, tuple(registry.SCHEDULES))
        if self.schedule_power <= 0:
            raise UserError(f"{where('model.schedule_power')}: model.schedule_power must be > 0 "
                            f"(got {self.schedule_power})")
        if isinstance(self.pi_1, str):
            if self.pi_1 != "data":
                raise UserError(f"{where('model.pi_1')}: model.pi_1 must be a number in (0, 1) or 'data' "
                                f"(got {self.pi_1!r})")
        elif not 0.0 < self.pi_1 < 1.0:
            raise UserError(f"{where('model.pi_1')}: model.pi_1 must lie strictly between 0 and 1 (got {self.pi_1})")
        _choice(where, "model.parameterisation", self.parameterisation, registry.PARAMETERISATIONS)
        _choice(where, "model.inputs", self.inputs, registry.INPUTS)
        _choice(where, "model.network", self.network, tuple(registry.NETWORKS))
        _choice(where, "model.activation", self.activation, tuple(registry.ACTIVATIONS))
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise UserError(f"{where('model.hidden')}: model.hidden must be a non-empty list of positive sizes "
                            f"(got {self.hidden})")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"{where('model.dropout')}: model.dropout must be in [0, 1) (got {self.dropout})")
        if self.network == "resmlp" and len(set(self.hidden)) != 1:
            raise UserError(f"{where('model.hidden', 'model.network')}: model.network resmlp needs equal model.hidden "
                            f"sizes (one residual width; got {self.hidden})")
        if self.time_embedding < 2 or self.time_embedding % 2:
            raise UserError(f"{where('model.time_embedding')}: model.time_embedding must be an even number >= 2 "
                            f"(got {self.time_embedding})")
        for key in ("members", "channels", "blocks", "kernel_size", "heads"):
            _at_least(where, f"model.{key}", getattr(self, key), 1)
        if self.kernel_size % 2 == 0:
            raise UserError(f"{where('model.kernel_size')}: model.kernel_size must be odd (got {self.kernel_size})")
        _choice(where, "model.padding", self.padding, ("circular", "zeros"))
        if self.image_shape is not None and (len(self.image_shape) != 2 or min(self.image_shape) < 1):
            raise UserError(f"{where('model.image_shape')}: model.image_shape must be [height, width] of positive "
                            f"sizes (got {self.image_shape})")
        if self.network == "transformer" and self.channels % self.heads:
            raise UserError(f"{where('model.channels', 'model.heads')}: model.channels must be a multiple of "
                            f"model.heads (got {self.channels} and {self.heads})")
        _choice(where, "model.position_code", self.position_code, ("learned", "sinusoidal", "none"))


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 128
    lr: float = 2e-3
    lr_final: float = 2e-4  # exponential decay from lr to lr_final over the run
    clip_norm: float = 10.0  # each gradient element clamped to [-clip_norm, clip_norm] (pyro.optim.ClippedAdam)
    eval_every: int = 200  # held-out bound, sample proportions and a GIF frame
    checkpoint_every: int = 200
    eval_samples: int = 1000  # samples drawn at each evaluation during training
    eval_sequences: int = 256  # held-out sequences scored at each evaluation during training
    eval_replicates: int = 2  # estimates per held-out sequence at each evaluation (few sequences: more)
    t_sampling: str = "uniform"  # uniform | importance (r(t) ∝ sqrt(E L_t^2), unbiased)
    ema: float = 0.0  # decay of the weight average used for evaluation and samples (0: off)
    weight_decay: float = 0.0  # L2 penalty on the weights, added to the gradient (pyro.optim.ClippedAdam)
    decoupled_weight_decay: float = 0.0  # AdamW-style: every step w <- (1 - lr_k * this) w (train.ClippedAdamW)
    # lambda of the hybrid loss -ELBO + lambda E_t[-log p(x^0 | x^t)] (x0 parameterisation only)
    x0_loss_weight: float = 0.0

    def validate(self, where):
        for key in ("steps", "batch_size", "eval_every", "checkpoint_every", "eval_samples", "eval_sequences",
                    "eval_replicates"):
            _at_least(where, f"train.{key}", getattr(self, key), 1)
        _choice(where, "train.t_sampling", self.t_sampling, ("uniform", "importance"))
        if not 0.0 <= self.ema < 1.0:
            raise UserError(f"{where('train.ema')}: train.ema must be in [0, 1) (got {self.ema})")
        for key in ("weight_decay", "decoupled_weight_decay", "x0_loss_weight"):
            if getattr(self, key) < 0:
                raise UserError(f"{where('train.' + key)}: train.{key} must be >= 0 (got {getattr(self, key)})")
        if self.decoupled_weight_decay * self.lr >= 1:
            raise UserError(f"{where('train.decoupled_weight_decay', 'train.lr')}: train.decoupled_weight_decay x "
                            f"train.lr must be < 1, or every step would flip or zero the weights "
                            f"(got {self.decoupled_weight_decay} x {self.lr})")
        for key in ("lr", "lr_final", "clip_norm"):
            if getattr(self, key) <= 0:
                raise UserError(f"{where('train.' + key)}: train.{key} must be > 0 (got {getattr(self, key)})")


@dataclass
class EvaluateConfig:
    num_samples: int = 10000  # samples whose membership (train / held-out / neither) is counted
    replicates: int = 8  # independent bound estimates per sequence, for the standard error
    # the final K scores at most this many (t, x^0) rows per data set (about 4 minutes on one
    # core for the default network): a larger set is scored on a seeded uniform subsample of
    # max_rows / (replicates x T) sequences, its standard error counting the subsampling
    # (null: every sequence, however long it takes)
    max_rows: typing.Optional[int] = 20_000_000
    diagnose: bool = True  # run the ArviZ diagnostics (bdiff diagnose) at the end of training

    def validate(self, where):
        _at_least(where, "evaluate.num_samples", self.num_samples, 1)
        _at_least(where, "evaluate.replicates", self.replicates, 2)
        if self.max_rows is not None:
            _at_least(where, "evaluate.max_rows", self.max_rows, 1)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    seed: int = 0
    device: str = "auto"  # auto (cuda when torch sees a GPU, else cpu) | cpu | cuda
    threads: int = 1  # CPU threads for torch (0: torch's default); 1 is fastest for these small networks (README)

    def validate(self, where):
        _choice(where, "device", self.device, DEVICES)
        _at_least(where, "threads", self.threads, 0)
        if not 0 <= self.seed <= MAX_SEED:
            raise UserError(f"{where('seed')}: seed must be in 0..{MAX_SEED} (got {self.seed})")
        for section in (self.data, self.model, self.train, self.evaluate):
            section.validate(where)
        if self.model.kernel == "bernoulli" and self.data.levels != 2:
            others = ", ".join(name for name in registry.KERNELS if name != "bernoulli")
            raise UserError(f"{where('model.kernel', 'data.levels')}: model.kernel bernoulli needs data.levels = 2 "
                            f"(got {self.data.levels}); use one of {others}")
        if self.train.x0_loss_weight > 0 and self.model.parameterisation != "x0":
            raise UserError(f"{where('train.x0_loss_weight', 'model.parameterisation')}: train.x0_loss_weight "
                            "needs model.parameterisation x0, whose network predicts x^0 "
                            f"(got {self.model.parameterisation})")


    def to_dict(self):
        return dataclasses.asdict(self)


def model_spec(config: Config, n: int) -> ModelSpec:
    """The spec of the model a resolved config describes for sequences of length ``n``
    (``train.resolve_config`` has turned pi_1 = 'data' into a number)."""
    model = config.model
    pi_1 = None
    if model.kernel in registry.KERNELS_WITH_PI_1:
        if isinstance(model.pi_1, str):
            raise ValueError(f"model.pi_1 = {model.pi_1!r} must be resolved to a number first (train.resolve_config)")
        pi_1 = float(model.pi_1)
    return ModelSpec(kernel=model.kernel, schedule=model.schedule, schedule_power=float(model.schedule_power),
                     T=model.T, n=int(n), num_states=config.data.levels, pi_1=pi_1,
                     parameterisation=model.parameterisation, inputs=model.inputs,
                     add_own_evidence=model.add_own_evidence, network=model.network, hidden=tuple(model.hidden),
                     activation=model.activation, time_embedding=model.time_embedding, film=model.film,
                     network_options=network_options(model))


def network_options(model: ModelConfig) -> dict:
    """The keys of a model config that only some networks read (each network takes those its
    constructor names: ``networks.build_network``)."""
    return {key: getattr(model, key) for key in NETWORK_OPTION_KEYS}


#: ModelConfig keys that only some networks read (see each network's constructor)
NETWORK_OPTION_KEYS = ("dropout", "members", "channels", "blocks", "kernel_size", "padding", "image_shape", "heads",
                       "position_code")


# ---------------------------------------------------------------------------------------


def load_config(path, overrides=()):
    """Read a YAML config, apply ``--set KEY=VALUE`` overrides, validate, resolve data paths.

    Keys that do not apply to the data's kind (e.g. ``data.n`` for text files) are ignored with
    a ``ConfigWarning``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not part of the YAML
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file") from None
    except OSError as error:
        raise UserError(f"{path}: cannot read config ({error.strerror})") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise UserError(f"{path}{line}: invalid YAML ({problem})") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a config must be a mapping of sections (got {type(raw).__name__})")
    raw, origin = apply_overrides(raw, overrides), Origin(path, overrides)
    config = config_from_dict(raw, where=origin)
    given = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    ignored = [f"data.{key}" for key in config.data.unused_keys() if key in given]
    if ignored:
        warnings.warn(f"{origin(*ignored)}: {', '.join(ignored)} ignored: not used when data.kind is "
                      f"{config.data.kind}", ConfigWarning, stacklevel=2)
    for key in ("train", "val", "file"):
        value = getattr(config.data, key)
        if value is not None and not Path(value).is_absolute():
            setattr(config.data, key, str((path.parent / value).resolve()))
    return config


class ConfigWarning(UserWarning):
    """A config entry that is accepted but has no effect."""


class Origin:
    """Where config values came from, for messages: ``origin("model.T")`` is the ``--set`` that
    gave model.T (or one of its sections), otherwise the file."""

    def __init__(self, path, overrides=()):
        self.path = str(path)
        self.overrides = {item.partition("=")[0]: f"--set {item}" for item in overrides}

    def __call__(self, *keys):
        for key in keys:
            parts = key.split("[")[0].split(".")  # model.hidden[0] comes from model.hidden
            for depth in range(len(parts), 0, -1):
                source = self.overrides.get(".".join(parts[:depth]))
                if source is not None:
                    return source
        return self.path

    def __str__(self):
        return self.path


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        first_line = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                line = first_line.setdefault(key, key_node.start_mark.line)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if line != key_node.start_mark.line:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first given on line {line + 1})", key_node.start_mark)
        return super().construct_mapping(node, deep)


def apply_overrides(raw, overrides):
    """``["model.T=50", ...]`` -> a copy of raw with those dotted keys set (values parsed as YAML)."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item}: expected KEY=VALUE, e.g. --set model.T=50")
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {item}: {part!r} is not a section")
        try:
            node[leaf] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UserError(f"--set {item}: cannot parse value {value!r}") from None
    return raw


def config_from_dict(raw, where="config"):
    """A validated Config from a dict; ``where`` (a path or an ``Origin``) prefixes the errors."""
    origin = where if isinstance(where, Origin) else Origin(where)
    config = _build(Config, raw, origin, prefix="")
    config.validate(origin)
    return config


def config_text(config):
    """The resolved config as YAML, without the data keys its kind does not use (so that
    reading it back warns about nothing)."""
    values = config.to_dict()
    for key in config.data.unused_keys():
        values["data"].pop(key)
    return yaml.safe_dump(values, sort_keys=False)


def save_config(config, path):
    Path(path).write_text(config_text(config))


def _build(cls, raw, where, prefix):
    if not isinstance(raw, dict):
        name = prefix.rstrip('.') or 'config'
        raise UserError(f"{where(name)}: {name} must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in raw.items():
        if key not in fields:
            raise UserError(f"{where(f'{prefix}{key}')}: unknown config key '{prefix}{key}' "
                            f"(known: {', '.join(fields)})")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            values[key] = _build(hint, value, where, f"{prefix}{key}.")
        else:
            values[key] = _coerce(value, hint, where, f"{prefix}{key}")
    return cls(**values)


def _coerce(value, hint, where, key):
    """Check a YAML scalar against a field's type (ints are accepted where floats are; a float
    must be finite: .nan and .inf are never a sensible setting)."""
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where, key)
            except UserError as error:
                if "finite" in str(error):  # a number, but not a finite one: that is the message
                    raise
        names = " or ".join(getattr(o, "__name__", str(o)) for o in options if o is not type(None))
        raise UserError(f"{where(key)}: {key} must be {names} (got {value!r})")
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise UserError(f"{where(key)}: {key} must be a list (got {value!r})")
        return [_coerce(v, item, where, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise UserError(f"{where(key)}: {key} must be a finite number (got {value})")
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is str and isinstance(value, str):
        return value
    if hint is bool and isinstance(value, bool):
        return value
    raise UserError(f"{where(key)}: {key} must be {hint.__name__} (got {value!r})")


def _at_least(where, key, value, minimum):
    if value < minimum:
        raise UserError(f"{where(key)}: {key} must be >= {minimum} (got {value})")


def check_batch_divides(batch_size, processes):
    """Equal slices of every minibatch on every process: train.batch_size must be a multiple of
    the number of processes."""
    if batch_size % processes:
        raise UserError(f"train.batch_size = {batch_size} is not divisible by the {processes} processes; "
                        f"use a multiple of {processes}")


def _choice(where, key, value, options):
    if value not in options:
        raise UserError(f"{where(key)}: {key} must be one of {', '.join(map(str, options))} (got {value!r})")
