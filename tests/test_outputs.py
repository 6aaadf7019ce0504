"""A run's TensorBoard scalars, written by RunOutputs without a federation."""

import numpy as np
import pytest
from conftest import free_port, read_scalars

from fl_app.outputs import RunOutputs


def test_every_numeric_value_of_a_round_becomes_a_scalar_and_a_resumed_run_appends(tmp_path):
    rounds = [
        {"round": 1, "test_accuracy": 0.91, "clients_failed": 0, "status": "ok", "epsilon": 96.5},
        {"round": 2, "test_accuracy": 0.95, "clients_failed": 1, "status": "ok", "epsilon": 166.25},
        {"round": 3, "clients_failed": 0, "status": "failed", "epsilon": 231.0},  # not evaluated
    ]
    RunOutputs(tmp_path).write_scalars(rounds[0])
    resumed = RunOutputs(tmp_path)  # a resumed run: another writer, the same directory
    for record in rounds[1:]:
        resumed.write_scalars(record)

    scalars = read_scalars(tmp_path)
    assert set(scalars) == {"test_accuracy", "clients_failed", "epsilon"}  # no round, no status
    for key, points in scalars.items():
        assert points == [(r["round"], pytest.approx(r[key])) for r in rounds if key in r], key


def test_a_run_directory_is_never_overwritten_without_resume(tmp_path):
    from fl_app.config import compose_config
    from fl_app.config_schema import ConfigError
    from fl_app.outputs import Checkpoint
    from fl_app.server_app import open_outputs

    RunOutputs(tmp_path).save_checkpoint(Checkpoint(2, [np.zeros(3)], [{"round": 1}, {"round": 2}], {}))
    with pytest.raises(ConfigError, match="already holds a run; set resume=true") as err:
        open_outputs(compose_config([f"output_dir={tmp_path}"]))
    assert err.value.key == "output_dir"
    _, checkpoint = open_outputs(compose_config([f"output_dir={tmp_path}", "resume=true"]))
    assert checkpoint.round == 2 and len(checkpoint.history) == 2


def test_a_simulation_refuses_a_taken_output_dir_before_anything_starts(tmp_path):
    from fl_app.config import compose_config
    from fl_app.config_schema import ConfigError
    from fl_app.simulation import simulate

    (tmp_path / "checkpoint.npz").write_bytes(b"a run was here")
    # Not even the Ray address is tried first.
    with pytest.raises(ConfigError, match="'output_dir': .* already holds a run"):
        simulate(compose_config([f"output_dir={tmp_path}", f"mode.ray_address=127.0.0.1:{free_port()}"]))


@pytest.mark.parametrize("cut", [7, 2000], ids=["not a checkpoint", "cut short"])
def test_an_unreadable_checkpoint_is_named_when_resuming(tmp_path, cut):
    from fl_app.config import compose_config
    from fl_app.config_schema import ConfigError
    from fl_app.outputs import Checkpoint
    from fl_app.server_app import open_outputs

    outputs = RunOutputs(tmp_path)
    outputs.save_checkpoint(Checkpoint(1, [np.zeros(1000)], [{"round": 1}], {}))
    outputs.checkpoint.write_bytes(outputs.checkpoint.read_bytes()[:cut])
    with pytest.raises(ConfigError, match=f"'resume': {outputs.checkpoint} cannot be read"):
        open_outputs(compose_config([f"output_dir={tmp_path}", "resume=true"]))


@pytest.mark.parametrize("parties", [3, 12], ids=["a line per party", "the spread of many"])
def test_clients_png_shows_each_partys_held_out_accuracy(tmp_path, parties):
    from PIL import Image

    from fl_app.outputs import CLIENTS_COLUMNS

    outputs = RunOutputs(tmp_path)
    outputs.plot_clients()
    assert not outputs.clients_png.exists()  # no clients.csv: no federated evaluation
    for server_round in (1, 2, 3):
        outputs.write_round_rows(outputs.clients_csv, CLIENTS_COLUMNS, server_round, [
            {"client": f"site_{i}", "eval_accuracy": 0.5 + 0.1 * server_round - 0.01 * i} for i in range(parties)])
    outputs.plot_clients()
    with Image.open(outputs.clients_png) as picture:
        assert picture.size == (800, 450)
