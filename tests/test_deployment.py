"""Real deployments on 127.0.0.1: a `flower-superlink` and `flower-supernode`s started as
partners start them (TLS, registered keys), runs submitted with `flwr run`, and the faults
a federation must survive. Each test has its own SuperLink, keys and ports, and stops
every process it started, even on failure."""

import csv
import json
import os
import re
import signal
import subprocess
import time

import pytest
from conftest import OWN_CLASSES, OWN_PARTIES, read_history, write_own_task

from fl_app.kit import CONNECTION
from fl_app.local_federation import FederationError, LocalFederation

pytestmark = pytest.mark.slow  # every test starts real SuperLink and SuperNode processes

# Small data keeps rounds short: each partition node holds 1/20 of MNIST's training set.
RUN = "mode=deployment num_rounds={rounds} num_clients={nodes} fraction_evaluate=0 min_evaluate_clients=0"


@pytest.fixture
def federation(tmp_path):
    with LocalFederation(tmp_path / "federation") as federation:
        federation.start_superlink()
        yield federation


def start_partners(federation, overrides="", **data):
    """Each partner as docs/deployment.md has it: its kit, its key made by the kit's script
    and registered by the coordinator, its SuperNode started by the script (data checked
    first). `data`: name -> an image folder, or a (partition, count) of MNIST."""
    for name, where in data.items():
        place = {"partition": where} if isinstance(where, tuple) else {"image_dir": str(where)}
        federation.kit(name, overrides=overrides, **place)
        federation.register(name)
        federation.start_node(name, wait=False)  # their data checks run side by side
    for name in data:
        federation.wait_for_node(name)


def wait_until(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_partners_of_an_own_task_train_over_tls_and_one_with_bad_data_fails_alone(federation, tmp_path, data_root):
    # Three partners, each with its own folder of a five-class task and its own name; no test
    # set anywhere. After their data checks pass, the third adds a class folder the task
    # does not have.
    clients = write_own_task(tmp_path / "task", data_root) / "clients"
    task = (f"mode=deployment dataset=image_folder dataset.classes=[{','.join(OWN_CLASSES)}] "
            "dataset.image_size=[32,32] dataset.channels=1")
    start_partners(federation, task, **{party: clients / party for party in OWN_PARTIES})
    assert "OK: 400 training and 100 held-out images of the image_folder task's 5 classes" in (
        federation.log("hospital_a"))
    (clients / "lab_c" / "cat").mkdir()
    check = subprocess.run(["sh", str(federation.dir / "kits" / "lab_c" / "start.sh"), "check"],
                           env=federation.env, capture_output=True, text=True, timeout=300)
    assert check.returncode == 1 and "unknown class folder(s) cat" in check.stderr.splitlines()[-1]

    out = tmp_path / "out"
    echoed = []
    log = federation.run(f"{task} num_rounds=1 local_epochs=2 min_fit_clients=2 min_evaluate_clients=2 "
                         f"output_dir={out}", echo=echoed.append)
    assert echoed == log.splitlines()  # as local_federation's console shows the run, line by line
    (record,) = read_history(out)
    assert (record["clients_sampled"], record["clients_succeeded"], record["clients_failed"]) == (3, 2, 1)
    assert "test_accuracy" not in record and record["eval_accuracy"] > 0.6, record
    # The coordinator learns who failed and the kind of problem, never the partner's paths;
    # the partner's own log has the whole error, and each partner's log its figures.
    assert "a client failed to train: PartyFailure: lab_c: unknown class folder(s) (the details" in log
    assert str(clients) not in log and str(clients) not in (out / "server.log").read_text()
    assert f"{clients / 'lab_c'}: unknown class folder(s) cat" in federation.log("lab_c")
    assert re.search(r"Round 1: hospital_a trained on 400 images: loss \d\.\d{4}, accuracy \d\.\d{4}",
                     federation.log("hospital_a"))
    assert "absl" not in federation.log("hospital_a")  # no TensorFlow start-up lines at each message
    assert "Round 1: hospital_b evaluated on 70 held-out images: loss" in federation.log("hospital_b")
    with open(out / "clients.csv") as f:
        assert {row["client"] for row in csv.DictReader(f)} == {"hospital_a", "hospital_b"}
    with open(out / "per_class.csv") as f:
        assert [row["class"] for row in csv.DictReader(f)][:5] == list(OWN_CLASSES)
    names = {p.name for p in out.iterdir()}
    assert {"model.keras", "metrics.png", "checkpoint.npz", "confusion_matrix.png"} <= names
    assert "partitions.json" not in names  # in deployment the server does not know the data
    assert "name: deployment" in (out / "config.yaml").read_text()

    # A run whose every round fails (all three partners needed) ends failed, saying why.
    with pytest.raises(FederationError) as failed:
        federation.run(f"{task} num_rounds=1 min_fit_clients=3 fraction_evaluate=0 min_evaluate_clients=0 "
                       f"output_dir={tmp_path / 'failed'}")
    reason = str(failed.value).splitlines()[-1]
    assert reason.startswith("Run ") and "ended finished:failed: ServerApp failed with exception: Run failed: " \
        "none of its 1 round(s) aggregated an update" in reason, reason
    assert "2 valid update(s), min_fit_clients=3; PartyFailure: lab_c: unknown class folder(s)" in reason
    stream = federation.log("run")  # the reason on the stream too, without a traceback
    assert "Run failed: none of its 1 round(s)" in stream and "Traceback" not in stream


def test_partners_aggregate_securely_with_client_side_dp(federation, tmp_path):
    # privacy=secagg_dp: each SuperNode clips its update (Flower's mod) and masks it for
    # SecAgg+, whose four stages travel through the SuperLink; the server noises the sum.
    start_partners(federation, **{f"n{i}": (i, 20) for i in range(3)})
    out = tmp_path / "out"
    federation.run(RUN.format(rounds=1, nodes=3) + " min_fit_clients=3 privacy=secagg_dp "
                   f"privacy.noise_multiplier=0.01 output_dir={out}")
    (record,) = read_history(out)
    assert (record["clients_succeeded"], record["status"]) == (3, "ok"), record
    assert record["epsilon"] > 0 and record["test_accuracy"] > 0.3, record
    # Each client counted once in the sum, its 2,700 examples reported apart.
    assert record["train_examples"] == 3 * 2700, record
    assert "Secure aggregation commencing" in (out / "server.log").read_text()  # Flower's line: not on the stream


def test_unregistered_or_plaintext_nodes_are_refused(federation):
    # A partner whose key was never registered: its kit's script makes the key, checks the
    # data and keeps trying, refused each time.
    federation.kit("stranger", partition=(0, 20))
    federation.start_node("stranger", wait=False)
    federation.kit("known", partition=(1, 20))
    federation.register("known")
    # SuperNodes started by hand without TLS, one with the registered key.
    plaintext = ["flower-supernode", "--superlink", f"127.0.0.1:{federation.port}", "--insecure",
                 "--node-config", "partition-id=2 num-partitions=20"]
    nodes = {
        "plaintext": federation.start_process("plaintext", [*plaintext, "--max-retries", "2"]),
        "plaintext_known": federation.start_process("plaintext_known", [
            *plaintext, "--auth-supernode-private-key", str(federation.node_key("known"))]),
    }
    for name, process in nodes.items():
        assert process.wait(timeout=120) != 0, name
        assert "SuperNode ID" not in federation.log(name), name
    wait_until(lambda: "Failed to activate SuperNode" in federation.log("stranger"), 120, "the refusal")
    assert "SuperNode ID" not in federation.log("stranger")
    listed = json.loads(federation.flwr("supernode", "list", CONNECTION, "--format", "json").stdout)
    assert len(listed["nodes"]) == 1  # only the registered key


def test_node_killed_mid_round_is_given_up_and_rejoins_after_restart(federation, tmp_path):
    start_partners(federation, a=(0, 20), b=(1, 20))
    out = tmp_path / "out"
    # round_timeout: b's kit may bring it back before the SuperLink has given its reply up,
    # which Flower 1.42 then waits for with no end (docs/deployment.md).
    run = federation.submit(RUN.format(rounds=4, nodes=2) + " min_fit_clients=1 local_epochs=3 round_timeout=120 "
                            f"output_dir={out}")
    try:
        wait_until(lambda: "Start `flwr-clientapp` process" in federation.log("b"), 240, "b to train")
        os.kill(federation.supernode_pid("b"), signal.SIGKILL)
        # Round 1 ends with a's update alone once the SuperLink gives b up (missed heartbeats).
        # b's kit starts its SuperNode again; refused until then, it keeps trying.
        assert run.wait(timeout=600) == 0
    finally:
        if run.poll() is None:
            run.kill()
    history = read_history(out)
    assert [r["round"] for r in history] == [1, 2, 3, 4]
    assert (history[0]["clients_succeeded"], history[0]["clients_failed"]) == (1, 1)
    assert history[0]["status"] == "ok"  # min_fit_clients=1 reply was enough
    assert any(r["clients_succeeded"] == 2 for r in history[1:]), history  # b is back
    # b's failure is logged: its error reply, or its silence until round_timeout when it was
    # back before the SuperLink gave its reply up.
    assert any(said in federation.log("run") for said in ("a client failed to train",
                                                           "1 client(s) did not reply within round_timeout"))
    assert "flower-supernode stopped" in federation.log("b") and federation.log("b").count("SuperNode ID:") >= 2


def test_superlink_killed_between_rounds_resumes_from_the_last_checkpoint(federation, tmp_path):
    start_partners(federation, a=(0, 20), b=(1, 20))
    out = tmp_path / "out"
    overrides = RUN.format(rounds=3, nodes=2) + f" min_fit_clients=2 output_dir={out}"
    run = federation.submit(overrides)
    try:
        wait_until(lambda: (out / "metrics.json").exists(), 300, "round 1 to end")
        federation.stop("superlink", signal.SIGKILL)  # with it, the ServerApp it runs
    finally:
        run.kill()
    before = read_history(out)
    assert len(before) in (1, 2)

    federation.start_superlink()  # same port and state database; the nodes reconnect
    # A node may still be training the killed run's round: its reply is refused once it
    # is done. A new run's message that arrived before then was seen to go unanswered
    # (Flower 1.42), so resubmit once every ClientApp a node started has replied.
    wait_until(lambda: all(federation.log(node).count("Start `flwr-clientapp` process")
                           == federation.log(node).count("Sending: ") for node in "ab"),
               300, "the nodes to finish the killed run's round")
    log = federation.run(overrides + " resume=true")
    history = read_history(out)
    assert [r["round"] for r in history] == [1, 2, 3]
    assert history[: len(before)] == before  # completed rounds are kept, not redone
    assert f"after round {len(before)}" in log
    assert history[-1]["test_accuracy"] > history[0]["test_accuracy"]
