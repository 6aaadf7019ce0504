"""Check a partner's local data before its SuperNode joins: `python -m fl_app.check_node`.

    python -m fl_app.check_node --node-config 'image-dir="/data/images"' --overrides "dataset=mnist" \
      && flower-supernode ... --node-config 'image-dir="/data/images"'

Flower runs no app code on a SuperNode until the first message arrives, so bad data would
only show as a failed client in the first round. This loads the node's data exactly as the
ClientApp will (the same `--node-config` syntax as `flower-supernode`, the run's config
overrides), prints what it found, and exits 1 with what is wrong and where, so a start
script stops before the SuperNode starts.
"""

import argparse
import shlex
import sys

import numpy as np
from click import ClickException
from flwr.common.config import parse_config_args

from fl_app.config import compose_config
from fl_app.config_schema import ConfigError
from fl_app.data import DatasetError
from fl_app.task import task_of


def device_summary() -> str:
    """What TensorFlow trains on here, which its start-up lines (not shown) would tell."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    devices = f"{len(gpus)} GPU(s): {', '.join(gpu.name for gpu in gpus)}" if gpus else "the CPU (it finds no GPU)"
    return f"TensorFlow {tf.__version__} will train on {devices}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fl_app.check_node", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--node-config", required=True,
        help="the SuperNode's node config, e.g. 'image-dir=\"/data/images\"' or "
        "'partition-id=0 num-partitions=2'",
    )
    parser.add_argument(
        "--overrides", default="",
        help="the run's Hydra overrides as the coordinator announces them, e.g. "
        "'dataset=mnist dataset.val_fraction=0.1' or 'mode=deployment dataset=image_folder "
        "dataset.classes=[benign,malignant] dataset.image_size=[64,64]'",
    )
    args = parser.parse_args(argv)
    # Imported here, after --help: it imports TensorFlow, keeping its start-up lines out of the console.
    from fl_app.client_app import load_node_data

    try:
        cfg = compose_config(shlex.split(args.overrides))
        data = load_node_data(parse_config_args([args.node_config]), cfg)
    except (ConfigError, DatasetError, ClickException) as err:  # Click's: a malformed --node-config
        print(f"check_node: {getattr(err, 'message', err)}", file=sys.stderr)
        sys.exit(1)
    task = task_of(cfg.dataset)
    print(device_summary())
    counts = np.bincount(np.concatenate([data.y_train, data.y_val]), minlength=len(task.classes))
    print("per class: " + ", ".join(f"{name} {count}" for name, count in zip(task.classes, counts)))
    print(f"OK: {len(data.y_train)} training and {len(data.y_val)} held-out images of the "
          f"{cfg.dataset.name} task's {len(task.classes)} classes, each converted to "
          f"{'x'.join(map(str, task.image_shape))}")


if __name__ == "__main__":
    main()
