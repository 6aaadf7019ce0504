"""Federated simulation of fl_app: `python run_simulation.py [key=value ...]`.

Any key of conf/config.yaml can be overridden (`num_rounds=3 dataset=fashion_mnist`);
`-m` sweeps (`-m num_clients=10,50 local_epochs=1,5`), each job with its own outputs.
`--help` lists the config groups and every key with its default.
"""

import logging
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from fl_app.config import CONF_DIR, to_simulation_config
from fl_app.config_schema import ConfigError
from fl_app.console import quiet_console
from fl_app.data import DatasetError

log = logging.getLogger("run_simulation")
# Importing Flower sets up alembic (its state database), which logs each plugin at INFO.
logging.getLogger("alembic").setLevel(logging.WARNING)


def _log_flower_through_hydra() -> None:
    """Flower's INFO lines once, in Hydra's console format and in the run's log file."""
    from flwr.common.logger import console_handler

    flwr_logger = logging.getLogger("flwr")
    flwr_logger.removeHandler(console_handler)
    flwr_logger.setLevel(logging.INFO)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    if cfg.output_dir is None:
        cfg.output_dir = HydraConfig.get().runtime.output_dir
    try:
        app_cfg = to_simulation_config(cfg, HydraConfig.get().overrides.task)
    except (ConfigError, DatasetError) as err:
        log.error("%s", err)
        sys.exit(2)
    if not app_cfg.verbose:
        quiet_console()
    # Imported after validation: a bad config fails in a second, before Ray and TensorFlow.
    from fl_app.server_app import RunFailed
    from fl_app.simulation import simulate

    _log_flower_through_hydra()
    try:
        simulate(app_cfg)
    except (ConfigError, DatasetError) as err:  # raised before the first round
        log.error("%s", err)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # Hydra marks this job failed and goes on with the sweep's other jobs
        sys.exit(2)
    except RunFailed:  # its reason is the log's last line
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        sys.exit(1)
    except KeyboardInterrupt:
        log.warning("Interrupted. The rounds completed so far are saved in %s; run the same command "
                    "with resume=true to continue.", app_cfg.output_dir)
        logging.shutdown()
        # Flower's engine threads may still wait on Ray for replies that will never come, and a
        # normal exit would wait for them for ever. Every output file is whole (written atomically).
        os._exit(130)


if __name__ == "__main__":
    main()
