"""Every change fl_app makes to another library's internals, and what else of theirs it
relies on beyond their public API: one place, each guarded by version.

A patch applies only on the library version it was written for; on any other, fl_app runs
on the library's stock behaviour and logs once that the patch is off. `RELIANCES` are
internals fl_app reads or imports without replacing them. tests/test_library_patches.py
pins the source of every function each one replaces or relies on, so that a version bump
shows exactly what to re-check; docs/upgrading.md walks through them. Gains are measured
in docs/benchmarks.md. The libraries are imported inside the patches, so model code can
use this module without importing Flower.
"""

import importlib
import logging
import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from importlib.metadata import version

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Touchpoint:
    """Functions of `library` (as "module:attribute.path") that fl_app replaces or relies on,
    as they are in version `written_for`."""

    library: str
    written_for: str
    targets: tuple[str, ...]
    why: str

    def is_current(self) -> bool:
        return version(self.library) == self.written_for


_originals: dict[str, object] = {}  # target -> what it was before a patch replaced it
_reported_off: set[str] = set()


def original(target: str) -> object:
    """The library's own `target`, also after a patch has replaced it."""
    if target in _originals:
        return _originals[target]
    module, _, path = target.partition(":")
    found = importlib.import_module(module)
    for name in path.split("."):
        found = getattr(found, name)
    return found


def _replace(target: str, replacement: object) -> None:
    module, _, path = target.partition(":")
    owner_path, _, name = path.rpartition(".")
    owner = original(f"{module}:{owner_path}") if owner_path else importlib.import_module(module)
    _originals.setdefault(target, getattr(owner, name))
    setattr(owner, name, replacement)


def _restore(target: str) -> None:
    _replace(target, _originals[target])


def _is_on(name: str) -> bool:
    """Whether patch `name` applies here; logs once when it does not."""
    patch = PATCHES[name]
    if patch.is_current():
        return True
    if name not in _reported_off:
        _reported_off.add(name)
        log.warning("fl_app's patch %s is off: written for %s %s, found %s, which runs as shipped "
                    "(docs/upgrading.md)", name, patch.library, patch.written_for, version(patch.library))
    return False


PATCHES = {
    "seeded_node_ids": Touchpoint(
        "flwr", "1.42.0",
        ("flwr.server.superlink.linkstate.in_memory_linkstate:generate_rand_int_from_bytes",
         "flwr.server.superlink.fleet.vce.vce_api:_register_nodes"),
        "Flower's simulation draws its nodes' ids from os.urandom; the server samples clients in "
        "order of id and node i holds partition i, so the same seed trained other partitions in "
        "every run. Upstream: a seed for the simulation's node ids.",
    ),
    "wake_on_stored_messages": Touchpoint(
        "flwr", "1.42.0",
        ("flwr.server.superlink.linkstate.in_memory_linkstate:InMemoryLinkState.store_message_ins",
         "flwr.server.superlink.linkstate.in_memory_linkstate:InMemoryLinkState.store_message_res",
         "flwr.server.superlink.fleet.vce.vce_api:add_messages_to_queue",
         # not replaced: fl_app's grid (fl_app/simulation.py) waits for replies in its stead
         "flwr.superlink.grid.inmemory_grid:InMemoryGrid.send_and_receive"),
        "Flower's simulation looks for messages every 0.1 s, and its dispatcher asks for every "
        "node's messages at each look; workers sat idle 4-6 % of a round and 10,000 nodes cost "
        "0.6 of a core. Upstream: an event when a message is stored, and a dispatcher that asks "
        "for the addressed nodes only.",
    ),
    "fused_adam": Touchpoint(
        "keras", "3.15.1",
        ("keras.optimizers:Adam.update_step", "keras.optimizers:Adam.build",
         "keras.src.optimizers.base_optimizer:BaseOptimizer._get_variable_index"),
        "Keras' Adam updates a weight with about a dozen TensorFlow ops, each a pass over it; "
        "TensorFlow's ResourceApplyAdam does the same arithmetic in one. Upstream: a fused Adam "
        "in Keras 3's TensorFlow backend.",
    ),
    "seeded_initializers": Touchpoint(
        "keras", "3.15.1",
        ("keras.src.random.seed_generator:make_default_seed",
         "keras.src.initializers.random_initializers:RandomInitializer.__init__"),
        "Keras seeds every initializer built without a seed from Python's process-wide `random`, "
        "which other threads of a simulation's driver draw from as well: a backbone's hundreds of "
        "initializers got other weights in some runs of the same seed. Upstream: a seed that "
        "only the thread building the model draws from.",
    ),
}

RELIANCES = (
    Touchpoint(
        "flwr", "1.42.0",
        ("flwr.server.strategy:FedOpt.__init__", "flwr.server.strategy:FedAdam.aggregate_fit",
         "flwr.server.strategy:FedYogi.aggregate_fit", "flwr.server.strategy:FedAdagrad.aggregate_fit",
         "flwr.server.strategy:FedAvgM.aggregate_fit"),
        "fl_app.strategy checkpoints the server optimisers' state, kept in the attributes m_t, "
        "v_t and momentum_vector, which Flower never saves.",
    ),
    Touchpoint(
        "flwr", "1.42.0",
        ("flwr.server.compat.app_utils:start_update_client_manager_thread",
         "flwr.server.workflow.default_workflows:default_fit_workflow",
         "flwr.server.workflow.default_workflows:default_evaluate_workflow",
         "flwr.server.workflow.default_workflows:default_centralized_evaluation_workflow"),
        "fl_app.workflow runs Flower's per-round legacy workflows in a loop of its own (resumable, "
        "with a hook after each round); they are not exported.",
    ),
    Touchpoint(
        "flwr", "1.42.0",
        ("flwr.supercore.logger:mirror_output_to_queue",),
        "fl_app.console quiets what `flwr run --stream` shows by filtering Flower's console_handler, "
        "whose output the ServerApp process mirrors, with the rest of its stdout and stderr, to the stream.",
    ),
    Touchpoint(
        "hydra-core", "1.3.8",
        ("hydra._internal.core_plugins.basic_sweeper:BasicSweeper.split_arguments",),
        "fl_app.sweep expands a sweep's jobs as Hydra's basic sweeper does, to check them all "
        "before the first one runs.",
    ),
)


def seed_node_ids(seed: int) -> None:
    """Draw the ids that Flower's in-memory state gives simulated nodes from `seed`."""
    if not _is_on("seeded_node_ids"):
        return
    rng = random.Random(seed)

    def seeded_int(num_bytes: int, exclude: set[int] | None = None) -> int:
        while (number := rng.getrandbits(8 * num_bytes)) in (exclude or ()):
            pass
        return number

    _replace(PATCHES["seeded_node_ids"].targets[0], seeded_int)


_building = threading.Lock()


@contextmanager
def initializer_seeds_from(seed: int) -> Iterator[None]:
    """Within: Keras seeds the initializers built without a seed from `seed` alone, whatever
    other threads draw from Python's `random` meanwhile; one thread at a time builds."""
    if not _is_on("seeded_initializers"):
        yield
        return
    with _building:
        _replace("keras.src.random.seed_generator:python_random", random.Random(seed))
        try:
            yield
        finally:
            _restore("keras.src.random.seed_generator:python_random")


@cache  # once per process
def wake_on_stored_messages() -> threading.Event:
    """Let Flower's simulation act on a message as soon as it is stored.

    Its in-memory state signals every message it stores: its dispatcher of messages to the
    clients wakes at once, and asks only for the nodes a message was stored for since; the
    event returned is set at every reply stored, for whoever waits for replies (fl_app's grid
    in fl_app/simulation.py). Both still look at least every 0.1 s, as Flower does. Where the
    patch is off, the event is never set and waiting on it is Flower's 0.1 s polling.
    """
    replies = threading.Event()
    if not _is_on("wake_on_stored_messages"):
        return replies
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    to_clients = threading.Event()
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

    targets = PATCHES["wake_on_stored_messages"].targets
    _replace(targets[0], store_and_wake_dispatcher)
    _replace(targets[1], store_and_wake_grid)
    _replace(targets[2], add_messages_to_queue)
    return replies


def fuse_adam(optimizer) -> None:
    """Run this Keras Adam's update of each weight as TensorFlow's fused Adam kernel.

    The same arithmetic (Kingma and Ba's bias-corrected step, epsilon added to sqrt(v)) in one
    pass over the weight instead of about a dozen. The instance keeps Keras' class and state,
    so a saved model loads anywhere. Only for the Adam fl_app builds: the kernel knows nothing
    of Keras' weight decay, AMSGrad or gradient clipping, which fl_app never sets.
    """
    if not _is_on("fused_adam"):
        return
    import tensorflow as tf

    def update_step(gradient, variable, learning_rate):
        slot = optimizer._get_variable_index(variable)
        dtype = variable.dtype
        step = tf.cast(optimizer.iterations + 1, dtype)
        beta_1, beta_2 = tf.cast(optimizer.beta_1, dtype), tf.cast(optimizer.beta_2, dtype)
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle,
            m=optimizer._momentums[slot].value.handle,
            v=optimizer._velocities[slot].value.handle,
            beta1_power=tf.pow(beta_1, step),
            beta2_power=tf.pow(beta_2, step),
            lr=tf.cast(learning_rate, dtype),
            beta1=beta_1,
            beta2=beta_2,
            epsilon=tf.cast(optimizer.epsilon, dtype),
            grad=tf.cast(gradient, dtype),
        )

    optimizer.update_step = update_step
