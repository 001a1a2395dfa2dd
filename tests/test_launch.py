"""iar2.launch: the three launch routes, SLURM node lists, arguments passed through intact, sbatch resources."""
import os
import shlex
import stat
import subprocess
import sys
from types import SimpleNamespace

import pytest

import iar2.launch as launch
from iar2.launch import build_command, parse_nodelist, slurm_resources

ARGS = ["vq", "train", "--config", "a dir/with spaces.yaml", "--note", "it's \"quoted\"", ""]


@pytest.fixture
def console_script(tmp_path, monkeypatch):
    """A pip-style console script `iar2tool` (python shebang) and a shell tool `shtool`, alone on PATH."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, body in (("iar2tool", f"#!{sys.executable}\nprint('hi')\n"), ("shtool", "#!/bin/sh\necho hi\n")):
        p = bindir / name
        p.write_text(body)
        p.chmod(p.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return bindir


@pytest.fixture
def no_scontrol(monkeypatch):
    def missing(*a, **k):
        raise FileNotFoundError("scontrol")
    monkeypatch.setattr(launch.subprocess, "run", missing)


@pytest.mark.parametrize("gpus", [0, 1])
def test_one_process_runs_the_command_as_is(gpus):
    cmd = ["iar2", *ARGS]
    assert build_command(cmd, gpus, 1, {}) == cmd


def test_several_gpus_on_one_node_run_under_torchrun_with_the_console_script_resolved(console_script):
    cmd = build_command(["iar2tool", *ARGS], 4, 1, {})
    assert cmd == ["torchrun", "--standalone", "--nproc-per-node=4", str(console_script / "iar2tool"), *ARGS]


def test_python_module_and_non_python_commands_under_torchrun(console_script, tmp_path):
    assert build_command([sys.executable, "-m", "iar2", *ARGS], 2, 1, {})[3:] == ["-m", "iar2", *ARGS]
    script = tmp_path / "train.py"
    script.write_text("")
    assert build_command(["python3", str(script), "x"], 2, 1, {})[3:] == [str(script), "x"]
    # a shell script cannot be started by a Python interpreter: torchrun executes it directly
    assert build_command(["shtool", "a b"], 2, 1, {})[3:] == ["--no-python", str(console_script / "shtool"), "a b"]
    with pytest.raises(ValueError, match="script or `-m module`"):
        build_command(["python", "-c", "print(1)"], 2, 1, {})
    with pytest.raises(ValueError, match="not found"):
        build_command(["no-such-tool-xyz"], 2, 1, {})


def test_several_nodes_run_one_torchrun_per_node_under_srun(console_script, no_scontrol):
    env = {"SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456", "SLURM_CPUS_PER_TASK": "64"}
    cmd = build_command(["iar2tool", *ARGS], 8, 2, env)
    assert cmd == ["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--cpus-per-task=64",
                   "torchrun", "--nnodes=2", "--nproc-per-node=8", "--rdzv-backend=c10d",
                   f"--rdzv-endpoint=gpu07:{launch.PORT_BASE + 123456 % launch.PORT_SPAN}", "--rdzv-id=123456",
                   str(console_script / "iar2tool"), *ARGS]
    # an explicit MASTER_PORT wins; one process per node when the nodes have no GPUs
    cmd = build_command(["iar2tool"], 0, 3, {**env, "MASTER_PORT": "29400"})
    assert "--rdzv-endpoint=gpu07:29400" in cmd and "--nproc-per-node=1" in cmd and "--nnodes=3" in cmd
    # --srun forces this route on one node (how the SLURM test drives it)
    assert build_command(["iar2tool"], 2, 1, env, force_srun=True)[:3] == ["srun", "--nodes=1", "--ntasks-per-node=1"]


def test_several_nodes_need_a_slurm_allocation():
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST"):
        build_command(["iar2", "x"], 8, 2, {})


def test_allocation_is_asked_of_scontrol_when_the_job_step_stripped_the_environment(console_script, monkeypatch):
    """The plugin's job step keeps SLURM_JOB_ID only; node list and CPUs per task then come from scontrol."""
    calls = []
    job = ("JobId=77 JobName=x UserId=u(0) Comment=rule_ar_train ReqNodeList=(null) ExcNodeList=(null) "
           "NodeList=gpu[03-04] BatchHost=gpu03 NumNodes=2 NumCPUs=128 NumTasks=2 CPUs/Task=64 ReqB:S:C:T=0:0:*:*")

    def fake_run(argv, **kw):
        calls.append(argv[:3])
        out = job if argv[:3] == ["scontrol", "show", "job"] else "gpu03\ngpu04\n"
        return SimpleNamespace(returncode=0, stdout=out)

    monkeypatch.setattr(launch.subprocess, "run", fake_run)
    cmd = build_command(["iar2tool"], 8, 2, {"SLURM_JOB_ID": "77"})
    assert calls == [["scontrol", "show", "job"], ["scontrol", "show", "hostnames"]]
    assert "--cpus-per-task=64" in cmd and f"--rdzv-endpoint=gpu03:{launch.PORT_BASE + 77}" in cmd
    assert "--rdzv-id=77" in cmd


def test_first_host_comes_from_scontrol(monkeypatch):
    seen = []

    def fake_run(argv, **kw):
        seen.append(argv)
        return SimpleNamespace(returncode=0, stdout="nodeB\nnodeA\n")

    monkeypatch.setattr(launch.subprocess, "run", fake_run)
    assert launch.first_host("node[A-B]") == "nodeB"
    assert seen == [["scontrol", "show", "hostnames", "node[A-B]"]]


@pytest.mark.parametrize("nodelist, hosts", [
    ("localhost", ["localhost"]),
    ("gpu[01-03,07],login1", ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]),
    ("n[9-11]", ["n9", "n10", "n11"]),
    ("a[1-2]b[3-4]", ["a1b3", "a1b4", "a2b3", "a2b4"]),
    ("x-1,y[002-003]-ib", ["x-1", "y002-ib", "y003-ib"]),
])
def test_nodelist_parsing(nodelist, hosts, no_scontrol):
    assert parse_nodelist(nodelist) == hosts
    assert launch.first_host(nodelist) == hosts[0]


def test_cli_dry_run_prints_a_command_the_shell_reads_back_unchanged(console_script):
    r = subprocess.run([sys.executable, "-m", "iar2.launch", "--gpus", "2", "--dry-run", "--", "iar2tool", *ARGS],
                       capture_output=True, text=True, env=os.environ)
    assert r.returncode == 0, r.stderr
    assert shlex.split(r.stdout) == ["torchrun", "--standalone", "--nproc-per-node=2",
                                     str(console_script / "iar2tool"), *ARGS]


def test_cli_runs_the_command_and_keeps_its_exit_status(tmp_path):
    out = tmp_path / "args.txt"
    code = "import sys; open(sys.argv[1], 'w').write(repr(sys.argv[2:])); sys.exit(3)"
    r = subprocess.run([sys.executable, "-m", "iar2.launch", "--", sys.executable, "-c", code, str(out), *ARGS],
                       capture_output=True, text=True)
    assert r.returncode == 3 and "as is (one process)" in r.stderr
    assert out.read_text() == repr(ARGS)
    r = subprocess.run([sys.executable, "-m", "iar2.launch", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--gpus" in r.stdout and "--nodes" in r.stdout and "--dry-run" in r.stdout
    r = subprocess.run([sys.executable, "-m", "iar2.launch", "--gpus", "2"], capture_output=True, text=True)
    assert r.returncode == 2 and "no command" in r.stderr


class _Resources(dict):
    __getattr__ = dict.__getitem__


def _sbatch(resources) -> str:
    """The sbatch line snakemake-executor-plugin-slurm builds for a job with these resources."""
    submit_string = pytest.importorskip("snakemake_executor_plugin_slurm.submit_string")
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    job = SimpleNamespace(resources=_Resources(resources), threads=1, name="ar_train")
    params = dict(run_uuid="u", slurm_logfile="log", comment_str="c", account="", partition="", workdir="/w")
    return submit_string.get_submit_command(job, params) + set_gres_string(job)


def test_slurm_resources_give_the_job_shape_the_launcher_expects():
    one = _sbatch(slurm_resources(gpus=8, cpus_per_task=64, mem_mb=200000, runtime=600, gpu_model="a100"))
    assert "--gpus=a100:8" in one and "--cpus-per-task=64" in one and "--mem 200000" in one and "-t 600" in one
    assert "--nodes" not in one and "--ntasks" not in one
    multi = _sbatch(slurm_resources(gpus=8, nodes=4, cpus_per_task=64, gpu_model="h100"))
    # one task (torchrun) per node, 8 GPUs per node (--gpus counts the job), no per-GPU task geometry
    assert "--nodes=4" in multi and "--ntasks=4" in multi and multi.endswith("--gpus=h100:32")
    assert "--ntasks-per-gpu" not in multi and "--gres" not in multi
    cpu = _sbatch(slurm_resources(nodes=2))
    assert "--nodes=2" in cpu and "--ntasks=2" in cpu and "--gpus" not in cpu
    assert _sbatch(slurm_resources()).count("--ntasks=1") == 1
    # the plugin's job step skips its `srun -n1` wrapper when the `mpi` key is present at all: one node never has it
    assert "mpi" not in slurm_resources(gpus=8) and slurm_resources(nodes=2)["mpi"]
    assert slurm_resources() == {}
