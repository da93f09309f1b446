"""fedjax_core.config: the shipped configs load, and every error names the dotted key."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from fedjax_core.config import ConfigError, DirectorConfig, EnvoyConfig, load_config, resolve_path

REPO = Path(__file__).resolve().parents[1]

DIRECTOR_YAML = """\
settings:
  listen_host: localhost
  listen_port: 50055
  sample_shape: ['32', '32', '3']
  target_shape: ['1']
  envoy_health_check_period: 5
"""

ENVOY_YAML = """\
params:
  cuda_devices: []
optional_plugin_components: {}
shard_descriptor:
  template: cifar10_shard_descriptor.CIFAR10ShardDescriptor
  params:
    rank_worldsize: 1, 2
"""


def _write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def _error(tmp_path: Path, text: str, model) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text), model)
    return str(info.value)


# ------------------------------------------------------------- shipped configs
def test_shipped_director_config_loads():
    cfg = load_config(REPO / "director" / "director_config.yaml", DirectorConfig)
    s = cfg.settings
    assert s.listen_port == 50055
    assert s.sample_shape == ["32", "32", "3"]
    assert s.target_shape == ["1"]
    assert s.envoy_health_check_period == 5
    assert cfg.tls is None  # commented out: start_director.sh passes --disable-tls


@pytest.mark.parametrize("name, rank", [("envoy_config.yaml", "1, 2"), ("envoy_config_2.yaml", "2, 2")])
def test_shipped_envoy_configs_load(name, rank):
    cfg = load_config(REPO / "envoy" / name, EnvoyConfig)
    assert cfg.shard_descriptor.template == "cifar10_shard_descriptor.CIFAR10ShardDescriptor"
    assert cfg.shard_descriptor.params["rank_worldsize"] == rank
    assert cfg.params.cuda_devices == []
    assert cfg.params.jax_preallocate is False
    assert cfg.params.jax_memory_fraction is None
    assert cfg.optional_plugin_components == {}


def test_minimal_configs_take_defaults(tmp_path):
    d = load_config(_write(tmp_path, "settings: {sample_shape: [32, '32', 3], target_shape: ['1']}\n"), DirectorConfig)
    assert d.settings.listen_port == 50055
    assert d.settings.sample_shape == ["32", "32", "3"]  # ints become the tutorial's strings
    e = load_config(_write(tmp_path, "shard_descriptor: {template: mod.Cls}\n"), EnvoyConfig)
    assert e.params.cuda_devices == [] and e.shard_descriptor.params == {}


# ---------------------------------------------------------------------- errors
def test_unknown_key_names_the_dotted_key_and_allowed_keys(tmp_path):
    msg = _error(tmp_path, DIRECTOR_YAML.replace("listen_port:", "listen_prot:"), DirectorConfig)
    assert "settings.listen_prot" in msg
    assert "unknown key" in msg
    line = next(line for line in msg.splitlines() if "settings.listen_prot" in line)
    for allowed in ("listen_port", "listen_host", "sample_shape", "target_shape", "envoy_health_check_period"):
        assert allowed in line, allowed


def test_event_loop_is_auto_uvloop_or_asyncio_and_uvloop_must_be_installed(tmp_path, monkeypatch):
    d = load_config(_write(tmp_path, DIRECTOR_YAML), DirectorConfig)
    assert d.settings.event_loop == "auto"
    msg = _error(tmp_path, DIRECTOR_YAML.replace("settings:\n", "settings:\n  event_loop: trio\n", 1), DirectorConfig)
    assert "settings.event_loop" in msg and "uvloop" in msg and "asyncio" in msg
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvloop" else real(name, *a))
    msg = _error(tmp_path, DIRECTOR_YAML.replace("settings:\n", "settings:\n  event_loop: uvloop\n", 1), DirectorConfig)
    assert "uvloop is not installed" in msg and "pip install uvloop" in msg
    assert load_config(_write(tmp_path, DIRECTOR_YAML.replace("settings:\n", "settings:\n  event_loop: asyncio\n", 1)),
                       DirectorConfig).settings.event_loop == "asyncio"


def test_unknown_top_level_key(tmp_path):
    msg = _error(tmp_path, DIRECTOR_YAML + "setings: {}\n", DirectorConfig)
    assert "setings" in msg and "unknown key" in msg
    assert "settings" in msg and "tls" in msg


def test_unknown_envoy_param_lists_allowed(tmp_path):
    msg = _error(tmp_path, ENVOY_YAML.replace("cuda_devices", "cuda_device"), EnvoyConfig)
    assert "params.cuda_device" in msg and "unknown key" in msg
    assert "cuda_devices" in msg and "jax_memory_fraction" in msg


def test_wrong_type_names_key_and_value(tmp_path):
    msg = _error(tmp_path, DIRECTOR_YAML.replace("listen_port: 50055", "listen_port: abc"), DirectorConfig)
    assert "settings.listen_port" in msg
    assert "'abc'" in msg


@pytest.mark.parametrize("port", [70000, -1])
def test_port_out_of_range(tmp_path, port):
    msg = _error(tmp_path, DIRECTOR_YAML.replace("listen_port: 50055", f"listen_port: {port}"), DirectorConfig)
    assert "settings.listen_port" in msg
    assert str(port) in msg


def test_missing_required_key(tmp_path):
    text = "".join(line + "\n" for line in DIRECTOR_YAML.splitlines() if "sample_shape" not in line)
    msg = _error(tmp_path, text, DirectorConfig)
    assert "settings.sample_shape" in msg
    assert "missing" in msg
    assert "target_shape" not in msg  # only the missing key is reported


def test_missing_shard_descriptor(tmp_path):
    msg = _error(tmp_path, "params: {cuda_devices: []}\n", EnvoyConfig)
    assert "shard_descriptor" in msg and "missing" in msg


@pytest.mark.parametrize("entry", ["'abc'", "-3", "3.5", "true", "[1]"])
def test_bad_shape_entry(tmp_path, entry):
    msg = _error(tmp_path, DIRECTOR_YAML.replace("['32', '32', '3']", f"['32', {entry}, '3']"), DirectorConfig)
    assert "settings.sample_shape.1" in msg


@pytest.mark.parametrize("fraction", ["1.5", "0", "-0.1"])
def test_jax_memory_fraction_out_of_range(tmp_path, fraction):
    text = ENVOY_YAML.replace("cuda_devices: []", f"cuda_devices: []\n  jax_memory_fraction: {fraction}")
    msg = _error(tmp_path, text, EnvoyConfig)
    assert "params.jax_memory_fraction" in msg
    assert fraction in msg


def test_jax_memory_fraction_in_range_is_kept(tmp_path):
    text = ENVOY_YAML.replace("cuda_devices: []", "cuda_devices: [0, 1]\n  jax_memory_fraction: 0.45")
    cfg = load_config(_write(tmp_path, text), EnvoyConfig)
    assert cfg.params.jax_memory_fraction == 0.45
    assert cfg.params.cuda_devices == [0, 1]


def test_negative_cuda_device(tmp_path):
    msg = _error(tmp_path, ENVOY_YAML.replace("cuda_devices: []", "cuda_devices: [-1]"), EnvoyConfig)
    assert "params.cuda_devices.0" in msg


@pytest.mark.parametrize("template", ["CIFAR10ShardDescriptor", "module.", "1mod.Cls", "mod/x.Cls", "mod.Cls()"])
def test_bad_template(tmp_path, template):
    text = ENVOY_YAML.replace("cifar10_shard_descriptor.CIFAR10ShardDescriptor", repr(template))
    msg = _error(tmp_path, text, EnvoyConfig)
    assert "shard_descriptor.template" in msg
    assert template in msg


def test_missing_file_names_the_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config("nowhere/director_config.yaml", DirectorConfig)
    assert str(tmp_path / "nowhere" / "director_config.yaml") in str(info.value)


def test_invalid_yaml(tmp_path):
    msg = _error(tmp_path, "settings: {listen_port: [1, 2\n", DirectorConfig)
    assert "not valid YAML" in msg
    assert "config.yaml" in msg


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "list"), ("just a string\n", "str"), ("42\n", "int")])
def test_top_level_must_be_a_mapping(tmp_path, text, kind):
    msg = _error(tmp_path, text, DirectorConfig)
    assert "mapping" in msg and kind in msg


def test_empty_file_reports_missing_settings(tmp_path):
    msg = _error(tmp_path, "", DirectorConfig)
    assert "settings" in msg and "missing" in msg


def test_several_errors_are_all_reported(tmp_path):
    text = DIRECTOR_YAML.replace("listen_port: 50055", "listen_port: abc").replace("listen_host:", "listen_hst:")
    msg = _error(tmp_path, text, DirectorConfig)
    assert "settings.listen_port" in msg and "settings.listen_hst" in msg


def test_tls_section_unknown_key(tmp_path):
    text = DIRECTOR_YAML + "tls:\n  root_certificate: ca.crt\n  certificate: d.crt\n  private_kye: d.key\n"
    msg = _error(tmp_path, text, DirectorConfig)
    assert "tls.private_kye" in msg and "unknown key" in msg
    assert "private_key" in msg and "root_certificate" in msg


def test_resolve_path(tmp_path):
    assert resolve_path("a/b.crt", tmp_path) == (tmp_path / "a" / "b.crt").resolve()
    assert resolve_path("/abs/c.crt", tmp_path) == Path("/abs/c.crt")


@pytest.mark.parametrize("model, text, key", [
    (DirectorConfig, DIRECTOR_YAML.replace("listen_port: 50055", "listen_port: true"), "settings.listen_port"),
    (EnvoyConfig, ENVOY_YAML.replace("cuda_devices: []", "cuda_devices: [true]"), "params.cuda_devices.0"),
    (EnvoyConfig, ENVOY_YAML.replace("cuda_devices: []", "cuda_devices: []\n  jax_memory_fraction: true"),
     "params.jax_memory_fraction"),
])
def test_a_bool_is_not_a_number(tmp_path, model, text, key):
    # YAML `true` must not silently become port 1, GPU 1 or a memory fraction of 1.0
    # (shape entries already refuse bools the same way).
    msg = _error(tmp_path, text, model)
    assert key in msg


def test_allowed_envoys_defaults_to_any_envoy_and_takes_certificate_names(tmp_path):
    assert load_config(_write(tmp_path, DIRECTOR_YAML), DirectorConfig).settings.allowed_envoys is None
    listed = load_config(_write(tmp_path, DIRECTOR_YAML + "  allowed_envoys: [env_one, env-2.example.org]\n"),
                         DirectorConfig)
    assert listed.settings.allowed_envoys == ["env_one", "env-2.example.org"]
    msg = _error(tmp_path, DIRECTOR_YAML + "  allowed_envoys: [env one]\n", DirectorConfig)
    assert "settings.allowed_envoys.0" in msg and "'env one'" in msg
    msg = _error(tmp_path, DIRECTOR_YAML + "  allowed_envoy: [env_one]\n", DirectorConfig)
    assert "settings.allowed_envoy: unknown key" in msg and "allowed_envoys" in msg


@pytest.mark.parametrize("accept_from", [None, [], ["lab-a", "lab-b"]])  # ["lab-a", "lab-a"] is one: loads
def test_a_compilation_cache_needs_exactly_one_submitter(tmp_path, accept_from):
    settings = "" if accept_from is None else f"settings: {{accept_from: {accept_from}}}\n"
    text = ENVOY_YAML.replace("  cuda_devices: []", "  cuda_devices: []\n  jax_compilation_cache: true") + settings
    msg = _error(tmp_path, text, EnvoyConfig)
    assert "params.jax_compilation_cache: true needs settings.accept_from to list exactly one submitter" in msg
    assert "got {" not in msg  # a rule across keys names them; the whole input is not echoed


def test_a_compilation_cache_for_one_submitter_loads(tmp_path):
    text = ENVOY_YAML.replace("  cuda_devices: []", "  cuda_devices: []\n  jax_compilation_cache: true")
    cfg = load_config(_write(tmp_path, text + "settings: {accept_from: [lab-a, lab-a]}\n"), EnvoyConfig)
    assert cfg.params.jax_compilation_cache and set(cfg.settings.accept_from) == {"lab-a"}
    assert not load_config(_write(tmp_path, ENVOY_YAML), EnvoyConfig).params.jax_compilation_cache  # off by default
