"""The SLURM profile on a real one-node SLURM cluster brought up on localhost (munge + slurmctld + slurmd).

`snakemake --profile slurm <target> --config scale=ci` runs in a copy of the repository exactly as a user runs it on
a cluster; the only additions are `--slurm-status-command squeue` (this cluster keeps no accounting database, so
`sacct` cannot answer) and a 1 s first status check (the default 40 s would make the test slow). A second test runs
one job through the plugin's `mpi` route: iar2.launch's srun + torchrun path with two torch ranks.

Needs root (daemons, /etc/slurm/slurm.conf) and Debian's slurm-wlm + munge; skips with the reason otherwise.
The cluster's config must live in /etc/slurm: the plugin's job step drops SLURM_CONF from the job's environment.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CONF = Path("/etc/slurm/slurm.conf")
MARK = "# one-node test cluster written by iar2-repro tests/test_slurm.py"
SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
TOOLS = ("munged", "munge", "unmunge", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol", "scancel",
         "srun")
FAST_STATUS = ["--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "1",
               "--slurm-keep-successful-logs"]

pytestmark = pytest.mark.slow


def _which(tool):
    return shutil.which(tool, path=SBIN)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _munge_works() -> bool:
    try:
        cred = subprocess.run([_which("munge"), "-n"], capture_output=True, timeout=10)
        return cred.returncode == 0 and subprocess.run([_which("unmunge")], input=cred.stdout, capture_output=True,
                                                       timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _clean_env(**extra) -> dict:
    """The caller's environment without SLURM/MLflow settings that would point jobs elsewhere."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "MLFLOW_"))}
    env.update(extra)
    return env


def _slurm_conf(tmp: Path, cpus: int, mem_mb: int) -> str:
    return f"""{MARK}
ClusterName=iar2test
SlurmctldHost=localhost
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# squeue must still see a finished job when Snakemake next asks (the plugin wants >= 3x its first check delay)
MinJobAge=600
ReturnToService=2
StateSaveLocation={tmp}/state
SlurmdSpoolDir={tmp}/spool
SlurmctldPidFile={tmp}/slurmctld.pid
SlurmdPidFile={tmp}/slurmd.pid
SlurmctldLogFile={tmp}/slurmctld.log
SlurmdLogFile={tmp}/slurmd.log
NodeName=localhost CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName=test Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """A one-node SLURM cluster on localhost for this module; every daemon it starts is stopped afterwards."""
    if os.geteuid() != 0:
        pytest.skip("a local SLURM cluster needs root (munged, slurmctld, slurmd, /etc/slurm/slurm.conf)")
    missing = [t for t in TOOLS if _which(t) is None]
    if missing:
        pytest.skip(f"SLURM/munge tools not installed: {', '.join(missing)} (Debian: apt-get install slurm-wlm munge)")
    if CONF.exists() and MARK not in CONF.read_text(errors="replace"):
        pytest.skip(f"{CONF} already exists and is not this test's: not touching a real cluster's configuration")
    tmp = tmp_path_factory.mktemp("slurm")
    for d in ("state", "spool"):
        (tmp / d).mkdir()
    procs: list[subprocess.Popen] = []
    logs = []
    try:
        if not _munge_works():
            key = Path("/etc/munge/munge.key")
            if not key.exists():
                pytest.skip(f"{key} is missing (the munge package creates it)")
            Path("/run/munge").mkdir(parents=True, exist_ok=True)
            shutil.chown("/run/munge", "munge", "munge")
            log = open(tmp / "munged.log", "w")
            logs.append(log)
            procs.append(subprocess.Popen([_which("munged"), "--foreground"], user="munge", stdout=log,
                                          stderr=subprocess.STDOUT))
            for _ in range(50):
                if _munge_works():
                    break
                time.sleep(0.2)
            else:
                pytest.skip(f"munged did not come up: {(tmp / 'munged.log').read_text()[-500:]}")
        cpus = os.cpu_count() or 1
        mem_mb = int(int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) / 1024 * 0.8)
        CONF.parent.mkdir(parents=True, exist_ok=True)
        CONF.write_text(_slurm_conf(tmp, cpus, mem_mb))
        env = _clean_env()
        for daemon in (["slurmctld", "-D"], ["slurmd", "-D", "-N", "localhost"]):
            log = open(tmp / f"{daemon[0]}.out", "w")
            logs.append(log)
            procs.append(subprocess.Popen([_which(daemon[0]), *daemon[1:]], stdout=log, stderr=subprocess.STDOUT,
                                          env=env))
            time.sleep(1)
        state = ""
        for _ in range(60):
            r = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, env=env)
            state = r.stdout.strip()
            if state == "idle":
                break
            time.sleep(1)
        else:
            raise RuntimeError(f"the node never became idle (sinfo: {state!r} {r.stderr.strip()!r}); slurmctld log: "
                               f"{(tmp / 'slurmctld.log').read_text(errors='replace')[-1500:]}")
        yield {"tmp": tmp, "env": env, "cpus": cpus, "mem_mb": mem_mb}
    finally:
        subprocess.run(["scancel", "--user", "root"], capture_output=True, env=_clean_env())
        for proc in reversed(procs):
            _stop(proc)
        for log in logs:
            log.close()
        if CONF.exists() and MARK in CONF.read_text(errors="replace"):
            CONF.unlink()


def _copy_repo(dest: Path) -> Path:
    """The repository's files as a checkout has them (tracked + untracked, not ignored): no results, no data."""
    r = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                       capture_output=True, text=True)
    if r.returncode != 0:
        shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(".git", "results", "data", ".snakemake", "mlruns",
                                                                  "__pycache__", "*.egg-info", "*.db"))
        return dest
    for rel in filter(None, r.stdout.split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def _snakemake(args, cwd, env, timeout=900):
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=timeout)
    return r, r.stdout + r.stderr, time.monotonic() - t0


def _squeue_all(env) -> dict[str, tuple[str, str]]:
    """job id -> (state, comment) of every job the controller still remembers (MinJobAge keeps finished ones)."""
    r = subprocess.run(["squeue", "-h", "--states=all", "-o", "%i|%T|%k"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    return {i: (state, comment) for i, state, comment in (line.split("|", 2) for line in r.stdout.splitlines())}


SUBMITTED = re.compile(r"Job \d+ has been submitted with SLURM jobid (\d+) \(log: (\S+)\)")


def test_profile_settings_are_those_a_cluster_run_needs():
    prof = yaml.safe_load((ROOT / "slurm" / "config.yaml").read_text())
    assert prof["executor"] == "slurm" and prof["retries"] == 2 and prof["rerun-incomplete"] is True
    assert prof["config"] == ["scale=paper"] and prof["latency-wait"] >= 30 and prof["jobs"] >= 1
    site = prof["default-resources"]
    assert {"slurm_account", "slurm_partition"} <= set(site)
    # `tasks` here would reach every GPU rule (the plugin turns it into --ntasks-per-gpu); `mpi` would stop the
    # plugin's srun wrapper for every rule
    assert not {"tasks", "mpi", "gpu", "nodes"} & set(site)


def test_ci_target_runs_through_the_slurm_profile_and_a_rerun_does_nothing(slurm_cluster, mpi_job, tmp_path):
    # (mpi_job: started first, it runs its tiny job while this test lists targets and builds its DAG)
    repo = _copy_repo(tmp_path / "repo")
    env = _clean_env(PYTHONPATH=str(repo))  # jobs import the copy's iar2
    targets = _snakemake(["--list-target-rules", "--config", "scale=ci"], repo, env, timeout=300)[1].split()
    target = "fig3" if "fig3" in targets else "tokenizers"

    r, log, first_s = _snakemake(["--profile", "slurm", target, "--config", "scale=ci", *FAST_STATUS], repo, env)
    print(f"{target} through SLURM: {first_s:.0f} s")
    assert r.returncode == 0, log[-4000:]
    submitted = dict(SUBMITTED.findall(log))
    # every job went through sbatch, ran on the node and completed there (no retry was needed)
    queue = _squeue_all(slurm_cluster["env"])
    assert submitted and set(submitted) <= set(queue)
    assert all(queue[i][0] == "COMPLETED" for i in submitted), {i: queue[i] for i in submitted}
    for job_id, slurm_log in submitted.items():  # each job's output, written by slurmd, under .snakemake/slurm_logs
        assert Path(slurm_log).name == f"{job_id}.log" and "slurm_logs" in Path(slurm_log).parts
        assert Path(slurm_log).is_file() and "Finished jobid" in Path(slurm_log).read_text(errors="replace")
    rules = {re.sub(r"^rule_|_wildcards_.*$", "", queue[i][1]) for i in submitted}
    assert {"refnet", "vq_train"} <= rules, rules
    # --config scale=ci on the command line replaced the profile's scale=paper
    assert (repo / "results" / "ci").is_dir() and not (repo / "results" / "paper").exists()

    summary = _snakemake(["--summary", target, "--config", "scale=ci"], repo, env, timeout=300)[0]
    rows = [line.split("\t") for line in summary.stdout.splitlines()[1:] if "\t" in line]
    assert rows and all(row[4] == "ok" and (repo / row[0]).exists() for row in rows), summary.stdout[-3000:]
    assert rules <= {row[2] for row in rows}
    trained = [p for p in (repo / "results" / "ci" / "tokenizers").glob("*/vq.safetensors")]
    assert trained and all(p.stat().st_size > 1000 for p in trained)

    again, log2, again_s = _snakemake(["--profile", "slurm", target, "--config", "scale=ci", *FAST_STATUS], repo, env)
    print(f"rerun: {again_s:.0f} s")
    assert again.returncode == 0 and "Nothing to be done" in log2 and not SUBMITTED.search(log2), log2[-3000:]


MPI_SNAKEFILE = """
# One job through the SLURM plugin's `mpi` route: the plugin submits --nodes=1 --ntasks=2 and runs the shell command
# without `srun -n1`; iar2.launch --srun then starts one torchrun per node with srun, and torchrun two ranks.
rule dist_check:
    output: directory("dist")
    resources: mpi="srun", nodes=1, tasks=2, cpus_per_task=1, mem_mb=1000, runtime=10
    shell: "python -m iar2.launch --srun --nodes 1 --gpus 2 -- python {script} --out {{output}} --device cpu"
"""


@pytest.fixture(scope="module")
def mpi_job(slurm_cluster, tmp_path_factory):
    """The tiny `mpi`-route workflow, started in the background so it overlaps the long run of the test above."""
    work = tmp_path_factory.mktemp("mpi")
    (work / "Snakefile").write_text(MPI_SNAKEFILE.format(script=ROOT / "workflow" / "scripts" / "dist_check.py"))
    log = open(work / "snakemake.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "snakemake", "--profile", str(ROOT / "slurm"), *FAST_STATUS],
                            cwd=work, env=_clean_env(PYTHONPATH=str(ROOT)), stdout=log, stderr=subprocess.STDOUT)
    yield {"proc": proc, "work": work, "log": log, "t0": time.monotonic()}
    _stop(proc)
    log.close()


def test_mpi_route_starts_torch_ranks_in_an_srun_step(slurm_cluster, mpi_job):
    rc = mpi_job["proc"].wait(timeout=300)
    print(f"mpi route: {time.monotonic() - mpi_job['t0']:.0f} s")
    mpi_job["log"].seek(0)
    log, work = mpi_job["log"].read(), mpi_job["work"]
    assert rc == 0, log[-4000:]
    (job_id, slurm_log), = SUBMITTED.findall(log)
    # the plugin's job step kept only SLURM_JOB_ID; the launcher found the node list with scontrol and used srun
    launched = Path(slurm_log).read_text(errors="replace")
    assert f"--rdzv-id={job_id}" in launched and "iar2.launch: srun + torchrun on 1 node(s)" in launched
    ranks = [json.loads((work / "dist" / f"rank{i}.json").read_text()) for i in range(2)]
    assert [x["rank"] for x in ranks] == [0, 1] and {x["world_size"] for x in ranks} == {2}
    assert all(x["rank_sum"] == 1.0 for x in ranks)  # the all-reduce crossed both processes
    # both ranks ran in a step (srun) of the Snakemake job and met at one rendezvous
    assert {x["slurm_job_id"] for x in ranks} == {job_id} and all(x["slurm_step_id"] is not None for x in ranks)
    assert len({x["master"] for x in ranks}) == 1 and ranks[0]["master"].split(":")[0]
    assert _squeue_all(slurm_cluster["env"])[job_id][0] == "COMPLETED"
