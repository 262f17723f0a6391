"""deploy/: the recipes parse and say what they must, and ``kompot-dask`` runs on a real cluster.

The cluster tests start a real ``dask scheduler`` and ``dask worker`` processes (with
nannies) on loopback, run the installed ``kompot-dask`` entry point against them and
compare every output field with an in-process run of the same command: to 1e-8 of each
field's scale, not bit for bit (workers run single-threaded BLAS in other processes).
The ``--scheduler-file`` run has its worker processes SIGKILLed mid-run, one after the other
(each nanny starts a new one), and still gives the same results. A worker reporting another kompot_dask version (the
``KOMPOT_DASK_FAKE_VERSION`` testing hook) makes the run fail with one line. Every process
started here is gone afterwards (checked with psutil).

Small runs (50 landmarks, 20 null genes) on tests/data/anndata_input.h5ad: four
``kompot-dask`` invocations in all. ``--sample-col`` is what puts work on the workers
here: each sample's fit is a task (``kompot-fit-sample-*``); without it an atlas this
small fits in one cell chunk and runs in the client process.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import DATA, assert_close

anndata = pytest.importorskip("anndata")
pd = pytest.importorskip("pandas")
psutil = pytest.importorskip("psutil")
yaml = pytest.importorskip("yaml")

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
INPUT = DATA / "anndata_input.h5ad"
BIN = pathlib.Path(sys.executable).parent
C1, C2 = "control day-0", "stim 2.5h"
RUN = ["--groupby", "condition", "--condition1", C1, "--condition2", C2,
       "--sample-col", "sample", "--n-landmarks", "50", "--random-state", "0", "--null-genes", "20", "--no-progress"]
TIMEOUT = 240
ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

pytestmark = pytest.mark.filterwarnings("ignore:Writing zarr v2:UserWarning")  # anndata, writing test inputs


# --------------------------------------------------------------------------- processes


def _command() -> list[str]:
    script = BIN / "kompot-dask"
    return [str(script)] if script.exists() else [sys.executable, "-m", "kompot_dask.cli"]


def _kompot(args, cwd, **popen):
    return subprocess.run([*_command(), "run", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=TIMEOUT, **popen)


def _ok(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout
    return json.loads(lines[0])


class Cluster:
    """A ``dask scheduler`` and ``dask worker`` processes on loopback, started here."""

    def __init__(self, where: pathlib.Path):
        self.where = where
        self.scheduler_file = where / "scheduler.json"
        self.procs: list[subprocess.Popen] = []
        self.pids: set[int] = set()  # every process seen in the tree (nannies, workers, replacements)
        self.log = open(where / "cluster.log", "w")  # noqa: SIM115 - closed in stop()
        self.address = ""

    def _spawn(self, args, env=None) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", *args], cwd=self.where, stdout=self.log,
                                stderr=subprocess.STDOUT, env={**os.environ, **ONE_THREAD, **(env or {})})
        self.procs.append(proc)
        self.pids.add(proc.pid)
        return proc

    def start_scheduler(self) -> str:
        self._spawn(["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
                     "--scheduler-file", str(self.scheduler_file), "--no-dashboard"])
        deadline = time.monotonic() + 60
        while not self.scheduler_file.exists() or not self.scheduler_file.read_text().strip():
            assert time.monotonic() < deadline, self.logs()
            assert self.procs[0].poll() is None, self.logs()
            time.sleep(0.1)
        time.sleep(0.1)  # the file is written in one go; let it land
        self.address = json.loads(self.scheduler_file.read_text())["address"]
        return self.address

    def start_worker(self, nanny: bool = True, env=None) -> subprocess.Popen:
        return self._spawn(["distributed.cli.dask_worker", "--scheduler-file", str(self.scheduler_file),
                            "--host", "127.0.0.1", "--nthreads", "1", "--memory-limit", "2GB", "--no-dashboard",
                            "--local-directory", str(self.where / "workers"), "--nanny" if nanny else "--no-nanny",
                            "--preload", "kompot_dask.execution.cluster"],
                           env=env)

    def client(self, n_workers: int):
        from distributed import Client

        client = Client(scheduler_file=str(self.scheduler_file), timeout="60s")
        client.wait_for_workers(n_workers, timeout=90)
        return client

    def remember_tree(self) -> None:
        for proc in self.procs:
            try:
                self.pids.update(child.pid for child in psutil.Process(proc.pid).children(recursive=True))
            except psutil.NoSuchProcess:
                pass

    def logs(self) -> str:
        self.log.flush()
        return (self.where / "cluster.log").read_text()[-4000:]

    def stop(self) -> None:
        """Workers first, then the scheduler; SIGKILL what is left after 30 s; all gone."""
        self.remember_tree()
        for proc in [*self.procs[1:], *self.procs[:1]]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        alive = []
        for pid in self.pids:
            try:
                process = psutil.Process(pid)
                process.wait(timeout=15)
            except psutil.NoSuchProcess:
                continue
            except psutil.TimeoutExpired:
                alive.append(pid)
                process.kill()
        self.log.close()
        assert not alive, f"processes left running after the cluster stopped: {alive}"


@pytest.fixture(scope="module")
def atlas(tmp_path_factory):
    path = tmp_path_factory.mktemp("atlas") / "atlas.zarr"
    anndata.read_h5ad(INPUT).write_zarr(path)
    return path


@pytest.fixture(scope="module")
def reference(atlas, tmp_path_factory, request):
    """The same run in one process, no cluster (the shared cluster starts meanwhile)."""
    where = tmp_path_factory.mktemp("reference")
    proc = subprocess.Popen([*_command(), "run", str(atlas), *RUN, "-o", "out.zarr"], cwd=where,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        request.getfixturevalue("cluster")
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    _ok(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return anndata.read_zarr(where / "out.zarr")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One scheduler and two workers (each behind a nanny), shared by the run tests."""
    cluster = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        cluster.start_scheduler()
        cluster.start_worker()
        cluster.start_worker()
        cluster.client(2).close()
        yield cluster
    finally:
        cluster.stop()


def _same_results(out, ref) -> None:
    """Every field the run wrote (obs, var, layers, obsm, varm): same names, same values."""
    assert list(out.obs_names) == list(ref.obs_names) and list(out.var_names) == list(ref.var_names)
    written = [c for c in ref.obs.columns if c.startswith("kompot")] + [c for c in ref.var.columns if c.startswith("kompot")]
    assert len(written) > 5, written
    for where in ("obs", "var"):
        mine, theirs = getattr(out, where), getattr(ref, where)
        assert list(mine.columns) == list(theirs.columns), where
        for column in theirs.columns:
            _same(mine[column], theirs[column], f"{where}[{column!r}]")
    for where in ("layers", "obsm", "varm"):
        mine, theirs = getattr(out, where), getattr(ref, where)
        assert sorted(mine.keys()) == sorted(theirs.keys()), where
        for key in theirs.keys():
            _same(mine[key], theirs[key], f"{where}[{key!r}]")
    assert sorted(out.uns.keys()) == sorted(ref.uns.keys())


def _same(actual, expected, what: str) -> None:
    a, b = np.asarray(actual), np.asarray(expected)
    if a.dtype.kind in "fc" or b.dtype.kind in "fc":
        a, b = a.astype(np.float64), b.astype(np.float64)
        assert np.array_equal(np.isnan(a), np.isnan(b)), what
        finite = ~np.isnan(b)
        scale = float(np.max(np.abs(b[finite]), initial=0.0))
        assert_close(a[finite], b[finite], atol=1e-8 * scale, rtol=1e-8, what=what)
    else:
        assert a.shape == b.shape and (a == b).all(), what


# --------------------------------------------------------------------------- cluster runs


def test_run_on_scheduler_address_matches_in_process_run(cluster, atlas, reference, tmp_path):
    summary = _ok(_kompot([atlas, *RUN, "--scheduler", cluster.address, "-o", "out.zarr"], tmp_path))
    assert summary["scheduler"] == cluster.address
    _same_results(anndata.read_zarr(tmp_path / "out.zarr"), reference)
    client = cluster.client(2)
    try:  # the per-sample fits ran as tasks on the workers, which got the plugin and agree with us
        prefixes = client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.task_prefixes))
        assert "kompot-fit-sample" in prefixes, prefixes
        assert "kompot-dask-jax-setup" in client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.worker_plugins))
        from kompot_dask.execution import check_versions

        versions = check_versions(client)
        assert len(versions) == 4  # client, scheduler, two workers
    finally:
        client.close()


# Addresses of the workers running tasks now (runs on the scheduler; a lambda travels by
# value, this module is not importable there).
_busy_workers = lambda dask_scheduler: [a for a, ws in dask_scheduler.workers.items() if ws.processing]  # noqa: E731


def _worker_pids(client) -> dict[str, int]:
    return client.run_on_scheduler(lambda dask_scheduler: {a: ws.pid for a, ws in dask_scheduler.workers.items()})


def _kill_workers_during(cluster, proc: subprocess.Popen, kills: int) -> list[int]:
    """SIGKILL up to ``kills`` of the original worker processes (not their nannies), one at
    a time while ``proc`` runs, each while it runs one of the run's tasks; wait for the
    nanny's replacement between kills."""
    client = cluster.client(2)
    killed: list[int] = []
    try:
        originals = _worker_pids(client)  # address -> pid of the worker process
        while proc.poll() is None and len(killed) < kills:
            busy = [a for a in client.run_on_scheduler(_busy_workers) if a in originals and originals[a] not in killed]
            if not busy:
                time.sleep(0.05)
                continue
            time.sleep(0.3)  # in the middle of a task
            victim = originals[busy[0]]
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)
            cluster.remember_tree()
            deadline = time.monotonic() + 90
            while victim in _worker_pids(client).values() or len(_worker_pids(client)) < 2:
                assert time.monotonic() < deadline, cluster.logs()
                time.sleep(0.1)  # the nanny's new worker
            cluster.remember_tree()
    finally:
        client.close()
    return killed


def test_run_survives_a_killed_worker_via_scheduler_file(cluster, atlas, reference, tmp_path):
    proc = subprocess.Popen([*_command(), "run", str(atlas), *RUN, "--scheduler-file", str(cluster.scheduler_file),
                             "-o", "out.zarr"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        killed = _kill_workers_during(cluster, proc, kills=2)
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert killed, "the run ended before a worker could be killed"
    print(f"worker processes killed mid-run: {len(killed)}")
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads(stdout)
    assert summary["scheduler"] == cluster.address
    _same_results(anndata.read_zarr(tmp_path / "out.zarr"), reference)


# --------------------------------------------------------------------------- version check


def test_worker_of_another_version_is_refused(atlas, tmp_path):
    from distributed import Client

    from kompot_dask import __version__
    from kompot_dask.execution import check_versions, get_client

    cluster = Cluster(tmp_path)
    try:
        address = cluster.start_scheduler()
        cluster.start_worker(nanny=False, env={"KOMPOT_DASK_FAKE_VERSION": "0.0.0-fake"})
        client = cluster.client(1)
        try:
            (worker,) = client.scheduler_info()["workers"]
            with pytest.raises(RuntimeError) as err:
                check_versions(client)
            message = str(err.value)
            assert "\n" not in message and message.startswith("kompot_dask workers differ from this client: ")
            assert f"kompot_dask {__version__} here, 0.0.0-fake on {worker}" in message
            assert message.count(" here, ") == 1  # only what differs
            assert "install the same versions everywhere" in message
        finally:
            client.close()
        with pytest.raises(RuntimeError, match="0.0.0-fake"):
            get_client(address)
        assert not any(isinstance(c, Client) and c.status == "running" for c in _clients())

        proc = _kompot([atlas, *RUN, "--scheduler", address, "-o", "out.zarr"], tmp_path)
        assert proc.returncode == 1, proc.stderr[-3000:]
        errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
        assert len(errors) == 1, proc.stderr
        assert errors[0].startswith("kompot-dask: error: kompot_dask workers differ from this client: ")
        assert f"0.0.0-fake on {worker}" in errors[0]
        assert proc.stdout == "" and not (tmp_path / "out.zarr").exists()
    finally:
        cluster.stop()


def _clients():
    from distributed.client import _global_clients

    return list(_global_clients.values())


# --------------------------------------------------------------------------- the recipes


def _load(path: pathlib.Path):
    return yaml.safe_load(path.read_text())


def _leaves(tree, prefix=()):
    if isinstance(tree, dict) and tree:
        for key, value in tree.items():
            yield from _leaves(value, (*prefix, key))
    else:
        yield prefix


def test_every_yaml_parses_and_no_image_is_floating():
    files = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
    assert {f.relative_to(DEPLOY).as_posix() for f in files} >= {
        "local/cluster.yaml", "slurm/jobqueue.yaml", "kubernetes/daskcluster.yaml"}
    for path in files:
        assert isinstance(_load(path), dict), path
        assert ":latest" not in json.dumps(_load(path)), path  # comments aside
    dockerfile = (DEPLOY / "kubernetes" / "Dockerfile").read_text().splitlines()
    assert not any(":latest" in line for line in dockerfile if not line.lstrip().startswith("#"))


def test_local_config_holds_only_dask_settings():
    import dask
    import distributed  # noqa: F401

    config = _load(DEPLOY / "local" / "cluster.yaml")
    assert config["temporary-directory"]  # the spill directory
    defaults = dask.config.merge(*dask.config.defaults)
    for path in _leaves(config):
        node = defaults
        for key in path:
            assert isinstance(node, dict) and key in node, f"not a dask setting: {'.'.join(path)}"
            node = node[key]
    readme = (DEPLOY / "local" / "README.md").read_text()
    assert "--n-workers 2 --memory-limit 8GB" in readme and "dashboard" in readme
    assert "get_client(" in readme


def test_jobqueue_config_sizes_workers_and_threads():
    slurm = _load(DEPLOY / "slurm" / "jobqueue.yaml")["jobqueue"]["slurm"]
    for key in ("cores", "processes", "memory", "walltime", "local-directory"):
        assert slurm.get(key), key
    assert slurm["cores"] == slurm["processes"]  # one thread per worker process
    prologue = "\n".join(slurm["job-script-prologue"])
    for var in ONE_THREAD:
        assert f"export {var}=1" in prologue
    assert "XLA_FLAGS" in prologue and "intra_op_parallelism_threads=1" in prologue
    args = slurm["worker-extra-args"]
    preload = args[args.index("--preload") + 1]
    module = __import__(preload, fromlist=["dask_setup"])
    assert callable(module.dask_setup)


def _k8s_bytes(quantity: str) -> int:
    from dask.utils import parse_bytes

    text = str(quantity)
    return parse_bytes(text + "B" if text.endswith("i") else text)


def test_daskcluster_pins_image_and_sets_resources():
    from kompot_dask import __version__

    manifest = _load(DEPLOY / "kubernetes" / "daskcluster.yaml")
    assert manifest["apiVersion"] == "kubernetes.dask.org/v1" and manifest["kind"] == "DaskCluster"
    spec = manifest["spec"]
    containers = {"scheduler": spec["scheduler"]["spec"]["containers"],
                  "worker": spec["worker"]["spec"]["containers"]}
    images = set()
    for role, (container,) in containers.items():
        image = container["image"]
        name, _, tag = image.rpartition(":")
        assert name and "/" not in tag and tag not in ("", "latest"), image
        images.add(image)
        resources = container["resources"]
        for kind in ("requests", "limits"):
            assert resources[kind]["cpu"] and resources[kind]["memory"], (role, kind)
        env = {e["name"]: e["value"] for e in container["env"]}
        assert all(env.get(var) == "1" for var in ONE_THREAD), (role, env)
    assert len(images) == 1 and images.pop().endswith(f":{__version__}")  # one image, this release
    (worker,) = containers["worker"]
    args = [str(a) for a in worker["args"]]
    assert args[:2] == ["dask", "worker"] and args[args.index("--nthreads") + 1] == "1"
    dask_limit = _k8s_bytes(args[args.index("--memory-limit") + 1])
    assert 0 < dask_limit < _k8s_bytes(worker["resources"]["limits"]["memory"])
    assert "--local-directory" in args and "kompot_dask.execution.cluster" in args
    assert "kompot-scheduler" in (DEPLOY / "kubernetes" / "README.md").read_text()


def test_dockerfile_pins_every_package():
    from kompot_dask import __version__

    text = (DEPLOY / "kubernetes" / "Dockerfile").read_text()
    lines = text.replace("\\\n", " ").splitlines()
    (base,) = [line.split()[1] for line in lines if line.startswith("FROM ")]
    assert ":" in base and not base.endswith(":latest"), base
    requirements = []
    for line in lines:
        if line.startswith("RUN ") and "pip install" in line:
            words = line.split("pip install", 1)[1].split()
            skip = False
            for word in words:
                if skip:
                    skip = False
                elif word in ("--find-links", "-f", "--index-url", "-i"):
                    skip = True
                elif not word.startswith("-"):
                    requirements.append(word.strip("\"'"))
    assert len(requirements) >= 6
    unpinned = [r for r in requirements if "==" not in r]
    assert not unpinned, unpinned
    pins = {r.split("==")[0].split("[")[0].lower(): r.split("==")[1] for r in requirements}
    assert pins["kompot-dask"] == __version__
    assert {"dask", "distributed", "jax", "jaxlib", "numpy"} <= set(pins)
    assert pins["dask"] == pins["distributed"] and pins["jax"] == pins["jaxlib"]


STUB = """#!/bin/bash
line="$(printf '%s\\x1f' "$(basename "$0")" "$@")OMP=${OMP_NUM_THREADS:-}"
echo "$line" >> "$STUB_LOG"  # one write: stubs run concurrently
if [ "$(basename "$0")" = dask ] && [ "$1" = scheduler ]; then
    while [ $# -gt 0 ]; do
        if [ "$1" = --scheduler-file ]; then echo '{"address": "tcp://127.0.0.1:8786"}' > "$2"; fi
        shift
    done
fi
exit 0
"""


def _stubbed(tmp_path, names) -> dict:
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name in names:
        (stubs / name).write_text(STUB)
        (stubs / name).chmod(0o755)
    return {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "STUB_LOG": str(tmp_path / "calls.log")}


def _calls(tmp_path) -> list[tuple[list[str], str]]:
    calls = []
    for line in (tmp_path / "calls.log").read_text().splitlines():
        *words, omp = line.split("\x1f")
        calls.append((words, omp))
    return calls


def test_batch_script_starts_scheduler_workers_and_run(tmp_path):
    script = DEPLOY / "slurm" / "run_kompot.sbatch"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    env = _stubbed(tmp_path, ["dask", "srun", "kompot-dask", "python"])
    env.update(ATLAS="/data/atlas.zarr", OUTPUT="/data/out.zarr", SCRATCH=str(tmp_path / "shared"),
               LOCAL_SCRATCH=str(tmp_path / "local"), SLURM_JOB_ID="42", SLURM_NTASKS="2", PYTHON="python",
               OMP_NUM_THREADS="16")
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    scheduler_file = str(tmp_path / "shared" / "kompot-dask-42" / "scheduler.json")
    order = [words[0] for words, _ in _calls(tmp_path)]
    assert sorted(order) == sorted(["dask", "srun", "python", "kompot-dask"]), order
    assert order[0] == "dask" and order[-1] == "kompot-dask"  # scheduler first, the run last
    calls = {words[0]: (words[1:], omp) for words, omp in _calls(tmp_path)}
    args, _ = calls["dask"]
    assert args[:3] == ["scheduler", "--scheduler-file", scheduler_file]
    args, omp = calls["srun"]
    assert args[:2] == ["--ntasks=2", "--cpus-per-task=1"] and omp == "OMP=1"
    worker = args[2:]
    assert worker[:2] == ["dask", "worker"] and worker[worker.index("--scheduler-file") + 1] == scheduler_file
    assert worker[worker.index("--nthreads") + 1] == "1" and "--memory-limit" in worker
    assert worker[worker.index("--local-directory") + 1] == str(tmp_path / "local")
    args, _ = calls["python"]
    assert args[-2:] == [scheduler_file, "2"]  # waits for both workers
    args, omp = calls["kompot-dask"]
    assert args[:2] == ["run", "/data/atlas.zarr"] and omp == "OMP=1"
    assert args[args.index("--scheduler-file") + 1] == scheduler_file and args[-2:] == ["-o", "/data/out.zarr"]
    assert not (tmp_path / "shared" / "kompot-dask-42").exists()  # cleaned up

    del env["ATLAS"]
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "ATLAS" in proc.stderr


def test_submit_script_passes_atlas_and_output(tmp_path):
    env = _stubbed(tmp_path, ["sbatch"])
    proc = subprocess.run(["bash", str(DEPLOY / "slurm" / "submit.sh"), "/a.zarr", "/o.zarr", "--ntasks=4"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    ((words, _),) = _calls(tmp_path)
    assert words == ["sbatch", "--export=ALL,ATLAS=/a.zarr,OUTPUT=/o.zarr", "--ntasks=4",
                     str(DEPLOY / "slurm" / "run_kompot.sbatch")]
