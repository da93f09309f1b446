"""compose.yaml, the SLURM script, the deploy configs and the Dockerfile agree with the CLI and its config models.

Every ``fedjax ...`` command line in them (and in the deploy docs' shell blocks) must parse with
``fedjax_core.cli.build_parser()`` leaving no unknown argument, and every config they start a
party with must validate with ``fedjax_core.config``.
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
from pathlib import Path, PurePosixPath

import pytest
import yaml

from fedjax_core.cli import build_parser
from fedjax_core.config import DirectorConfig, EnvoyConfig, load_config

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "compose.yaml"
SBATCH = REPO / "deploy" / "slurm" / "envoys.sbatch"
TEMPLATE = REPO / "deploy" / "slurm" / "envoy_config.template.yaml"
DOCS = [REPO / "docs" / "deploy.md", REPO / "deploy" / "slurm" / "README.md"]
IMAGE_ENTRYPOINT = ["fedjax"]
# words after which `fedjax` is the command being run (not, say, the argument of `command -v`)
COMMAND_POSITION = {"exec", "srun", "then", "do", "else", "time", "sudo", "!", "$", ";", "&&", "||", "|", "("}
_VARIABLE = re.compile(r"\$(?:\{(\w+)(?::?[-?=]([^}]*))?\}|(\w+))")


def expand(text: str, variables: dict[str, str], placeholder: str = "x") -> str:
    """Shell-style ``$VAR``, ``${VAR}``, ``${VAR:-default}``: known values, else the default, else ``placeholder``."""
    def one(m: re.Match) -> str:
        name = m.group(1) or m.group(3)
        if name in variables:
            return variables[name]
        return expand(m.group(2), variables, placeholder) if m.group(2) else placeholder
    return _VARIABLE.sub(one, text)


def fedjax_commands(script: str, variables: dict[str, str] | None = None) -> list[list[str]]:
    """The arguments of every `fedjax` command in a shell script, comments included, variables expanded."""
    commands = []
    for line in script.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(re.sub(r"^\s*#+", "", line), posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        try:
            tokens = list(lexer)
        except ValueError:  # prose in a comment (an apostrophe): no command there
            continue
        for i, token in enumerate(tokens):
            if PurePosixPath(token).name == "fedjax" and (i == 0 or tokens[i - 1] in COMMAND_POSITION):
                args = []
                for arg in tokens[i + 1:]:
                    if re.fullmatch(r"[;&|()<>]+", arg):
                        break
                    args.append(expand(arg, variables or {}))
                commands.append(args)
    return commands


def shell_defaults(script: str) -> dict[str, str]:
    """``NAME="${NAME:-default}"`` assignments of a script, as {NAME: default}."""
    return {name: default for name, default in re.findall(r'^(\w+)="\$\{\1:-([^}]*)\}"', script, re.MULTILINE)}


def parse_problem(args: list[str]) -> str | None:
    """Why ``fedjax ARGS`` would not parse (unknown subcommand or flag, a missing or bad value), or None."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            _, unknown = build_parser().parse_known_args(args)
    except SystemExit:
        return f"fedjax {shlex.join(args)}: {err.getvalue().strip().splitlines()[-1]}"
    return f"fedjax {shlex.join(args)}: unknown arguments {unknown}" if unknown else None


def compose_interpolate(text: str) -> str:
    """Compose's own interpolation: ``$$`` is a literal ``$`` (the container's shell sees it), variables
    take their defaults."""
    return re.sub(r"\$\$|\$\{(\w+)(?::?-([^}]*))?\}",
                  lambda m: "$" if m.group(0) == "$$" else (m.group(2) if m.group(2) is not None else "x"), text)


def compose_commands(text: str) -> list[tuple[str, list[str]]]:
    """(service, fedjax arguments) for every fedjax command a compose file runs, in exec form or in a shell."""
    doc = yaml.safe_load(compose_interpolate(text))
    found = []
    for name, service in doc["services"].items():
        entrypoint = service.get("entrypoint", IMAGE_ENTRYPOINT)
        entrypoint = shlex.split(entrypoint) if isinstance(entrypoint, str) else list(entrypoint)
        command = service.get("command", [])
        command = shlex.split(command) if isinstance(command, str) else [str(c) for c in command]
        argv = entrypoint + command
        if argv[:1] == ["fedjax"]:
            found.append((name, argv[1:]))
        elif PurePosixPath(argv[0]).name in ("sh", "bash") and "-c" in argv:
            script = argv[argv.index("-c") + 1]
            env = {k: str(v) for k, v in (service.get("environment") or {}).items()}
            found += [(name, args) for args in fedjax_commands(script, env)]
    return found


def problems(commands: list[tuple[str, list[str]]]) -> list[str]:
    return [f"{where}: {problem}" for where, args in commands if (problem := parse_problem(args))]


def _flag(args: list[str], *names: str) -> str:
    return next(args[i + 1] for i, a in enumerate(args) if a in names)


# ---- every fedjax command line parses -----------------------------------------------------------

def test_compose_commands_parse():
    commands = compose_commands(COMPOSE.read_text())
    kinds = {tuple(args[:2]) for _, args in commands}
    assert {("director", "start"), ("envoy", "start"), ("pki", "init"), ("pki", "certify")} <= kinds, commands
    assert problems(commands) == []


def test_sbatch_commands_parse():
    script = SBATCH.read_text()
    commands = fedjax_commands(script, shell_defaults(script))
    assert ["envoy", "start"] in [args[:2] for args in commands], commands
    assert problems([("envoys.sbatch", args) for args in commands]) == []


def test_deploy_docs_commands_parse():
    commands = []
    for doc in DOCS:
        for block in re.findall(r"```(?:bash|sh|console)?\n(.*?)```", doc.read_text(), re.DOTALL):
            commands += [(doc.name, args) for args in fedjax_commands(block, {"DIRECTOR_PORT": "50055"})]
    assert commands, "the deploy docs show fedjax commands"
    assert problems(commands) == []


# ---- ... and the check catches what it should ----------------------------------------------------

@pytest.mark.parametrize("args, says", [
    (["envoy", "start", "-n", "env1", "-c", "c.yaml", "--made-up-flag"], "unknown arguments ['--made-up-flag']"),
    (["envoy", "start", "-n", "env1", "-c", "c.yaml", "-dp", "port"], "a port is a number"),
    (["director", "launch", "-c", "c.yaml"], "invalid choice: 'launch'"),
    (["envoy", "start", "-c", "c.yaml"], "required: -n/--shard-name"),
    (["pki", "certify", "--dir", "pki", "--name", "env1", "--role", "notebook"], "invalid choice: 'notebook'"),
])
def test_the_check_fails_on_a_bad_command(args, says):
    assert says in (parse_problem(args) or "")


def test_the_check_fails_on_a_made_up_flag_in_the_files():
    compose = COMPOSE.read_text().replace("[director, start,", "[director, start, --made-up-flag,")
    assert any("--made-up-flag" in p for p in problems(compose_commands(compose)))
    compose = COMPOSE.read_text().replace("--name api --role api", "--name api --made-up-role api")
    assert any("--made-up-role" in p for p in problems(compose_commands(compose)))  # in the pki service's shell
    script = SBATCH.read_text().replace('-dp "$DIRECTOR_PORT"', '--director-prt "$DIRECTOR_PORT"')
    assert any("--director-prt" in p for p in
               problems([("envoys.sbatch", args) for args in fedjax_commands(script, shell_defaults(script))]))


# ---- the configs they start parties with are valid ---------------------------------------------

def _compose_services() -> dict:
    return yaml.safe_load(compose_interpolate(COMPOSE.read_text()))["services"]


def _mounts(service: dict) -> dict[str, str]:
    """{container path: host path or volume name} of a compose service."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        mounts[target] = source
    return mounts


def _host_file(service: dict, container_path: str) -> Path:
    source = _mounts(service).get(container_path)
    assert source is not None and source.startswith("."), f"{container_path} is not bind-mounted from a file"
    return (COMPOSE.parent / source).resolve()


def _mounted(service: dict, container_path: str) -> bool:
    return any(PurePosixPath(container_path).is_relative_to(target) for target in _mounts(service))


def test_compose_configs_validate_and_their_paths_are_mounted():
    services = _compose_services()
    started = {name: args for name, args in compose_commands(COMPOSE.read_text()) if args[1:2] == ["start"]}
    director_name = next(name for name, args in started.items() if args[0] == "director")
    envoy_names = sorted(name for name, args in started.items() if args[0] == "envoy")
    assert len(envoy_names) == 2

    director = services[director_name]
    config = load_config(_host_file(director, _flag(started[director_name], "-c")), DirectorConfig)
    assert config.tls is not None and config.settings.listen_host == "0.0.0.0"
    assert f"{config.settings.listen_port}" in " ".join(director["ports"])
    assert sorted(config.settings.allowed_envoys or []) == envoy_names
    for path in (config.settings.state_dir, config.settings.log_dir, *config.tls.model_dump().values()):
        assert _mounted(director, path), f"{director_name}: {path} is not on a volume"

    for name in envoy_names:
        args, service = started[name], services[name]
        assert _flag(args, "-n") == name
        assert _flag(args, "-dh") == director_name  # the name in the director's certificate
        assert int(_flag(args, "-dp")) == config.settings.listen_port
        config_file = _host_file(service, _flag(args, "-c"))
        envoy = load_config(config_file, EnvoyConfig)
        assert envoy.tls is not None and envoy.tls.certificate.endswith(f"/{name}.crt")
        module = envoy.shard_descriptor.template.rsplit(".", 1)[0]
        beside = str(PurePosixPath(_flag(args, "-c")).parent / f"{module}.py")
        assert _host_file(service, beside).is_file(), f"{name}: the shard descriptor is not mounted beside its config"
        data_dir = envoy.shard_descriptor.params["data_dir"]
        for path in (envoy.params.work_dir, data_dir, *envoy.tls.model_dump().values()):
            assert _mounted(service, path), f"{name}: {path} is not on a volume"

    pki_script = " ".join(" ".join(args) for name, args in compose_commands(COMPOSE.read_text()) if args[0] == "pki")
    assert f"--name {director_name} --role director" in pki_script
    assert "--name api --role api" in pki_script


def _docker_runs(doc: Path) -> list[list[str]]:
    """The arguments of every ``docker run`` in a doc's shell blocks, with ``$PWD`` as the repository."""
    runs = []
    for block in re.findall(r"```(?:bash|sh|console)?\n(.*?)```", doc.read_text(), re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip().startswith("docker run "):
                runs.append(shlex.split(line.replace("$PWD", str(REPO)), comments=True)[2:])
    return runs


def test_the_docs_docker_run_director_would_start_and_serve_its_published_port():
    """The director a doc starts with ``docker run`` gets a config that validates, listens on every interface
    of the container (the port is published), and keeps its state and logs on a writable volume."""
    [args] = [a for a in _docker_runs(REPO / "docs" / "deploy.md") if "director" in a and "start" in a]
    mounts = {}
    for i, arg in enumerate(args):
        if arg == "-v":
            source, target, *mode = args[i + 1].split(":")
            mounts[target] = (source, mode == ["ro"])
    config_path = _flag(args, "-c")
    source, _ = mounts[config_path]
    config = load_config(Path(source), DirectorConfig)
    assert config.settings.listen_host == "0.0.0.0", "a container's localhost is not reachable through -p"
    assert f"{config.settings.listen_port}:{config.settings.listen_port}" in args
    for path in (config.settings.state_dir, config.settings.log_dir):
        target = next((t for t in mounts if PurePosixPath(path).is_relative_to(t)), None)
        assert target is not None and not mounts[target][1], f"{path} is not on a writable volume"
    assert config.tls is not None
    for path in config.tls.model_dump().values():
        assert any(PurePosixPath(path).is_relative_to(t) for t in mounts), f"{path} is not mounted"


def _render_template(rank: int, world: int, name: str) -> str:
    """The template as envoys.sbatch fills it; every placeholder it has is one the script replaces."""
    template, script = TEMPLATE.read_text(), SBATCH.read_text()
    assert set(re.findall(r"@(\w+)@", template)) == set(re.findall(r"s\|@(\w+)@\|", script))
    values = {"RANK": str(rank), "WORLD_SIZE": str(world), "NAME": name, "DATA_DIR": "/shared/cifar10",
              "PKI_DIR": "/home/me/pki", "WORK_DIR": f"/scratch/{name}", "CUDA_DEVICES": "[]"}
    return re.sub(r"@(\w+)@", lambda m: values[m.group(1)], template)


@pytest.mark.parametrize("cuda", ["[]", "[0]", "[2,3]"])
def test_slurm_template_renders_a_valid_envoy_config(tmp_path, cuda):
    text = _render_template(3, 4, "env3").replace("cuda_devices: []", f"cuda_devices: {cuda}")
    (tmp_path / "envoy_config.yaml").write_text(text)
    config = load_config(tmp_path / "envoy_config.yaml", EnvoyConfig)
    assert config.shard_descriptor.params["rank_worldsize"] == "3, 4"
    assert config.params.cuda_devices == json.loads(cuda)
    assert config.tls is not None and config.tls.certificate == "/home/me/pki/env3.crt"


# ---- the image ---------------------------------------------------------------------------------

def test_dockerfile_runs_fedjax_as_a_user_with_only_what_it_installs():
    lines = [line.strip() for line in (REPO / "Dockerfile").read_text().splitlines()]
    entrypoint = [line for line in lines if line.startswith("ENTRYPOINT ")]
    assert json.loads(entrypoint[-1].removeprefix("ENTRYPOINT ")) == IMAGE_ENTRYPOINT
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    copies = [line.split()[1:-1] for line in lines if line.startswith("COPY ") and "--from" not in line]
    copied = {word for words in copies for word in words}
    assert {"pyproject.toml", "README.md", "fedjax_core", "fedjax_proto"} <= copied
    assert not any("[test]" in line for line in lines)
    ignored = {line.strip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
               if line and not line.startswith("#")}
    assert not ignored & copied and {".git", ".venv", "tests"} <= ignored
