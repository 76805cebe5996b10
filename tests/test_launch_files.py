"""The cluster launch files: the SLURM script run end to end with a real Ray head, the cluster
launcher file under Ray's own validation, the RayJob under strict validation against KubeRay's CRD."""

from __future__ import annotations

import gzip
import os
import random
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from poh_tune.cli import build_parser
from tests.cli_runs import GRID, dump, results_rows

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
DOCS = ROOT / "docs" / "clusters.md"
# KubeRay's RayJob CRD, kept with the tests (tests/data/README.md says where it comes from).
CRD = ROOT / "tests" / "data" / "ray.io_rayjobs.yaml.gz"


def _launch_argv(command: str) -> list[str]:
    tokens = shlex.split(command)
    i = tokens.index("poh_tune.launch")
    assert tokens[i - 2:i] == ["python", "-m"], command
    return tokens[i + 1:]


def _parse_cli(argv: list[str]):
    args = build_parser().parse_args(argv)  # argparse exits (SystemExit) on a flag it lacks
    assert args.command in ("grid", "optuna")
    return args


def _header_commands(path: Path) -> list[str]:
    """The shell commands that a launch file's header comment tells the user to run."""
    return [line[1:].strip() for line in path.read_text().splitlines()
            if re.match(r"#\s+(ray|kubectl|sbatch) ", line)]


# The SLURM script, run for real on this machine: only srun, scontrol and `hostname --ip-address`
# are stood in for; `ray start`, `ray status`, the token and the grid are the real ones.
STAND_INS = {
    # srun [--overlap] [--nodes=N] [--ntasks=N] -w NODE CMD...: run CMD here, as the node would.
    "srun": 'echo "srun $*" >> "$CALLS"\n'
            'while (($#)); do case $1 in -w) shift 2;; -*) shift;; *) break;; esac; done\n'
            'exec "$@"',
    "scontrol": '[[ "$1 $2" == "show hostnames" ]] && tr , "\\n" <<< "$3"',
    "hostname": '[[ "$1" == --ip-address ]] && { echo 127.0.0.1; exit 0; }\nexec {real} "$@"',
}


def _free_low_port(taken: set[int]) -> int:
    """A free loopback port below Ray's worker-port range (10002-19999), which `ray start` refuses."""
    while True:
        port = random.randint(7000, 9999)
        if port in taken:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        taken.add(port)
        return port


def _processes_naming(marker: str) -> dict[int, str]:
    """The live processes whose environment or command line names `marker` (pid -> cmdline)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if marker.encode() in cmdline or marker.encode() in environ:
            found[int(proc.name)] = cmdline.replace(b"\0", b" ").decode(errors="replace")[:200]
    return found


def _left_after(marker: str, grace_s: float = 15.0) -> dict[int, str]:
    """What is still running after `grace_s`; stops those (by process id) so nothing leaks."""
    deadline = time.time() + grace_s
    while (left := _processes_naming(marker)) and time.time() < deadline:
        time.sleep(0.25)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


def _run_sbatch(tmp_path: Path, args: list[str], timeout: float = 300,
                **env: str) -> tuple[subprocess.CompletedProcess, Path, list[list[str]]]:
    """Run launch/slurm_grid.sbatch as SLURM would on a one-node job, with a fresh HOME.

    Returns:
        the finished script, its HOME, and the log files of each Ray session that it
        left in its RAY_TMPDIR
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    real_hostname = shutil.which("hostname")
    assert real_hostname
    for name, body in STAND_INS.items():
        f = bin_dir / name
        f.write_text("#!/bin/bash\n" + body.replace("{real}", real_hostname) + "\n")
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    for d in (home, tmp):
        d.mkdir()
    # Short: Ray's session sockets live under it, and a Unix socket path is at most 107 bytes.
    ray_tmp = Path(tempfile.mkdtemp(prefix="poh_rt_", dir="/tmp"))
    ports: set[int] = set()
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("RAY_", "SLURM_")) and k not in ("PYTHONPATH", "HOME", "TMPDIR")}
    run_env = {
        **base,
        # The stand-ins first; then this interpreter's own bin (ray, python): a fresh HOME
        # hides pyenv's shims' root.
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{base['PATH']}",
        "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}".rstrip(":"),
        "HOME": str(home), "TMPDIR": str(tmp), "CALLS": str(tmp_path / "calls.log"),
        "RAY_TMPDIR": str(ray_tmp), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_PORT": str(_free_low_port(ports)),
        # Fixed default ports that a second Ray on this machine would also want.
        "RAY_HEAD_ARGS": f"--ray-client-server-port={_free_low_port(ports)} "
                         f"--dashboard-agent-listen-port={_free_low_port(ports)}",
        "POH_STORAGE": str(tmp_path / "runs"),
        "SLURM_JOB_NODELIST": "nodeA", "SLURM_JOB_ID": "4242", "SLURM_CPUS_PER_TASK": "2",
        "SLURM_GPUS_PER_NODE": "0", "SLURM_SUBMIT_DIR": str(tmp_path),
        **env,
    }
    out, err = tmp_path / "job.out", tmp_path / "job.err"
    try:
        # Into files, not pipes: a Ray process left running would hold a pipe open, and the
        # test would wait for its timeout instead of reporting the process.
        with open(out, "w") as o, open(err, "w") as e:
            rc = subprocess.run(["bash", str(LAUNCH / "slurm_grid.sbatch"), *args], env=run_env,
                                stdout=o, stderr=e, timeout=timeout, cwd=tmp_path).returncode
    finally:
        left = _left_after(str(ray_tmp))
        sessions = [sorted(f.name for f in (d / "logs").iterdir())
                    for d in (ray_tmp / "ray").glob("session_2*")]
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not left, f"Ray processes left running: {left}"
    return subprocess.CompletedProcess(args, rc, out.read_text(), err.read_text()), home, sessions


def _tiny_space(tmp_path: Path, grid: dict) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(dump(grid))
    return str(path)


# --gpus-per-trial 0: the node declares no GPUs; later flags replace the script's defaults.
TINY_ARGS = ["--gpus-per-trial", "0", "--cpus-per-trial", "1", "--name", "tiny", "--no-report"]


@pytest.mark.slow
def test_slurm_script_runs_a_grid_on_a_fresh_account_and_stops_its_ray(tmp_path):
    space = _tiny_space(tmp_path, GRID)
    p, home, sessions = _run_sbatch(tmp_path, [*TINY_ARGS, space])
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    # The arguments reached the grid: the run is named as asked and holds the space's variants.
    sweep = GRID["experiments"]["lr"]["sweep"]["lr_encoder"]
    rows = results_rows(tmp_path / "runs" / "tiny")
    assert sorted(float(r["config.lr_encoder"]) for r in rows) == sorted(sweep)
    assert all(r["status"] == "TERMINATED" for r in rows)
    # The head was a real `ray start`, started through srun on the first node, in the private
    # temp dir; the token was created on the fresh home, private, and never printed.
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert any("-w nodeA" in c and "ray start" in c and "--head" in c for c in calls), calls
    assert len(sessions) == 1 and any(f.startswith("gcs_server") for f in sessions[0])
    token_file = home / ".ray" / "auth_token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert token_file.read_text().strip() not in out
    # The node was stopped through srun by the process id that its `ray start` wrote.
    assert any("kill -TERM" in c and "-w nodeA" in c for c in calls), calls


@pytest.mark.slow
def test_slurm_script_exits_with_a_failing_grids_status_and_stops_its_ray(tmp_path):
    space = _tiny_space(tmp_path, GRID)
    missing = "no_such_experiment"
    p, _, sessions = _run_sbatch(tmp_path, [*TINY_ARGS, "--experiment", missing, space])
    out = p.stdout + p.stderr
    # The CLI's own answer to the same mistake, without any cluster: the script passes it on.
    direct = subprocess.run([sys.executable, "-m", "poh_tune.launch", "grid", *TINY_ARGS,
                             "--experiment", missing, "--storage", str(tmp_path / "direct"),
                             space], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert direct.returncode != 0 and missing in direct.stderr
    assert p.returncode == direct.returncode, out[-4000:]
    assert missing in out
    calls = (tmp_path / "calls.log").read_text()
    assert len(sessions) == 1 and "kill -TERM" in calls  # Ray was up, then stopped


@pytest.mark.slow
def test_slurm_script_fails_fast_when_the_head_cannot_start(tmp_path):
    # Ray refuses a GCS port inside its worker-port range: the head's srun ends at once, and the
    # script must say so instead of polling until RAY_WAIT_S.
    t0 = time.time()
    p, _, _ = _run_sbatch(tmp_path, TINY_ARGS, RAY_PORT="10500", RAY_WAIT_S="240")
    assert p.returncode != 0
    assert "the Ray head exited" in p.stderr
    assert time.time() - t0 < 120
    assert not (tmp_path / "runs").exists()  # the grid never ran


def test_slurm_script_header_commands_parse():
    script = LAUNCH / "slurm_grid.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    # The defaults that the script passes before the user's arguments, and every usage line.
    defaults = re.search(r"python -m poh_tune\.launch grid (.*?) \"\$@\"", text, re.S)
    assert defaults
    base = _launch_argv("python -m poh_tune.launch grid "
                        + defaults.group(1).replace("\\\n", " "))
    usages = _header_commands(script)
    assert usages and all(u.startswith("sbatch launch/slurm_grid.sbatch") for u in usages)
    for usage in usages:
        user = shlex.split(usage.split("#")[0])[2:]
        _parse_cli(base + user)
    # A user's flag replaces the default: argparse keeps the last value.
    args = _parse_cli(base + ["--gpus-per-trial", "1"])
    assert args.gpus_per_trial == 1


# The Ray cluster launcher file.
def _cluster_config() -> dict:
    return yaml.safe_load((LAUNCH / "ray_cluster.yaml").read_text())


def test_ray_cluster_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(_cluster_config()))
    # The same check rejects a misspelled key: it is a real check.
    bad = _cluster_config()
    bad["setup_comands"] = bad.pop("setup_commands")
    with pytest.raises(Exception, match="setup_comands"):
        validate_config(prepare_config(bad))


def _mount_command(cfg: dict) -> str:
    mounts = [c for c in cfg["setup_commands"] if " mount " in c]
    assert len(mounts) == 1, cfg["setup_commands"]
    return mounts[0]


def test_ray_cluster_uses_one_mounted_storage_path_and_a_driver_that_outlives_ssh():
    cfg = _cluster_config()
    commands = _header_commands(LAUNCH / "ray_cluster.yaml")
    runs = [c for c in commands if "poh_tune.launch" in c]
    assert len(runs) == 1
    run = shlex.split(runs[0])
    # The driver runs in tmux on the head (or as a Ray job): a dropped SSH session leaves it.
    assert run[:3] == ["ray", "exec", "launch/ray_cluster.yaml"] and "--tmux" in run or \
        run[:3] == ["ray", "job", "submit"], runs[0]
    args = _parse_cli(_launch_argv(run[-1].split("&&")[-1]))
    storage = args.storage.rstrip("/")
    # Mounted in setup_commands (which run on every node, head and workers), at a folder that
    # holds the storage path; the run folder itself is made there.
    mount = shlex.split(_mount_command(cfg).split(" mount ", 1)[1].split(";")[0])
    mount_point = mount[-1]
    assert storage.startswith(mount_point.rstrip("/") + "/"), (storage, mount_point)
    assert storage in _mount_command(cfg)
    assert not any(" mount " in c for c in cfg.get("head_setup_commands", []) +
                   cfg.get("worker_setup_commands", []))
    # What is copied back is that same folder.
    downs = [shlex.split(c) for c in commands if c.startswith("ray rsync-down")]
    assert len(downs) == 1 and downs[0][3].rstrip("/") == storage, downs
    # The docs name the same path.
    assert storage in DOCS.read_text()


def _run_mount_command(tmp_path: Path, command: str) -> subprocess.CompletedProcess:
    """Run the mount command with sudo and mountpoint stood in for (nothing is installed or
    mounted): sudo logs what it was asked to run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in {"sudo": 'echo "$*" >> "$SUDO_LOG"', "mountpoint": "exit 1"}.items():
        f = bin_dir / name
        f.write_text(f"#!/bin/bash\n{body}\n")
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "sudo.log"
    log.unlink(missing_ok=True)
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=30,
                          env={"PATH": f"{bin_dir}:/usr/bin:/bin", "SUDO_LOG": str(log)})


def test_ray_cluster_mount_needs_the_file_system_id_and_mounts_it(tmp_path):
    cfg = _cluster_config()
    command = _mount_command(cfg)
    setting = re.search(r"\b(\w+)=(fs-\w+)", command)
    assert setting, command
    name, placeholder = setting.groups()
    # As shipped, the placeholder stops `ray up` with a line naming the setting.
    p = _run_mount_command(tmp_path, command)
    assert p.returncode != 0 and name in p.stderr
    assert not (tmp_path / "sudo.log").exists()  # nothing was attempted
    # Filled in: one NFS mount of that file system, in the cluster's region.
    fs_id = "fs-0123456789abcdef0"
    p = _run_mount_command(tmp_path, command.replace(f"{name}={placeholder}", f"{name}={fs_id}"))
    assert p.returncode == 0, p.stderr
    sudo = (tmp_path / "sudo.log").read_text().splitlines()
    mounts = [shlex.split(c) for c in sudo if c.startswith("mount ")]
    assert len(mounts) == 1, sudo
    region = cfg["provider"]["region"]
    assert mounts[0][mounts[0].index("-t") + 1].startswith("nfs")
    assert mounts[0][-2] == f"{fs_id}.efs.{region}.amazonaws.com:/"
    # Mounted where the documented run writes, and the run folder is made there.
    (run,) = [c for c in _header_commands(LAUNCH / "ray_cluster.yaml") if "poh_tune.launch" in c]
    storage = _parse_cli(_launch_argv(shlex.split(run)[-1].split("&&")[-1])).storage
    assert storage.startswith(mounts[0][-1].rstrip("/") + "/")
    assert f"mkdir -p {storage}" in sudo
    assert any(c.startswith("apt-get") and "nfs-common" in c and "tmux" in c for c in sudo)


# The KubeRay RayJob.
def _strict(node, preserved: bool = False):
    """KubeRay's schema as `kubectl apply --validate=strict` applies it (../shared/k8s/README.md):
    no unknown fields where properties are listed; Kubernetes' own keywords dropped."""
    if isinstance(node, list):
        return [_strict(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items()
           if not k.startswith("x-kubernetes-") and not (k == "format" and v == "int-or-string")}
    if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    return out


@pytest.fixture(scope="module")
def rayjob_validator():
    crd = yaml.safe_load(gzip.decompress(CRD.read_bytes()))
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(v1["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def _kuberay_docs() -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all((LAUNCH / "kuberay_rayjob.yaml").read_text()) if d]
    kinds = {d["kind"]: d for d in docs}
    assert len(kinds) == len(docs) == 2 and set(kinds) == {"RayJob", "PersistentVolumeClaim"}
    return kinds


def _errors(validator, doc) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(doc)]


def test_kuberay_rayjob_is_valid_under_strict_validation(rayjob_validator):
    job = _kuberay_docs()["RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    assert _errors(rayjob_validator, job) == []
    # Strictness reaches deep: a misspelled field anywhere in a pod template is an error.
    bad = yaml.safe_load(yaml.safe_dump(job))
    container = bad["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    container["volumeMount"] = container.pop("volumeMounts")
    assert any("volumeMount" in e for e in _errors(rayjob_validator, bad))
    bad = yaml.safe_load(yaml.safe_dump(job))
    bad["spec"]["shutdownAfterJobFinish"] = bad["spec"].pop("shutdownAfterJobFinishes")
    assert any("shutdownAfterJobFinish" in e for e in _errors(rayjob_validator, bad))


def test_kuberay_claim_is_strictly_valid_shared_and_sized():
    claim = _kuberay_docs()["PersistentVolumeClaim"]
    version = kubernetes_validate.latest_version()
    kubernetes_validate.validate(claim, version, strict=True)
    bad = yaml.safe_load(yaml.safe_dump(claim))
    bad["spec"]["storageClass"] = bad["spec"].pop("storageClassName")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, version, strict=True)
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # every pod writes at once
    assert claim["spec"]["storageClassName"]
    assert claim["spec"]["resources"]["requests"]["storage"]


def _pod_templates(job: dict) -> list[tuple[str, dict]]:
    cluster = job["spec"]["rayClusterSpec"]
    return [("head", cluster["headGroupSpec"])] + [
        (g["groupName"], g) for g in cluster["workerGroupSpecs"]]


def test_kuberay_every_pod_mounts_the_claim_and_storage_lies_on_it():
    docs = _kuberay_docs()
    job, claim = docs["RayJob"], docs["PersistentVolumeClaim"]
    args = _parse_cli(_launch_argv(job["spec"]["entrypoint"]))
    storage = Path(args.storage)
    assert storage.is_absolute()
    head_params = job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]
    # The submitter pod reaches the head's dashboard over the pod network, not on loopback.
    assert head_params["dashboard-host"] == "0.0.0.0"
    for group, spec in _pod_templates(job):
        pod = spec["template"]["spec"]
        volumes = {v["name"] for v in pod["volumes"]
                   if v.get("persistentVolumeClaim", {}).get("claimName") ==
                   claim["metadata"]["name"]}
        assert volumes, group
        for c in pod["containers"]:
            mounts = [Path(m["mountPath"]) for m in c["volumeMounts"] if m["name"] in volumes]
            # The driver runs on the head, and every worker writes its trials there too.
            assert any(storage.is_relative_to(m) and storage != m for m in mounts), (group, c)
