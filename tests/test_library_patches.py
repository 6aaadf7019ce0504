"""fl_app's changes to other libraries' internals (fl_app/library_patches.py): each fails
here when what it replaces or relies on changes upstream, and each is off on a version it
was not written for."""

import dataclasses
import hashlib
import inspect
import logging
import random
import sys
import threading

import keras
import numpy as np
import pytest

from fl_app import library_patches
from fl_app import model as keras_model
from fl_app.library_patches import PATCHES, RELIANCES, fuse_adam, original

# sha256 (first 16 hex digits) of each target's source in the versions the touchpoints name.
# A mismatch: read the new source, re-check the patch or reliance (docs/upgrading.md), then
# update the digest and the version in fl_app/library_patches.py.
PINNED = {
    "flwr.server.superlink.linkstate.in_memory_linkstate:generate_rand_int_from_bytes": "f6a14564f55d0ead",
    "flwr.server.superlink.fleet.vce.vce_api:_register_nodes": "88a1cb6749e876ed",
    "flwr.server.superlink.linkstate.in_memory_linkstate:InMemoryLinkState.store_message_ins": "a2b78afac51dc4a2",
    "flwr.server.superlink.linkstate.in_memory_linkstate:InMemoryLinkState.store_message_res": "52a4f7ccc70e8908",
    "flwr.server.superlink.fleet.vce.vce_api:add_messages_to_queue": "953f4bd41a931a77",
    "flwr.superlink.grid.inmemory_grid:InMemoryGrid.send_and_receive": "0229edfa5741b928",
    "keras.optimizers:Adam.update_step": "05a229bf362b7227",
    "keras.optimizers:Adam.build": "8ec7cbe349662b1b",
    "keras.src.optimizers.base_optimizer:BaseOptimizer._get_variable_index": "c4cd541aea39e6e2",
    "flwr.server.strategy:FedOpt.__init__": "ded454068202282e",
    "flwr.server.strategy:FedAdam.aggregate_fit": "ae6f294787329466",
    "flwr.server.strategy:FedYogi.aggregate_fit": "2fa7bf8a98e84f76",
    "flwr.server.strategy:FedAdagrad.aggregate_fit": "98d6059c83647d85",
    "flwr.server.strategy:FedAvgM.aggregate_fit": "521320aca0ce1a26",
    "flwr.server.compat.app_utils:start_update_client_manager_thread": "068767eae8a3e604",
    "flwr.server.workflow.default_workflows:default_fit_workflow": "180d595f43251849",
    "flwr.server.workflow.default_workflows:default_evaluate_workflow": "54dfd81e37bc9220",
    "flwr.server.workflow.default_workflows:default_centralized_evaluation_workflow": "ec8d8eecb30a565f",
    "flwr.supercore.logger:mirror_output_to_queue": "f82849372ef7ec45",
    "hydra._internal.core_plugins.basic_sweeper:BasicSweeper.split_arguments": "1b56f58380a27a88",
    "keras.src.random.seed_generator:make_default_seed": "f9a619f5c21e3694",
    "keras.src.initializers.random_initializers:RandomInitializer.__init__": "64361477f504c8c6",
}
TOUCHPOINTS = [*PATCHES.values(), *RELIANCES]


@pytest.mark.parametrize("target", [t for point in TOUCHPOINTS for t in point.targets])
def test_what_fl_app_replaces_or_relies_on_is_as_it_was_written_for(target):
    source = inspect.getsource(original(target))
    assert hashlib.sha256(source.encode()).hexdigest()[:16] == PINNED[target], (
        f"{target} changed upstream: re-check it (docs/upgrading.md)")


def test_every_touchpoint_is_written_for_the_installed_version():
    # pyproject.toml pins these versions; a touchpoint for another one was never checked.
    assert [(p.library, p.written_for) for p in TOUCHPOINTS if not p.is_current()] == []


def test_a_patch_for_another_version_is_off_and_says_so_once(monkeypatch, caplog):
    monkeypatch.setitem(PATCHES, "fused_adam", dataclasses.replace(PATCHES["fused_adam"], written_for="0.0"))
    monkeypatch.setattr(library_patches, "_reported_off", set())
    optimizers = [keras.optimizers.Adam(), keras.optimizers.Adam()]
    with caplog.at_level(logging.WARNING, logger="fl_app.library_patches"):
        for optimizer in optimizers:
            fuse_adam(optimizer)
    assert all("update_step" not in vars(optimizer) for optimizer in optimizers)  # Keras' own step
    (record,) = caplog.records
    assert record.getMessage().startswith("fl_app's patch fused_adam is off: written for keras 0.0, found 3.")


def test_a_seed_builds_the_same_weights_while_other_threads_draw_from_python_random():
    # A simulation's driver builds the server's model while Flower's and Ray's threads run;
    # Keras seeds each initializer from Python's `random` unless seeded_initializers is on.
    expected = keras_model.initial_weights("mcmahan_cnn", (28, 28, 1), 10, seed=5)
    drawing, switch_interval = threading.Event(), sys.getswitchinterval()

    def draw_meanwhile():
        drawing.set()
        while drawing.is_set():
            random.random()

    other = threading.Thread(target=draw_meanwhile)
    sys.setswitchinterval(1e-6)  # threads take turns often, as a busy driver's do
    try:
        other.start()
        drawing.wait()
        built = [keras_model.initial_weights("mcmahan_cnn", (28, 28, 1), 10, seed=5) for _ in range(3)]
    finally:
        drawing.clear()
        other.join()
        sys.setswitchinterval(switch_interval)
    for weights in built:
        assert all(np.array_equal(a, b) for a, b in zip(weights, expected, strict=True))
