r"""Start kits for a deployment: `python -m fl_app.kit`.

    python -m fl_app.kit coordinator coordinator/ --host link.example.org --port 9000
    python -m fl_app.kit partner hospital_a --superlink link.example.org:9000 \
        --ca coordinator/certs/ca.crt --image-dir /data/images --overrides "mode=deployment ..."

The coordinator's kit is its certificates (made once, never overwritten), the SuperLink's
start script and systemd unit, and the `flwr` connection to submit runs with. A partner's
kit is the folder the coordinator sends it: the CA certificate, its settings (`node.env`:
name, where its data is, the run's overrides), a start script that makes the partner's
key on the partner's machine, checks the data with the run's settings and keeps
`flower-supernode` running, a systemd unit and a one-page README. docs/deployment.md
walks through both; fl_app.local_federation and the deployment tests start their
federations with these kits.
"""

import argparse
import shlex
import shutil
import stat
from pathlib import Path

from fl_app.certificates import make_ca, make_server_certificate

CONNECTION = "fl_app"  # the coordinator's `flwr` connection to its SuperLink
DEFAULT_PORT = 9000
# Where the systemd units expect things (their READMEs say to edit them otherwise).
SERVICE_ROOT = "/opt/fl_app"  # a partner's kit goes to SERVICE_ROOT/<name>
SERVICE_BIN = f"{SERVICE_ROOT}/venv/bin"  # python3, flower-superlink, flower-supernode


def _write(path: Path, text: str, executable: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if executable:
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def _env_file(title: str, settings: dict[str, str]) -> str:
    """`title` as a comment, then the settings as shell assignments (empty ones left out)."""
    return "\n".join([f"# {title}", *(f"{key}={shlex.quote(value)}" for key, value in settings.items() if value)]) + "\n"


SUPERLINK_SCRIPT = """#!/bin/sh
# The coordinator's SuperLink: TLS, only registered SuperNodes, its state on disk (a
# restarted SuperLink keeps its registered partners and runs). Stop it with Ctrl-C or
# `kill`, as a service with `systemctl stop fl-app-superlink`; start it again the same way.
cd "$(dirname "$0")" || exit 1
. ./superlink.env
[ -n "${FL_APP_DATA_DIR:-}" ] && export FL_APP_DATA_DIR
exec flower-superlink \\
  --ssl-ca-certfile certs/ca.crt --ssl-certfile certs/server.pem --ssl-keyfile certs/server.key \\
  --enable-supernode-auth --database state.db \\
  --disable-runtime-dependency-installation \\
  --host "$BIND" --port "$PORT"
"""

SUPERNODE_SCRIPT = """#!/bin/sh
# Start this partner's SuperNode (settings: node.env). Its key is made here, on this
# machine, the first time; the data is checked with the run's settings; then
# flower-supernode runs, and is started again whenever it stops.
#   ./start.sh key     only make the key pair: send keys/$NAME.pub to the coordinator
#   ./start.sh check   only check the data
#   ./start.sh         all of it (stop with Ctrl-C, or `systemctl stop` as a service)
cd "$(dirname "$0")" || exit 1
. ./node.env
[ -n "${FL_APP_DATA_DIR:-}" ] && export FL_APP_DATA_DIR
KEY="keys/$NAME"
if [ ! -f "$KEY" ]; then
  "$PYTHON" -m fl_app.certificates node-key "$KEY" >/dev/null || exit 1
  echo "Made $KEY and $KEY.pub: send $KEY.pub (the public key) to the coordinator."
fi
[ "$1" = key ] && exit 0
"$PYTHON" -m fl_app.check_node --node-config "$NODE_CONFIG" --overrides "${RUN_OVERRIDES:-}" || exit 1
[ "$1" = check ] && exit 0
node=
trap '[ -n "$node" ] && kill "$node" 2>/dev/null; exit 0' INT TERM
while :; do
  flower-supernode --superlink "$SUPERLINK" --root-certificates ca.crt \\
    --auth-supernode-private-key "$KEY" --node-config "$NODE_CONFIG" \\
    --port "$LOCAL_PORT" --max-wait-time 3600 &
  node=$!
  echo "$node" > supernode.pid
  wait "$node"
  echo "flower-supernode stopped (exit code $?); starting it again in $RESTART_DELAY s"
  sleep "$RESTART_DELAY" & wait $!
done
"""


def _unit(description: str, directory: str, script: str) -> str:
    return f"""[Unit]
Description={description}
After=network-online.target
Wants=network-online.target

[Service]
WorkingDirectory={directory}
ExecStart=/bin/sh {directory}/{script}
Environment=PATH={SERVICE_BIN}:/usr/local/bin:/usr/bin:/bin
Restart=on-failure
RestartSec=60

[Install]
WantedBy=multi-user.target
"""


def write_coordinator_kit(directory: Path, hosts: tuple[str, ...], port: int = DEFAULT_PORT,
                          bind: str = "0.0.0.0", data_dir: str = "") -> Path:
    """The coordinator's kit in `directory`; its certificates are made only if absent."""
    directory = Path(directory).resolve()
    certs = directory / "certs"
    if not (certs / "ca.crt").exists():
        make_ca(certs)
    if not (certs / "server.pem").exists():
        make_server_certificate(certs, hosts)
    _write(directory / "superlink.env", _env_file(
        "The SuperLink's settings, read by start-superlink.sh. FL_APP_DATA_DIR: where the "
        "ServerApp finds a test set to evaluate on (may stay empty).",
        {"BIND": bind, "PORT": str(port), "FL_APP_DATA_DIR": data_dir}))
    _write(directory / "start-superlink.sh", SUPERLINK_SCRIPT, executable=True)
    _write(directory / "fl-app-superlink.service",
           _unit("fl_app SuperLink (Flower)", str(directory), "start-superlink.sh"))
    address = f"{(hosts or ('127.0.0.1',))[0]}:{port}"
    _write(directory / "flwr" / "config.toml",
           f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
           f'address = "{address}"\nroot-certificates = "{certs / "ca.crt"}"\n')
    _write(directory / "README.md", COORDINATOR_README.format(address=address, connection=CONNECTION,
                                                             directory=directory))
    return directory


def node_config(name: str, image_dir: str | None, partition: tuple[int, int] | None) -> str:
    """The SuperNode's node config (TOML values): its name and where its data is."""
    where = f'image-dir="{image_dir}"' if image_dir else "partition-id={} num-partitions={}".format(*partition)
    return f'name="{name}" {where}'


def write_partner_kit(directory: Path, name: str, superlink: str, ca: Path, *, image_dir: str | None = None,
                      partition: tuple[int, int] | None = None, data_dir: str = "", overrides: str = "",
                      local_port: int = 9094, python: str = "python3", restart_delay: int = 10) -> Path:
    """Partner `name`'s kit in `directory`: its data is its own images (`image_dir`) or
    partition (id, count) of a known dataset under `data_dir` (FL_APP_DATA_DIR)."""
    if (image_dir is None) == (partition is None):
        raise ValueError("give the partner's images (image_dir) or its partition, not both")
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ca, directory / "ca.crt")
    _write(directory / "node.env", _env_file(
        f"{name}'s settings, read by start.sh: check the data location (NODE_CONFIG, "
        "FL_APP_DATA_DIR), which the coordinator wrote as agreed with you.",
        {"NAME": name, "SUPERLINK": superlink, "NODE_CONFIG": node_config(name, image_dir, partition),
         "FL_APP_DATA_DIR": data_dir, "RUN_OVERRIDES": overrides, "LOCAL_PORT": str(local_port),
         "PYTHON": python, "RESTART_DELAY": str(restart_delay)}))
    _write(directory / "start.sh", SUPERNODE_SCRIPT, executable=True)
    install_dir = f"{SERVICE_ROOT}/{name}"
    _write(directory / f"fl-app-supernode-{name}.service",
           _unit(f"fl_app SuperNode of {name} (Flower)", install_dir, "start.sh"))
    _write(directory / "README.md", PARTNER_README.format(name=name, superlink=superlink,
                                                         install_dir=install_dir))
    return directory


COORDINATOR_README = """# Coordinator kit

Made by `python -m fl_app.kit coordinator`; the whole sequence, both roles, is in fl_app's
docs/deployment.md.

- `certs/`: `ca.crt` goes to every partner (inside its kit); `ca.key` and `server.key`
  stay here, private. The certificates are valid for one year: make new ones before then
  (delete `certs/` and run the kit command again, then send partners new kits' `ca.crt`).
- `./start-superlink.sh` starts the SuperLink at {address}, with its settings in
  `superlink.env`; or install `fl-app-superlink.service` (edit its paths) in
  `/etc/systemd/system/` and `systemctl enable --now fl-app-superlink`.
- `export FLWR_HOME={directory}/flwr`: `flwr` then talks to this SuperLink as the
  connection `{connection}`:
  - `flwr supernode register PARTNER.pub {connection}` registers a partner's public key and
    prints its node id: write down which partner the id is;
  - `flwr supernode list {connection}` lists the nodes by id, with whether they are online;
  - `flwr run . {connection} --stream --run-config 'overrides="mode=deployment ..."'` submits a run;
  - `flwr list {connection}` shows each run's status (`finished:failed` for a failed one),
    `flwr log RUN_ID {connection}` its log.
"""

PARTNER_README = """# {name}: your SuperNode's kit

Your data never leaves this machine: the SuperNode trains the shared model on it and sends
back only model weights and metrics, over TLS, to the coordinator's SuperLink at
{superlink}. It connects out to that address; it needs no open port of its own.

1. Install the same fl_app version as the coordinator (`pip install -e .` in its folder),
   then read `node.env`: `NODE_CONFIG` and `FL_APP_DATA_DIR` say where your data is.
2. `./start.sh key` makes your key pair in `keys/`. Send `keys/{name}.pub` (public) to the
   coordinator; `keys/{name}` (private) never leaves this machine.
3. `./start.sh check` loads your data as training will, with the run's settings, and says
   what it found or what is wrong and where.
4. Once the coordinator has registered your key: `./start.sh`. It checks the data again,
   starts the SuperNode and starts it again if it stops; Ctrl-C stops it. To run it as a
   service, copy this folder to {install_dir}, check the paths in
   `fl-app-supernode-{name}.service`, copy it to `/etc/systemd/system/`, and
   `systemctl enable --now fl-app-supernode-{name}` (`systemctl stop`/`restart`/`status`,
   `journalctl -u fl-app-supernode-{name}` for the log).

The log shows, each round, how many of your images trained, your training loss and
accuracy, and your held-out accuracy. The coordinator learns your name, those figures,
your per-class counts of right and wrong predictions on your held-out images, and, if
something fails, its kind (for example "unknown class folder(s)"), never your paths or
file names: those stay in your log.
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fl_app.kit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="role", required=True)
    coordinator = commands.add_parser("coordinator", help="the SuperLink's kit: certificates, start "
                                      "script, systemd unit, flwr connection")
    coordinator.add_argument("directory", type=Path)
    coordinator.add_argument("--host", action="append", default=[], help="a DNS name or IP address "
                             "partners reach the SuperLink at (repeatable; the first is the connection's)")
    coordinator.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}")
    coordinator.add_argument("--data-dir", default="", help="the SuperLink machine's FL_APP_DATA_DIR (test sets)")
    partner = commands.add_parser("partner", help="a partner's kit: CA certificate, settings, start "
                                  "script, systemd unit, README")
    partner.add_argument("name", help="the partner's name, as the coordinator's tables show it")
    partner.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink")
    partner.add_argument("--ca", type=Path, required=True, help="the CA certificate (certs/ca.crt)")
    data = partner.add_mutually_exclusive_group(required=True)
    data.add_argument("--image-dir", help="the partner's images, one folder per class (on its machine)")
    data.add_argument("--partition", nargs=2, type=int, metavar=("ID", "COUNT"),
                      help="partition ID of COUNT of a known dataset (demos and tests)")
    partner.add_argument("--data-dir", default="", help="the partner's FL_APP_DATA_DIR (with --partition)")
    partner.add_argument("--overrides", default="", help="the run's Hydra overrides, for the data check")
    partner.add_argument("--out", type=Path, help="the kit's folder (default kits/NAME)")
    args = parser.parse_args(argv)
    if args.role == "coordinator":
        written = write_coordinator_kit(args.directory, tuple(args.host), args.port, data_dir=args.data_dir)
    else:
        written = write_partner_kit(args.out or Path("kits") / args.name, args.name, args.superlink, args.ca,
                                    image_dir=args.image_dir, partition=args.partition and tuple(args.partition),
                                    data_dir=args.data_dir, overrides=args.overrides)
    print(f"Kit written to {written}: see its README.md")


if __name__ == "__main__":
    main()
