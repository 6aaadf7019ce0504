"""Run the ServerApp and ClientApp on Flower's simulation engine (Ray) in this process."""

import random
import socket
import threading
import time
from functools import cache

from flwr.clientapp.typing import Mod
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import in_memory_linkstate
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
from flwr.simulation import run_simulation
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from fl_app.client_app import build_client_app
from fl_app.config_schema import AppConfig, ConfigError
from fl_app.server_app import build_server_app

# Set when Flower's simulation engine has ended. Flower's ServerApp thread waits for replies
# with no end of its own, so when the engine crashes (e.g. no Ray node can host a client)
# it would keep the process alive for ever; our send_and_receive stops on this instead.
engine_stopped = threading.Event()


class EngineStopped(RuntimeError):
    """Raised in the ServerApp's thread: the engine has ended, no reply will come."""


def simulate(cfg: AppConfig, client_mods: tuple[Mod, ...] = ()) -> None:
    """One virtual SuperNode per client, each with the CPUs/GPUs the config gives it;
    `client_mods` wrap every client call (benchmarks/round_budget.py times them).

    Clients are Ray actors: a fractional `mode.num_gpus_per_client` (e.g. 0.25) lets several
    share one GPU, each TensorFlow growing its memory as needed (see fl_app/__init__.py).
    """
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
    wake_on_stored_messages()
    seed_node_ids(cfg.seed)
    engine_stopped.clear()
    try:
        run_simulation(
            server_app=build_server_app(cfg),
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


def seed_node_ids(seed: int) -> None:
    """Draw the ids that Flower's in-memory state gives the simulated SuperNodes from `seed`.

    Flower draws them from `os.urandom`, with no seed to give it. The server samples
    clients in order of id (fl_app/strategy.py: SeededSampling) and node i holds partition
    i, so with random ids the same seed trained different partitions in each run. Flower
    1.42 (pinned) draws them with `generate_rand_int_from_bytes`.
    """
    rng = random.Random(seed)

    def seeded_int(num_bytes: int, exclude: set[int] | None = None) -> int:
        while (number := rng.getrandbits(8 * num_bytes)) in (exclude or ()):
            pass
        return number

    in_memory_linkstate.generate_rand_int_from_bytes = seeded_int


@cache  # once per process
def wake_on_stored_messages() -> None:
    """Let Flower's simulation engine act on a message as soon as it is stored.

    Flower 1.42 (pinned in pyproject.toml) looks for work in fixed 0.1 s steps: its dispatcher
    for messages to the clients (`vce_api.add_messages_to_queue`) and the ServerApp's grid
    for their replies (`InMemoryGrid.send_and_receive`). Those two waits left each worker
    idle 4-6 % of a 3 s round (benchmarks/round_budget.py, docs/benchmarks.md). Flower has
    no hook to wake them (polling faster cost the driver CPU the workers lacked), so its
    in-memory state now signals every message it stores and both loops wake on that signal,
    still looking at least every 0.1 s as before. Written for Flower 1.42's own loops.

    Flower's dispatcher also asked the state for every node's messages at each look, which
    kept 0.6 of a core busy with 10,000 nodes; it now asks only for the nodes that a message
    was stored for since.
    """
    to_clients, replies = threading.Event(), threading.Event()
    addressed: set[int] = set()  # nodes with a message stored for them, maybe not yet dispatched
    store_message_ins, store_message_res = InMemoryLinkState.store_message_ins, InMemoryLinkState.store_message_res

    def store_and_wake_dispatcher(state, message):
        message_id = store_message_ins(state, message)
        if message_id is not None:  # else refused as invalid
            addressed.add(message.metadata.dst_node_id)
            to_clients.set()
        return message_id

    def store_and_wake_grid(state, message):
        message_id = store_message_res(state, message)
        replies.set()
        return message_id

    InMemoryLinkState.store_message_ins = store_and_wake_dispatcher
    InMemoryLinkState.store_message_res = store_and_wake_grid

    def add_messages_to_queue(state, queue, nodes_mapping, f_stop) -> None:
        while not f_stop.is_set():
            to_clients.clear()  # before looking: a message stored meanwhile wakes the next wait
            for node_id in addressed.copy():
                addressed.discard(node_id)  # a message stored from now on adds it again
                if node_id not in nodes_mapping:  # not a node of this simulation
                    continue
                for message in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(message)
                    addressed.add(node_id)  # one at a time, as Flower does: look again
            to_clients.wait(0.1)

    def send_and_receive(grid, messages, *, timeout=None):
        waiting = set(grid.push_messages(messages))
        deadline = None if timeout is None else time.time() + timeout
        received = []
        while waiting and (deadline is None or time.time() < deadline):
            if engine_stopped.is_set():
                raise EngineStopped("Flower's simulation engine has stopped; its error is above")
            replies.clear()
            for reply in grid.pull_messages(waiting):
                received.append(reply)
                waiting.discard(reply.metadata.reply_to_message_id)
            if waiting:
                replies.wait(grid.pull_interval)
        return received

    vce_api.add_messages_to_queue = add_messages_to_queue
    InMemoryGrid.send_and_receive = send_and_receive
