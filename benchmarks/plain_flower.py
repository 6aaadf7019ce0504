"""The baseline: a Flower app written the way Flower's TensorFlow quickstart writes it.

Stock `FedAvg`, a `NumPyClient` whose `client_fn` loads the data and builds and compiles
the Keras model on every call, and Flower's default client resources. Only the timing
hooks (fit config, metric aggregation) are ours. Prints one `BENCH_RESULT {json}` line.

    python -m benchmarks.plain_flower --clients 10 --fraction-fit 1 --epochs 1 --batch-size 32
"""

import argparse
import json
import os
import time

import numpy as np
from flwr.client import ClientApp, NumPyClient
from flwr.common import Context
from flwr.server import ServerApp, ServerAppComponents, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.simulation import run_simulation

from fl_app.data import load_dataset, scale_images
from fl_app.model import build_model


class QuickstartClient(NumPyClient):
    def __init__(self, model, x_train, y_train, x_val, y_val, epochs, batch_size):
        self.model, self.epochs, self.batch_size = model, epochs, batch_size
        self.x_train, self.y_train, self.x_val, self.y_val = x_train, y_train, x_val, y_val

    def get_parameters(self, config):
        return self.model.get_weights()

    def fit(self, parameters, config):
        self.model.set_weights(parameters)
        self.model.fit(self.x_train, self.y_train, epochs=self.epochs,
                       batch_size=self.batch_size, verbose=0)
        return self.model.get_weights(), len(self.x_train), {}

    def evaluate(self, parameters, config):
        self.model.set_weights(parameters)
        loss, accuracy = self.model.evaluate(self.x_val, self.y_val, verbose=0)
        return loss, len(self.x_val), {"accuracy": accuracy}


def make_apps(args) -> tuple[ServerApp, ClientApp, dict]:
    timing = {"round_starts": [], "round_ends": [], "train_examples": []}

    def client_fn(context: Context):
        # As in the quickstart: data and model are made anew for every call.
        x, y, _, _ = load_dataset("mnist", os.environ["FL_APP_DATA_DIR"])
        part = np.array_split(np.random.default_rng(0).permutation(len(x)), args.clients)[
            int(context.node_config["partition-id"])
        ]
        split = int(len(part) * 0.9)
        model = build_model("seed_cnn", (28, 28, 1), 10, "adam", "sparse_categorical_crossentropy", 0.002)
        return QuickstartClient(
            model, scale_images(x[part[:split]]), y[part[:split]],
            scale_images(x[part[split:]]), y[part[split:]], args.epochs, args.batch_size,
        ).to_client()

    def fit_config(server_round):
        timing["round_starts"].append(time.time())
        return {}

    def fit_metrics(metrics):
        timing["train_examples"].append(sum(n for n, _ in metrics))
        return {}

    def evaluate_metrics(metrics):
        timing["round_ends"].append(time.time())
        return {}

    def server_fn(context: Context):
        strategy = FedAvg(
            fraction_fit=args.fraction_fit,
            fraction_evaluate=args.fraction_fit,
            min_fit_clients=2,
            min_evaluate_clients=2,
            min_available_clients=2,
            on_fit_config_fn=fit_config,
            fit_metrics_aggregation_fn=fit_metrics,
            evaluate_metrics_aggregation_fn=evaluate_metrics,
        )
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=args.rounds))

    return ServerApp(server_fn=server_fn), ClientApp(client_fn=client_fn), timing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--fraction-fit", type=float, default=1.0)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    server_app, client_app, timing = make_apps(args)
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=args.clients)
    print("BENCH_RESULT " + json.dumps(timing), flush=True)


if __name__ == "__main__":
    main()
