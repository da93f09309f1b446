"""Director and envoy configuration: pydantic models validated once, before any side effect.

Keys keep the seed tutorial's names (``settings.listen_port``, ``shard_descriptor.template``,
``params.cuda_devices``...). Unknown keys are refused, and every error names the dotted
YAML key, what was given and what is expected.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says which key and how to fix it."""


def _shape_entry(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().isdigit():
        raise ValueError(f"a shape entry must be a non-negative integer such as '32', got {value!r}")
    return str(value).strip()


ShapeEntry = Annotated[str, BeforeValidator(_shape_entry)]
CERTIFICATE_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"  # a name `fedjax pki certify --name` accepts


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TLSConfig(_Model):
    """Paths to PEM files (relative paths resolve against the config file's folder)."""

    root_certificate: str
    certificate: str
    private_key: str


class TensorBoardSinkConfig(_Model):
    """TensorBoard runs under ``<log_dir>/<experiment>`` (default: settings.log_dir)."""

    type: Literal["tensorboard"]
    log_dir: str | None = None


class MLflowSinkConfig(_Model):
    """One MLflow run per experiment, named after it, in the MLflow experiment ``experiment_name``.

    ``tracking_uri``: http(s)://server, sqlite:///file.db, file:///path or a plain path (a file
    store, relative to the config file); unset: MLflow's default. Needs `pip install 'fedjax-core[mlflow]'`."""

    type: Literal["mlflow"]
    tracking_uri: str | None = Field(None, min_length=1)
    experiment_name: str = Field("fedjax", min_length=1)


class WandbSinkConfig(_Model):
    """One Weights & Biases run per experiment in ``project``. Needs `pip install 'fedjax-core[wandb]'`."""

    type: Literal["wandb"]
    project: str = Field("fedjax", min_length=1)
    entity: str | None = None
    mode: Literal["offline", "online"] = "offline"
    dir: str | None = None  # where runs are written (relative to the config file); unset: the working directory


def _sink_entry(value: Any) -> Any:
    return {"type": value} if isinstance(value, str) else value  # `- tensorboard` is `- {type: tensorboard}`


SinkConfig = Annotated[TensorBoardSinkConfig | MLflowSinkConfig | WandbSinkConfig, Field(discriminator="type"),
                       BeforeValidator(_sink_entry)]
_SINK_MODELS: dict[str, type[BaseModel]] = {"tensorboard": TensorBoardSinkConfig, "mlflow": MLflowSinkConfig,
                                            "wandb": WandbSinkConfig}


class DirectorSettings(_Model):
    listen_host: str = "localhost"
    listen_port: int = Field(50055, ge=0, le=65535, strict=True)
    sample_shape: list[ShapeEntry]
    target_shape: list[ShapeEntry]
    envoy_health_check_period: float = Field(5.0, gt=0)
    # A round's participant whose envoy sends no heartbeat for this long drops out of the round.
    envoy_timeout_s: float = Field(60.0, gt=0)
    state_dir: str = "director_state"
    log_dir: str = "logs"
    # Threads for short calls (heartbeats, metric reports, status). Long-polls and streams wait
    # without a thread, so this does not grow with the federation.
    max_workers: int = Field(32, ge=4, strict=True)
    # Uploads received at once; more wait their turn (without a thread) and go on when one ends.
    max_uploads: int = Field(4, ge=1, le=256, strict=True)
    # Long-polls and streams (about two per envoy, one per following notebook) held at once; one
    # more is refused as busy and retried by its client.
    max_waiting_calls: int = Field(4096, ge=8, strict=True)
    # A transfer (upload, submission, model or bundle download) that moves no message for this
    # long is ended by the director, so a stalled peer cannot hold a slot or a round.
    stream_idle_s: float = Field(120.0, ge=1, le=86400)
    # Under mTLS, the certificate names allowed to use the notebook API (submit experiments).
    submitters: list[str] = ["api"]
    # Under mTLS, the envoy certificate names that may register (and make any envoy call); unset:
    # any certificate of role envoy from the federation's CA.
    allowed_envoys: list[Annotated[str, Field(pattern=CERTIFICATE_NAME)]] | None = None
    # Under mTLS, certificate names that may cancel any experiment and download its models (an
    # experiment's submitter always may).
    admins: list[str] = []
    # The largest model (all its tensors) an experiment may submit, in bytes.
    max_model_bytes: int = Field(16 << 30, gt=0, strict=True)
    # Keep the files (models, code bundle) of this many most recent ended experiments and remove
    # older ones; their metrics and status stay. Unset: keep everything (`fedjax director gc` on demand).
    keep_experiments: int | None = Field(None, ge=0, strict=True)
    # The audit trail (submissions, cancellations, downloads, registrations, refusals) is in the database, read
    # with `fedjax audit`; a path here also appends it to that file as JSON lines (relative to the config).
    audit_log: str | None = None
    # Where each experiment's metrics go besides the database: a list of {type: tensorboard},
    # {type: mlflow, ...}, {type: wandb, ...}; [] writes none (not even TensorBoard).
    metric_sinks: list[SinkConfig] = [TensorBoardSinkConfig(type="tensorboard")]
    # The gRPC server's event loop: uvloop (installed with fedjax-core on Linux and macOS; a fifth less of the
    # director's CPU per envoy and round, benchmarks/README.md) or Python's own asyncio loop; auto: uvloop when
    # it is installed.
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"

    @model_validator(mode="after")
    def _event_loop_installed(self) -> "DirectorSettings":
        if self.event_loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
            raise ValueError("event_loop: uvloop is not installed here: `pip install uvloop`, or set event_loop to "
                             "auto or asyncio")
        return self


class DirectorConfig(_Model):
    settings: DirectorSettings
    tls: TLSConfig | None = None


class EnvoyParams(_Model):
    cuda_devices: list[Annotated[int, Field(ge=0, strict=True)]] = []
    # Without GPUs: how many CPU devices JAX shows the worker (a task's mesh spans them); unset: one.
    cpu_devices: int | None = Field(None, ge=1, le=1024, strict=True)

    @model_validator(mode="after")
    def _one_kind_of_device(self) -> "EnvoyParams":
        if self.cuda_devices and self.cpu_devices:
            raise ValueError("give cuda_devices (GPUs) or cpu_devices (CPU devices for JAX), not both")
        return self
    jax_preallocate: bool = False
    jax_memory_fraction: float | None = Field(None, gt=0, le=1, strict=True)
    # Experiments this envoy runs at once, each in a worker process of its own (its own device memory):
    # on a GPU, give each a share with jax_memory_fraction (at most 1 / max_experiments).
    max_experiments: int = Field(1, ge=1, le=64, strict=True)

    @model_validator(mode="after")
    def _memory_shares_fit(self) -> "EnvoyParams":
        if self.max_experiments > 1 and self.cuda_devices:
            share = self.jax_memory_fraction
            if share is None and self.jax_preallocate:
                raise ValueError(f"max_experiments: {self.max_experiments} workers share the GPU, but each "
                                 "preallocates 75% of its memory (jax_preallocate: true): set jax_memory_fraction to "
                                 f"at most {1 / self.max_experiments:.2f}, or jax_preallocate: false")
            if share is not None and share * self.max_experiments > 1:
                raise ValueError(f"jax_memory_fraction: {share} for each of max_experiments: {self.max_experiments} "
                                 f"workers is more than the GPU has; give each at most {1 / self.max_experiments:.2f}")
        return self
    work_dir: str = "envoy_workspace"  # relative to the config file
    # Start each experiment's worker ahead of time: an idle process that has imported JAX (no device
    # touched, no experiment's state) takes the next experiment, sparing its first round the imports.
    # false: workers start only when an experiment arrives, and no process waits between experiments.
    standby_worker: bool = Field(True, strict=True)
    # Keep the programs XLA compiles in work_dir/NAME/jax_cache/<submitter>, across experiments (JAX's
    # persistent compilation cache): a rerun of the same model skips compiling it. Every experiment's
    # worker can write there, so it needs settings.accept_from to name exactly one submitter.
    jax_compilation_cache: bool = Field(False, strict=True)
    # The worker reuses the memory it frees (glibc malloc: large blocks from its heap instead of fresh
    # mappings, and the heap never trimmed): every round allocates the model's buffers again, and each fresh
    # mapping is zeroed by the kernel page by page (a quarter of a worker's CPU with a 256 MiB model). Its
    # memory then stays at its peak until it exits with its experiment. false: glibc's defaults.
    worker_reuses_memory: bool = Field(True, strict=True)


class SandboxSettings(_Model):
    # Every worker runs its experiment's code in a sandbox (Linux Landlock): it reads Python, its packages,
    # the shard descriptor's module and the paths its params name, and writes only its own folder. These
    # add files or folders it may read (data a descriptor finds by itself) or also write (a download
    # folder), relative to the config file. Keys and the config stay hidden even inside them.
    read_paths: list[Annotated[str, Field(min_length=1)]] = []
    write_paths: list[Annotated[str, Field(min_length=1)]] = []
    # Where the kernel offers no sandbox (no Landlock: Linux before 5.13, or a container's seccomp filter
    # forbids it) the daemon refuses to start. true runs workers unsandboxed instead: experiment code can
    # then read this envoy's private key and config, the daemon's environment and other experiments' files.
    experiment_code_may_read_envoy_secrets: bool = Field(False, strict=True)


class EnvoySettings(_Model):
    # Submitters (certificate names under mTLS) whose experiments this envoy runs; unset: any
    # submitter the director allows. Without TLS the name is whatever the notebook claims.
    accept_from: list[str] | None = None
    # auto: run every accepted experiment at once; manual: hold each one until the operator decides with
    # `fedjax envoy review -c CONFIG --approve NAME` (or --refuse NAME), having seen its submitter,
    # bundle hash, tasks and package versions.
    review: Literal["auto", "manual"] = "auto"
    # Run each experiment's worker as this local account (the daemon must run as root); unset: the
    # daemon's own user. Give that account read access to the shard's data and nothing more.
    worker_user: str | None = Field(None, min_length=1)
    sandbox: SandboxSettings = SandboxSettings()
    # How long this daemon keeps trying while the director says another daemon of this name is online (a
    # restarted envoy waits for its old daemon to fall silent), before it gives up and exits.
    name_held_wait_s: float = Field(30.0, ge=0, le=3600)


class ShardDescriptorConfig(_Model):
    template: str = Field(pattern=r"^[A-Za-z_][\w.]*\.[A-Za-z_]\w*$")
    params: dict[str, Any] = {}


class EnvoyConfig(_Model):
    settings: EnvoySettings = EnvoySettings()
    params: EnvoyParams = EnvoyParams()
    optional_plugin_components: dict[str, Any] = {}
    shard_descriptor: ShardDescriptorConfig
    tls: TLSConfig | None = None

    @model_validator(mode="after")
    def _one_submitter_per_compilation_cache(self) -> "EnvoyConfig":
        accepted = self.settings.accept_from
        if self.params.jax_compilation_cache and (accepted is None or len(set(accepted)) != 1):
            raise ValueError(
                "params.jax_compilation_cache: true needs settings.accept_from to list exactly one submitter "
                f"(it is {accepted!r}): every experiment's worker can write the cache, so experiments of "
                "different submitters could run programs another one compiled. Name the one submitter, or "
                "set jax_compilation_cache: false")
        return self


M = TypeVar("M", bound=BaseModel)


def load_config(path: str | Path, model: type[M]) -> M:
    """Read and validate a YAML config; raise ConfigError naming the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path.resolve()} (check the -c/--config path)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(model, err) for err in exc.errors()]
        raise ConfigError(f"{path}: invalid configuration:\n  " + "\n  ".join(lines)) from None


def _describe(model: type[BaseModel], err: dict) -> str:
    # a metric sink's loc holds its type after the index (settings.metric_sinks.0.mlflow.x): leave it out
    loc = [p for i, p in enumerate(err["loc"]) if not (p in _SINK_MODELS and i and isinstance(err["loc"][i - 1], int))]
    key = ".".join(str(p) for p in loc) or "(top level)"
    if err["type"] == "union_tag_invalid":
        given = (err.get("ctx") or {}).get("tag", err.get("input"))
        return f"{key}.type: {given!r} is not a metric sink; use one of {', '.join(_SINK_MODELS)}"
    if err["type"] == "union_tag_not_found":
        return f"{key}.type: required key is missing; use one of {', '.join(_SINK_MODELS)}"
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(model, err["loc"][:-1])
        return f"{key}: unknown key; allowed here: {', '.join(allowed)}"
    if err["type"] == "missing":
        return f"{key}: required key is missing"
    if err["type"] == "value_error" and isinstance(err.get("input"), dict):  # a rule across keys: it names them
        return f"{key}: {(err.get('ctx') or {}).get('error', err['msg'])}"
    return f"{key}: {err['msg']} (got {err.get('input')!r})"


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    current: Any = model
    for part in loc:
        if isinstance(part, int):  # an item of a list: its own model follows (a sink's, by type)
            continue
        if part in _SINK_MODELS and part not in getattr(current, "model_fields", {}):
            current = _SINK_MODELS[part]
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        current = field.annotation
        for candidate in getattr(current, "__args__", ()):  # Optional[Model]
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                current = candidate
    return sorted(getattr(current, "model_fields", {}))


def resolve_path(value: str, base: Path) -> Path:
    """``value`` as an absolute path, relative ones taken from ``base``."""
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p).resolve()


def worker_account(settings: EnvoySettings) -> tuple[int, int, str] | None:
    """``settings.worker_user`` as (uid, gid, home), or None when unset; ConfigError when the account does
    not exist or the daemon is not root (only root can start a process as another user)."""
    import os
    import pwd

    name = settings.worker_user
    if name is None:
        return None
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise ConfigError(f"settings.worker_user: no local account named {name!r} on this machine: create it "
                          "(e.g. `useradd --system --no-create-home fedjax-worker`) or remove the key") from None
    if os.geteuid() != 0:
        raise ConfigError(f"settings.worker_user: running workers as {name!r} needs the envoy daemon to run as "
                          "root; start it as root, or remove settings.worker_user to run workers as this user")
    return entry.pw_uid, entry.pw_gid, entry.pw_dir
