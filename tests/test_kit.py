"""Start kits (fl_app/kit.py): what the coordinator writes for itself and for each partner.
The deployment tests (tests/test_deployment.py) start their federations with these kits."""

import os
import subprocess
import sys

import pytest
from flwr.common.config import parse_config_args

from fl_app.kit import main, write_coordinator_kit, write_partner_kit


def sourced(env_file, *names):
    """The values `sh` gives `names` after sourcing `env_file`, as the kit's scripts do."""
    script = f". {env_file}; " + "; ".join(f'printf "%s\\n" "${name}"' for name in names)
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True).stdout.splitlines()


def test_the_coordinators_kit_keeps_its_certificates_and_names_its_superlink(tmp_path):
    kit = tmp_path / "coordinator"
    command = ["coordinator", str(kit), "--host", "link.example.org", "--port", "9100", "--data-dir", "/srv/data"]
    main(command)
    ca = (kit / "certs" / "ca.crt").read_bytes()
    main(command)  # again: the partners' CA stays valid
    assert (kit / "certs" / "ca.crt").read_bytes() == ca
    assert sourced(kit / "superlink.env", "BIND", "PORT", "FL_APP_DATA_DIR") == ["0.0.0.0", "9100", "/srv/data"]
    assert 'address = "link.example.org:9100"' in (kit / "flwr" / "config.toml").read_text()
    subprocess.run(["sh", "-n", str(kit / "start-superlink.sh")], check=True)  # its syntax
    assert f"ExecStart=/bin/sh {kit}/start-superlink.sh" in (kit / "fl-app-superlink.service").read_text()


def test_a_partners_kit_makes_its_key_on_its_machine_once_and_carries_its_settings(tmp_path):
    coordinator = write_coordinator_kit(tmp_path / "coordinator", ())
    kit = write_partner_kit(tmp_path / "kits" / "hospital_a", "hospital_a", "link.example.org:9000",
                            coordinator / "certs" / "ca.crt", image_dir="/data/my images",
                            overrides="mode=deployment dataset.classes=[a,b]", python=sys.executable)
    assert (kit / "ca.crt").read_bytes() == (coordinator / "certs" / "ca.crt").read_bytes()
    assert not (kit / "keys").exists()  # the private key is made at the partner, not here
    node_config, overrides = sourced(kit / "node.env", "NODE_CONFIG", "RUN_OVERRIDES")
    assert parse_config_args([node_config]) == {"name": "hospital_a", "image-dir": "/data/my images"}
    assert overrides == "mode=deployment dataset.classes=[a,b]"

    made = subprocess.run(["sh", str(kit / "start.sh"), "key"], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0 and "send keys/hospital_a.pub (the public key) to the coordinator" in made.stdout
    key = (kit / "keys" / "hospital_a").read_bytes()
    assert (kit / "keys" / "hospital_a.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    again = subprocess.run(["sh", str(kit / "start.sh"), "key"], capture_output=True, text=True, timeout=60)
    assert again.stdout == "" and (kit / "keys" / "hospital_a").read_bytes() == key
    assert (kit / "keys" / "hospital_a").stat().st_mode & 0o077 == 0  # private to its owner
    assert "ExecStart=/bin/sh /opt/fl_app/hospital_a/start.sh" in (
        kit / "fl-app-supernode-hospital_a.service").read_text()
    assert "hospital_a" in (kit / "README.md").read_text()


def test_a_partition_partners_kit_sets_its_data_folder(tmp_path):
    ca = write_coordinator_kit(tmp_path / "coordinator", ()) / "certs" / "ca.crt"
    main(["partner", "lab_b", "--superlink", "127.0.0.1:9000", "--ca", str(ca), "--partition", "1", "3",
          "--data-dir", "/srv/datasets", "--out", str(tmp_path / "lab_b")])
    node_config, data_dir = sourced(tmp_path / "lab_b" / "node.env", "NODE_CONFIG", "FL_APP_DATA_DIR")
    assert parse_config_args([node_config]) == {"name": "lab_b", "partition-id": 1, "num-partitions": 3}
    assert data_dir == "/srv/datasets"
    subprocess.run(["sh", "-n", str(tmp_path / "lab_b" / "start.sh")], check=True)


def test_a_partners_check_says_what_trains_on_what_and_ends_with_its_verdict(tmp_path):
    ca = write_coordinator_kit(tmp_path / "coordinator", ()) / "certs" / "ca.crt"
    main(["partner", "lab_b", "--superlink", "127.0.0.1:9000", "--ca", str(ca), "--partition", "1", "3",
          "--data-dir", os.environ["FL_APP_DATA_DIR"], "--overrides", "dataset.val_fraction=0.2",
          "--out", str(tmp_path / "lab_b")])
    check = subprocess.run(["sh", str(tmp_path / "lab_b" / "start.sh"), "check"], capture_output=True,
                           text=True, timeout=300)
    assert check.returncode == 0, check.stderr[-2000:]
    # The key first, then no TensorFlow start-up lines: what it trains on, and the verdict last.
    key, device, per_class, verdict = check.stdout.splitlines()
    assert key.startswith("Made keys/lab_b and keys/lab_b.pub")
    assert check.stderr == "" and device.startswith("TensorFlow ") and " will train on " in device
    assert per_class.startswith("per class: 0 ")
    assert verdict == ("OK: 16000 training and 4000 held-out images of the mnist task's 10 classes, "
                       "each converted to 28x28x1")


def test_a_partner_kit_needs_its_data_named_once(tmp_path, capsys):
    ca = write_coordinator_kit(tmp_path / "coordinator", ()) / "certs" / "ca.crt"
    with pytest.raises(SystemExit):
        main(["partner", "x", "--superlink", "h:1", "--ca", str(ca)])
    with pytest.raises(SystemExit):
        main(["partner", "x", "--superlink", "h:1", "--ca", str(ca), "--image-dir", "/d", "--partition", "0", "2"])
    assert "one of the arguments --image-dir --partition is required" in capsys.readouterr().err
