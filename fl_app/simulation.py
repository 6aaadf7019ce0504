"""Run the ServerApp and ClientApp on Flower's simulation engine (Ray) in this process."""

from flwr.clientapp.typing import Mod
from flwr.simulation import run_simulation

from fl_app.client_app import build_client_app
from fl_app.config_schema import AppConfig
from fl_app.server_app import build_server_app


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
    }
    if cfg.mode.ray_address:
        # Join a running Ray cluster instead of starting a private Ray on this machine.
        backend_config["init_args"] = {"address": cfg.mode.ray_address}
    run_simulation(
        server_app=build_server_app(cfg),
        client_app=build_client_app(cfg, client_mods),
        num_supernodes=cfg.num_clients,
        backend_config=backend_config,
    )
