"""Run the ServerApp and ClientApp on Flower's simulation engine (Ray) in this process."""

import socket
import threading
import time

from flwr.clientapp.typing import Mod
from flwr.simulation import run_simulation

from fl_app.client_app import build_client_app
from fl_app.config_schema import AppConfig, ConfigError
from fl_app.library_patches import seed_node_ids, wake_on_stored_messages
from fl_app.server_app import build_server_app, check_output_dir
from fl_app.task import check_images, task_of

# Set when Flower's simulation engine has ended, e.g. crashed because no Ray node can host a
# client: the ServerApp's waits for replies then stop (StoppableGrid).
engine_stopped = threading.Event()


class EngineStopped(RuntimeError):
    """Raised in the ServerApp's thread: the engine has ended, no reply will come."""


def simulate(cfg: AppConfig, client_mods: tuple[Mod, ...] = ()) -> None:
    """One virtual SuperNode per client, each with the CPUs/GPUs the config gives it;
    `client_mods` wrap every client call (benchmarks/round_budget.py times them).

    Clients are Ray actors: a fractional `mode.num_gpus_per_client` (e.g. 0.25) lets several
    share one GPU, each TensorFlow growing its memory as needed (see fl_app/__init__.py).
    """
    check_output_dir(cfg)  # before anything starts or is checked
    backend_config = {
        "client_resources": {
            "num_cpus": cfg.mode.num_cpus_per_client,
            "num_gpus": cfg.mode.num_gpus_per_client,
        },
        # The workers' own output (TensorFlow's start-up in each) stays in Ray's logs.
        "init_args": {"log_to_driver": cfg.verbose},
    }
    if cfg.mode.ray_address:
        # Join a running Ray cluster instead of starting a private Ray on this machine.
        check_ray_head_answers(cfg.mode.ray_address)
        backend_config["init_args"]["address"] = cfg.mode.ray_address
    # An unreadable image stops the run here, naming it, not as failed clients mid-run.
    check_images(task_of(cfg.dataset))
    replies = wake_on_stored_messages()
    seed_node_ids(cfg.seed)
    engine_stopped.clear()
    try:
        run_simulation(
            server_app=build_server_app(cfg, lambda grid: StoppableGrid(grid, engine_stopped, replies)),
            client_app=build_client_app(cfg, client_mods),
            num_supernodes=cfg.num_clients,
            backend_config=backend_config,
        )
    except RuntimeError as err:
        if _no_room_for_a_client(err):
            raise ConfigError(
                "mode.num_cpus_per_client / mode.num_gpus_per_client",
                f"got {cfg.mode.num_cpus_per_client} / {cfg.mode.num_gpus_per_client}, but no Ray node has "
                "that many CPUs and GPUs for one virtual client (Flower's warning above says what it "
                "found); each must be at most a node's own, num_gpus_per_client 0 without a GPU",
            ) from err
        raise
    finally:
        engine_stopped.set()  # a ServerApp still waiting for replies that will never come stops


def check_ray_head_answers(address: str) -> None:
    """Fail at once, naming the key, when no Ray head listens at `address` (HOST:PORT, or
    ray://HOST:PORT). Ray itself retries a wrong address for minutes, printing only its own
    warnings; `auto` is left to Ray, which says at once when it finds no cluster."""
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError) as err:
        raise ConfigError("mode.ray_address", f"got {address!r}, but no Ray head answers there ({err}); start "
                          "one with `ray start --head` and give the HOST:PORT it prints, or auto") from None


def _no_room_for_a_client(err: BaseException | None) -> bool:
    """Whether Flower's engine stopped because no Ray node can host one client: Flower 1.42
    raises a ValueError ("ActorPool is empty") and wraps it in two RuntimeErrors."""
    while err is not None:
        if isinstance(err, ValueError) and "ActorPool is empty" in str(err):
            return True
        err = err.__cause__
    return False


class StoppableGrid:
    """The simulation's grid, whose waits for replies end when Flower's engine has stopped.

    Flower's own `send_and_receive` waits with no end of its own, so a crashed engine would
    keep the process alive for ever. This waits through the grid's public push and pull,
    waking when `replies` is set (fl_app.library_patches: at every reply stored) and at
    least every `pull_interval`, as Flower's does.
    """

    def __init__(self, grid, stopped: threading.Event, replies: threading.Event) -> None:
        self.grid = grid
        self.stopped = stopped
        self.replies = replies

    def send_and_receive(self, messages, *, timeout: float | None = None):
        waiting = set(self.grid.push_messages(messages))
        deadline = None if timeout is None else time.time() + timeout
        received = []
        while waiting and (deadline is None or time.time() < deadline):
            if self.stopped.is_set():
                raise EngineStopped("Flower's simulation engine has stopped; its error is above")
            self.replies.clear()
            for reply in self.grid.pull_messages(waiting):
                received.append(reply)
                waiting.discard(reply.metadata.reply_to_message_id)
            if waiting:
                self.replies.wait(self.grid.pull_interval)
        return received

    def __getattr__(self, name: str):
        return getattr(self.grid, name)
