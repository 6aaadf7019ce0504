"""fl_app's changes to Flower's simulation engine (fl_app/library_patches.py), on Flower's real
in-memory state, grid and dispatcher. Both change Flower's classes for the whole process,
as `simulate` does."""

import queue
import threading
import time

import pytest

from flwr.app import Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from fl_app.library_patches import seed_node_ids, wake_on_stored_messages
from fl_app.simulation import EngineStopped, StoppableGrid


def in_memory_state() -> LinkStateFactory:
    return LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())


def test_simulated_node_ids_follow_the_seed():
    def node_ids(seed: int) -> list[int]:
        seed_node_ids(seed)
        return list(vce_api._register_nodes(5, in_memory_state()))  # as Flower's engine does

    assert node_ids(3) == node_ids(3) != node_ids(4)


def simulated_grid(num_nodes: int):
    """Flower's in-memory state with a run and `num_nodes` nodes, as its `run_simulation`
    registers them, and the ServerApp's grid on it."""
    factory = in_memory_state()
    state = factory.state()
    run = Run.create_empty(run_id=7)
    run.federation_id, run.primary_task_id = NOOP_FEDERATION_ID, 1
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[1] = Task(task_id=1, run_id=run.run_id)
    nodes = vce_api._register_nodes(num_nodes, factory)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = run.run_id, 1, SUPERLINK_NODE_ID
    grid = InMemoryGrid(factory)
    grid.set_run(run)
    return state, grid, nodes


def test_the_servers_wait_for_replies_ends_when_the_engine_stops():
    # Without the speed patch's wake-ups (a fresh event): the guard must not depend on them.
    _, grid, nodes = simulated_grid(2)
    stopped = threading.Event()
    guarded = StoppableGrid(grid, stopped, threading.Event())
    threading.Timer(0.3, stopped.set).start()
    started = time.monotonic()
    with pytest.raises(EngineStopped):  # no worker will ever answer this message
        guarded.send_and_receive([Message(RecordDict(), dst_node_id=next(iter(nodes)), message_type="train")])
    assert time.monotonic() - started < 5


def test_dispatcher_hands_out_stored_messages_asking_only_for_their_nodes():
    wake_on_stored_messages()
    state, grid, nodes = simulated_grid(200)

    asked = []
    get_message_ins = state.get_message_ins
    state.get_message_ins = lambda node_id, limit: asked.append(node_id) or get_message_ins(node_id=node_id, limit=limit)
    to_workers, stop = queue.Queue(), threading.Event()
    dispatcher = threading.Thread(target=vce_api.add_messages_to_queue, args=(state, to_workers, nodes, stop))
    dispatcher.start()
    try:
        addressed = list(nodes)[5:8]
        grid.push_messages([Message(RecordDict(), dst_node_id=node, message_type="train") for node in addressed])
        dispatched = [to_workers.get(timeout=10) for _ in addressed]
    finally:
        stop.set()
        dispatcher.join()
    assert sorted(message.metadata.dst_node_id for message in dispatched) == sorted(addressed)
    assert to_workers.empty()
    # Flower's own loop asks for all 200 nodes at every look.
    assert set(asked) == set(addressed)
