"""deploy/: the recipes parse and say what they must, and ``kompot-dask`` runs on a real cluster.

The cluster tests start a real ``dask scheduler`` and ``dask worker`` processes (with
nannies) on loopback, run the installed ``kompot-dask`` entry point against them and
compare every output field with an in-process run of the same command: to 1e-8 of each
field's scale, not bit for bit (workers run single-threaded BLAS in other processes).
Two ``--scheduler-file`` runs have worker processes SIGKILLed while they execute the run's
tasks: one worker, then every worker in turn (each nanny starts a new one, and the run ends
on new workers only); both still give the same results. A worker reporting another kompot_dask version
(the ``KOMPOT_DASK_FAKE_VERSION`` testing hook) makes ``run`` and ``plan`` fail with one
line; one that joins after the client connected leaves by itself with the same line.
Every process started here is gone afterwards (checked with psutil).

Small runs (50 landmarks, 20 null genes) on tests/data/anndata_input.h5ad: six
``kompot-dask`` invocations in all. ``--sample-col`` is what puts work on the workers
here: each sample's fit is a task (``kompot-fit-sample-*``, six per analysis, tens of
seconds of work in all); without it an atlas this small fits in one cell chunk and runs in
the client process."""

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


def _kompot(args, cwd, command="run", **popen):
    return subprocess.run([*_command(), command, *map(str, args)], cwd=cwd, capture_output=True, text=True,
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
        return self.logs_all()[-4000:]

    def logs_all(self) -> str:
        self.log.flush()
        return (self.where / "cluster.log").read_text()

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


# --------------------------------------------------------------------------- killed workers
#
# A worker is killed while it executes one of the run's tasks, which the run cannot finish
# without: the test asks the worker (``client.run``, in its event loop) whether a
# ``kompot-*`` task is executing and, if so, the worker SIGKILLs its own process there and
# then. Its event loop is busy with that check, so the task cannot report its result in
# between: the scheduler still has the task processing on that worker when it sees the
# worker die, and says so in its ``remove-worker`` event. What proves each kill comes from
# outside the engine: the worker's PID is gone, its nanny logged "killed by signal 9", the
# scheduler logged the removal (unexpected, with run tasks processing) and a new worker
# whose parent is the same nanny.


def _worker_pids(client) -> dict[str, int]:
    """Worker address -> PID of the worker process (not its nanny), as the scheduler has them."""
    return client.run_on_scheduler(lambda dask_scheduler: {a: ws.pid for a, ws in dask_scheduler.workers.items()})


def _worker_events(client) -> list[dict]:
    """The scheduler's add-worker and remove-worker events, with the keys processing on a
    removed worker (``client.get_events`` cannot send the sets in them)."""
    def events(dask_scheduler):
        return [{"action": msg["action"], "worker": msg["worker"], "expected": msg.get("expected"),
                 "processing": sorted(map(str, msg.get("processing-tasks", ())))}
                for _, msg in dask_scheduler.get_events("all")
                if isinstance(msg, dict) and msg.get("action") in ("add-worker", "remove-worker")]

    return client.run_on_scheduler(events)


def _kill_if_busy():
    """For ``client.run`` on one worker: SIGKILL the worker process if it executes a run task
    now, else return False. Nested, so that it travels by value (the workers cannot import
    this module)."""

    def kill_if_busy(dask_worker):
        import os
        import signal

        if any(str(ts.key).startswith("kompot-") for ts in dask_worker.state.executing):
            os.kill(os.getpid(), signal.SIGKILL)
        return False

    return kill_if_busy


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _parent(pid: int) -> int | None:
    """The parent PID of a live process (None once it is gone)."""
    try:
        return None if _gone(pid) else psutil.Process(pid).ppid()
    except psutil.NoSuchProcess:
        return None


def _kill_when_busy(client, proc: subprocess.Popen, candidates: dict[str, int]) -> tuple[str, int]:
    """Wait until one of ``candidates`` (address -> PID) executes a run task, and kill it
    then; its address and PID. Fails if the run ends first."""
    kill = _kill_if_busy()
    while True:
        assert proc.poll() is None, (f"the run ended before one of {sorted(candidates)} ran one of its tasks: "
                                     "no worker was killed mid-run")
        for address, pid in candidates.items():
            try:
                client.run(kill, workers=[address])
            except Exception:  # noqa: BLE001 - the worker died while answering
                deadline = time.monotonic() + 60
                while not _gone(pid):
                    assert time.monotonic() < deadline, f"worker {address} failed to answer but PID {pid} lives"
                    time.sleep(0.1)
                return address, pid
        time.sleep(0.05)


def _wait_for_replacement(cluster, client, nanny: int, n_workers: int) -> str:
    """Wait until the scheduler has ``n_workers`` again, one of them a new process of
    ``nanny``; that worker's address."""
    deadline = time.monotonic() + 120
    while True:
        pids = _worker_pids(client)
        children = [a for a, pid in pids.items() if _parent(pid) == nanny]
        if len(pids) == n_workers and children:
            cluster.remember_tree()
            return children[0]
        assert time.monotonic() < deadline, cluster.logs()
        time.sleep(0.1)


def _kill_in_turn(cluster, client, proc: subprocess.Popen, kills: int) -> list[dict]:
    """SIGKILL ``kills`` of the workers there are now, one at a time, each while it runs a
    task of ``proc``'s run; then wait until each one's nanny has started a new worker.

    The next kill does not wait for the previous replacement: the survivor is busy at once
    with the task the killed worker was running, whereas a run that has finished its last
    task while a replacement started (a second or more under load) leaves nothing to kill
    mid-run. Every original worker dies mid-run all the same, and the run ends on
    replacement workers only."""
    originals = _worker_pids(client)
    nannies = {a: _parent(pid) for a, pid in originals.items()}
    assert set(nannies.values()) <= {p.pid for p in cluster.procs}, "each worker is a child of a nanny started here"
    killed, started = [], time.monotonic()
    while len(killed) < kills:
        left = {a: pid for a, pid in originals.items() if a not in {k["address"] for k in killed}}
        address, pid = _kill_when_busy(client, proc, left)
        cluster.remember_tree()
        killed.append({"address": address, "pid": pid, "nanny": nannies[address], "at": time.monotonic() - started})
    for kill in killed:
        kill["replacement"] = _wait_for_replacement(cluster, client, kill["nanny"], len(originals))
        print(f"worker {kill['pid']} killed {kill['at']:.1f} s into the run; "
              f"replaced {time.monotonic() - started:.1f} s into it")
    return killed


def _check_kills(cluster, client, killed: list[dict], before: dict[str, int]) -> dict[str, int]:
    """Each kill as the operating system, the nanny and the scheduler saw it; the workers now."""
    log = cluster.logs_all()
    events = _worker_events(client)
    removed = {e["worker"]: e for e in events if e.get("action") == "remove-worker"}
    added = {e["worker"] for e in events if e.get("action") == "add-worker"}
    after = _worker_pids(client)
    for kill in killed:
        assert _gone(kill["pid"]) and f"Worker process {kill['pid']} was killed by signal 9" in log
        event = removed[kill["address"]]
        assert event["expected"] is False
        assert any(key.startswith("kompot-") for key in event["processing"]), event  # mid-run
        new = kill["replacement"]
        assert new in added and new not in before and after[new] not in before.values()
        assert _parent(after[new]) == kill["nanny"]  # the same nanny started it
    return after


def _run_on_scheduler_file(cluster, atlas, where) -> subprocess.Popen:
    """The run in the background, its output in files (nobody reads a pipe meanwhile)."""
    with open(where / "stdout", "w") as stdout, open(where / "stderr", "w") as stderr:
        return subprocess.Popen([*_command(), "run", str(atlas), *RUN, "--scheduler-file",
                                 str(cluster.scheduler_file), "-o", "out.zarr"], cwd=where, stdout=stdout, stderr=stderr)


@pytest.mark.parametrize("every", [False, True], ids=["one-worker-killed", "every-worker-killed-in-turn"])
def test_run_survives_killed_workers_via_scheduler_file(cluster, atlas, reference, tmp_path, every):
    client = cluster.client(2)
    try:
        before = _worker_pids(client)
        proc = _run_on_scheduler_file(cluster, atlas, tmp_path)
        try:
            killed = _kill_in_turn(cluster, client, proc, kills=len(before) if every else 1)
            proc.wait(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        after = _check_kills(cluster, client, killed, before)
    finally:
        client.close()
    assert len({k["pid"] for k in killed}) == len(killed) == (2 if every else 1)
    if every:  # every original worker died; all workers now are new processes
        assert not set(after) & set(before) and not set(after.values()) & set(before.values())
    else:  # exactly one died: the other is the same process as before
        (survivor,) = set(before) - {killed[0]["address"]}
        assert set(after) == {survivor, killed[0]["replacement"]} and after[survivor] == before[survivor]
    stdout, stderr = (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()
    assert proc.returncode == 0, stderr[-3000:]
    assert json.loads(stdout)["scheduler"] == cluster.address
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

        for command, args in (("run", ["-o", "out.zarr"]), ("plan", [])):
            proc = _kompot([atlas, *RUN, "--scheduler", address, *args], tmp_path, command=command)
            assert proc.returncode == 1, proc.stderr[-3000:]
            _one_error_line(proc.stderr, worker)
            assert proc.stdout == "" and not (tmp_path / "out.zarr").exists()
    finally:
        cluster.stop()


def _one_error_line(stderr: str, worker: str) -> None:
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, stderr
    assert errors[0].startswith("kompot-dask: error: kompot_dask workers differ from this client: ")
    assert f"0.0.0-fake on {worker}" in errors[0]


# Where a task ran (by value: the workers cannot import this module).
_where = lambda i: (time.sleep(0.05), __import__("distributed").get_worker().address)[1]  # noqa: E731


def test_worker_joining_later_with_another_version_is_refused(tmp_path, caplog):
    """A worker of another version that joins after the client connected (and passed the
    check) leaves by itself with the same one line, nanny and all, before running a task."""
    from kompot_dask import __version__
    from kompot_dask.execution import prepare_client
    from kompot_dask.execution.versions import VERSION_TOPIC

    cluster = Cluster(tmp_path)
    try:
        cluster.start_scheduler()
        cluster.start_worker()
        client = cluster.client(1)
        try:
            prepare_client(client)  # what `kompot-dask run` does: the check passes, one good worker
            (good,) = client.scheduler_info()["workers"]
            tasks = client.map(_where, range(5000), pure=False)  # a queue of work while the others join
            fake = {"KOMPOT_DASK_FAKE_VERSION": "0.0.0-fake"}
            late = [cluster.start_worker(env=fake), cluster.start_worker(nanny=False, env=fake)]
            for proc in late:  # they leave by themselves; a nanny does not start its worker again
                proc.wait(120)
            cluster.remember_tree()
            events = _worker_events(client)
            joined = {e["worker"] for e in events if e["action"] == "add-worker"} - {good}
            assert len(joined) == 2  # both were in the cluster for a moment and were sent tasks (queued
            # work goes to a new worker at once), which went back when they left cleanly (retired):
            left = [e for e in events if e["action"] == "remove-worker" and e["worker"] in joined]
            assert len(left) == 2 and all(e["expected"] and e["processing"] for e in left), left
            refusals = _refusals(client, VERSION_TOPIC)
            assert sorted(refusals) == sorted(joined)
            for address, message in refusals.items():
                assert "\n" not in message and message.startswith("kompot_dask workers differ from this client: ")
                assert message.count(" here, ") == 1 and "install the same versions everywhere" in message
                assert f"kompot_dask {__version__} here, 0.0.0-fake on {address}" in message
                assert message in cluster.logs_all()  # the worker's own log
            assert list(client.scheduler_info()["workers"]) == [good]
            done = [t for t in tasks if t.done()]
            assert 0 < len(done) < len(tasks)  # work was waiting while they were in the cluster
            assert set(client.gather(done)) == {good}  # and none of it ran on them
            client.cancel(tasks)
            deadline = time.monotonic() + 30
            while len(_logged(caplog)) < 2:  # and this client said so (an error log)
                assert time.monotonic() < deadline, caplog.text
                time.sleep(0.1)
            assert sorted(_logged(caplog)) == sorted(refusals.values())
        finally:
            client.close()
    finally:
        cluster.stop()


def _refusals(client, topic: str) -> dict[str, str]:
    return {msg["worker"]: msg["message"] for _, msg in client.get_events(topic)}


def _logged(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "kompot_dask.execution.cluster" and r.levelname == "ERROR"]


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
