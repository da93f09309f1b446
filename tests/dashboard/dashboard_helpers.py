"""A real federation watched by the dashboard in headless chromium: for the browser test and
scripts/dashboard_screenshot.py.

``gated_tasks`` hold each round's training until a file named after the round exists, so a test decides when
a round may close; the dashboard runs in this process (uvicorn in a thread) and reads the director as any
``fedjax dashboard`` does.
"""
from __future__ import annotations

import importlib.util
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from fedjax_core import FLExperiment, ModelInterface, TaskInterface
from fedjax_core.local import free_port
from fl_experiment import SubsetDataset

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
GATE_WAIT_S = 120.0


def browser_missing() -> str:
    """Why no browser test can run here ('' when it can)."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not Path(path).is_file():
            return f"{path} is not installed (apt-get install chromium chromium-driver; .ci/run does)"
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (pip install -e '.[test]')"
    return ""


def logits(params, images):
    return images.reshape((images.shape[0], -1)) @ params["w"] + params["b"]


def linear_state(lr: float = 0.005) -> train_state.TrainState:
    """A linear softmax classifier of CIFAR-10 images: its start costs the notebook no compilation."""
    params = {"w": jnp.asarray(np.zeros((32 * 32 * 3, 10), np.float32)), "b": jnp.asarray(np.zeros(10, np.float32))}
    return train_state.TrainState.create(apply_fn=logits, params=params, tx=optax.sgd(lr))


def loss_and_accuracy(params, images, labels):
    out = logits(params, images)
    return optax.softmax_cross_entropy_with_integer_labels(out, labels).mean(), jnp.mean(out.argmax(-1) == labels)


@jax.jit
def train_step(state, images, labels):
    grads = jax.grad(lambda p: loss_and_accuracy(p, images, labels)[0])(state.params)
    return state.apply_gradients(grads=grads)


def train_epoch(state, dataset, batch_size: int = 32):
    for start in range(0, len(dataset["label"]) - batch_size + 1, batch_size):  # fixed shapes: one compilation
        state = train_step(state, dataset["image"][start:start + batch_size], dataset["label"][start:start + batch_size])
    return state


def gated_tasks(gate: Path | None) -> TaskInterface:
    """Train one epoch and validate; with a ``gate`` folder, round r trains only once ``gate / str(r)`` exists."""
    TI = TaskInterface()

    @TI.register_fl_task(model="state", data_loader="dataset", optimizer="optimizer", device="device",
                         round_num="round_num")
    def train(state, dataset, optimizer, device, round_num=0):
        deadline = time.monotonic() + GATE_WAIT_S
        while gate is not None and not (gate / str(round_num)).exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"round {round_num}'s gate {gate / str(round_num)} never opened")
            time.sleep(0.05)
        new_state = train_epoch(state, dataset)
        loss, accuracy = jax.jit(loss_and_accuracy)(new_state.params, dataset["image"], dataset["label"])
        return new_state, {"loss": float(loss), "accuracy": float(accuracy)}

    @TI.register_fl_task(model="state", data_loader="dataset", device="device")
    def validate(state, dataset, device):
        loss, accuracy = jax.jit(loss_and_accuracy)(state.params, dataset["image"], dataset["label"])
        return {"loss": float(loss), "accuracy": float(accuracy)}

    return TI


def submit(federation, name: str, rounds: int, gate: Path | None, limit: int = 64, **start_kwargs) -> FLExperiment:
    """Start experiment ``name`` (the linear model on ``limit`` samples per split per envoy); returns at once."""
    exp = FLExperiment(federation=federation, experiment_name=name)
    exp.start(model_provider=ModelInterface(model=linear_state()), task_keeper=gated_tasks(gate),
              data_loader=SubsetDataset(limit=limit), rounds_to_train=rounds, device_assignment_policy="CPU_ONLY",
              **start_kwargs)
    return exp


@contextmanager
def dashboard(director_port: int, refresh_s: float = 0.5) -> Iterator[str]:
    """``fedjax dashboard`` of the director on loopback ``director_port``, in a thread; yields its address."""
    from fedjax_core.api.client import FederationClient
    from fedjax_core.dashboard.app import LOOPBACK_NAMES, create_app
    from fedjax_core.dashboard.command import make_server

    port = free_port()
    app = create_app(FederationClient("127.0.0.1", director_port, None), refresh_s=refresh_s,
                     allowed_hosts=set(LOOPBACK_NAMES))
    server = make_server(app, "127.0.0.1", port)
    thread = threading.Thread(target=server.run, name="dashboard", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the dashboard did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


@contextmanager
def chromium(width: int = 1400, height: int = 1000):
    """Headless Debian chromium driven by selenium, with a throw-away profile; quit on the way out."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="dashboard-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def points(driver, chart: str, trace: str | None = None) -> int:
    """How many points the chart ``chart`` (its data-metric, e.g. 'round/time_s') draws in ``trace`` (or its
    first trace); 0 while it is not drawn."""
    return driver.execute_script(
        "const div = document.querySelector(`[data-metric=\"${arguments[0]}\"]`);"
        "if (!div || !div.data) return 0;"
        "const t = arguments[1] === null ? div.data[0] : div.data.find((d) => d.name === arguments[1]);"
        "return t ? t.x.length : 0;", chart, trace)


def trace_names(driver, chart: str) -> list[str]:
    return driver.execute_script(
        "const div = document.querySelector(`[data-metric=\"${arguments[0]}\"]`);"
        "return div && div.data ? div.data.map((d) => d.name) : [];", chart)


def table_text(driver, table: str) -> str:
    return driver.execute_script(f"return document.querySelector('#{table} tbody').innerText;")


def severe_logs(driver) -> list[str]:
    """The browser console's errors (a Content-Security-Policy refusal, a script error...)."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
