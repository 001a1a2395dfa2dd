"""`python -m iar2.launch --gpus G --nodes N -- CMD...`: run one pipeline command on every GPU a job holds.

The Snakemake rules wrap their training commands in this launcher so one rule works at every scale:

  N == 1, G <= 1   CMD runs as is (one process; iar2 sees no torchrun environment and stays a world of one).
  N == 1, G > 1    torchrun --standalone --nproc-per-node=G CMD: G ranks on this node.
  N > 1            srun --nodes=N --ntasks-per-node=1 torchrun --nnodes=N --nproc-per-node=G
                   --rdzv-backend=c10d --rdzv-endpoint=<first node>:<port> --rdzv-id=$SLURM_JOB_ID CMD:
                   one torchrun per node of the SLURM allocation, meeting at a rendezvous on the first node.

iar2's trainers read torchrun's RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (iar2/distributed.py).
torchrun starts a Python script, so a console script such as `iar2` is resolved to its file on PATH,
`python -m pkg ...` becomes torchrun's `-m pkg ...`, and a non-Python executable runs with --no-python.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence

from iar2.cli import nonneg_int, positive_int

# torchrun's rendezvous port when MASTER_PORT is not given: derived from the job id so two multi-node jobs that
# share a first node do not collide; kept below Linux's ephemeral range (32768-60999), where clients bind.
PORT_BASE, PORT_SPAN = 15000, 15000
_PYTHON = re.compile(r"python(\d+(\.\d+)?)?$")


# ----------------------------------------------------------------------------- SLURM node lists

def _expand_range(body: str) -> list[str]:
    """'01-03,07' -> ['01', '02', '03', '07'] (zero padding kept, as SLURM does)."""
    out = []
    for part in body.split(","):
        if "-" in part:
            lo, hi = part.split("-", 1)
            out.extend(str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1))
        else:
            out.append(part)
    return out


def _split_top(nodelist: str) -> list[str]:
    """Split a node list at the commas that are outside brackets."""
    parts, depth, cur = [], 0, ""
    for ch in nodelist:
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        depth += {"[": 1, "]": -1}.get(ch, 0)
        cur += ch
    parts.append(cur)
    return [p for p in parts if p]


def parse_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM host list ('gpu[01-02,07],login1', 'a[1-2]b[3-4]') into host names, in SLURM's order.

    The fallback for machines without a usable `scontrol`."""
    hosts: list[str] = []
    for item in _split_top(nodelist.strip()):
        names = [""]
        for text, body in re.findall(r"([^\[\]]*)(?:\[([^\]]*)\])?", item):
            names = [n + text for n in names]
            if body:
                names = [n + x for n in names for x in _expand_range(body)]
        hosts.extend(names)
    return hosts


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: `scontrol show hostnames` as SLURM itself expands it, else our parser."""
    try:
        r = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=10)
        if r.returncode == 0 and r.stdout.split():
            return r.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):  # no scontrol, or one without a slurm.conf (it retries for 60 s)
        pass
    hosts = parse_nodelist(nodelist)
    if not hosts:
        raise ValueError(f"empty SLURM node list {nodelist!r}")
    return hosts[0]


def allocation(env: Mapping[str, str]) -> tuple[str, str | None]:
    """(node list, CPUs per task) of the SLURM job this process runs in.

    From the environment when sbatch's variables are there; else from `scontrol show job $SLURM_JOB_ID`: the SLURM
    executor plugin's job step strips every SLURM_* variable but the job id before it runs an `mpi` job's command."""
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    cpus = env.get("SLURM_CPUS_PER_TASK")
    if nodelist or not env.get("SLURM_JOB_ID"):
        return nodelist or "", cpus
    try:
        r = subprocess.run(["scontrol", "show", "job", "-o", env["SLURM_JOB_ID"]], capture_output=True, text=True,
                           timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "", cpus
    found = re.search(r"(?:^|\s)NodeList=(\S+)", r.stdout) if r.returncode == 0 else None
    per_task = re.search(r"(?:^|\s)CPUs/Task=(\d+)", r.stdout) if r.returncode == 0 else None
    return (found.group(1) if found and found.group(1) != "(null)" else "",
            cpus or (per_task.group(1) if per_task else None))


def rendezvous_port(env: Mapping[str, str]) -> int:
    if env.get("MASTER_PORT"):
        return int(env["MASTER_PORT"])
    return PORT_BASE + int(env.get("SLURM_JOB_ID", "0") or 0) % PORT_SPAN


# ----------------------------------------------------------------------------- the command

def _is_python_script(path: str) -> bool:
    if path.endswith(".py"):
        return True
    try:
        with open(path, "rb") as f:
            first = f.readline(200)
    except OSError:
        return False
    return first.startswith(b"#!") and b"python" in first


def torchrun_target(cmd: Sequence[str]) -> list[str]:
    """CMD as torchrun's trailing arguments: [script, args...], ['-m', module, args...] or ['--no-python', exe, ...]."""
    if not cmd:
        raise ValueError("no command given")
    if _PYTHON.fullmatch(os.path.basename(cmd[0])):
        rest = list(cmd[1:])
        if len(rest) >= 2 and rest[0] == "-m":
            return ["-m", *rest[1:]]
        if rest and os.path.isfile(rest[0]):
            return rest
        raise ValueError(f"torchrun starts a script or `-m module`, not {shlex.join(cmd)!r}")
    path = cmd[0] if os.sep in cmd[0] else shutil.which(cmd[0])
    if path is None or not os.path.isfile(path):
        raise ValueError(f"command {cmd[0]!r} not found on PATH")
    if _is_python_script(path):
        return [path, *cmd[1:]]
    return ["--no-python", path, *cmd[1:]]


def build_command(cmd: Sequence[str], gpus: int, nodes: int, env: Mapping[str, str] | None = None,
                  *, force_srun: bool = False) -> list[str]:
    """The argv that runs CMD on `nodes` nodes with `gpus` processes (GPUs) per node.

    force_srun: take the multi-node route (srun + c10d rendezvous) even for one node."""
    env = os.environ if env is None else env
    cmd = list(cmd)
    if gpus < 0 or nodes < 1:
        raise ValueError(f"--gpus must be >= 0 and --nodes >= 1 (got {gpus}, {nodes})")
    if nodes == 1 and not force_srun:
        if gpus <= 1:
            if not cmd:
                raise ValueError("no command given")
            return cmd
        return ["torchrun", "--standalone", f"--nproc-per-node={gpus}", *torchrun_target(cmd)]
    nodelist, cpus = allocation(env)
    if not nodelist:
        raise ValueError(f"--nodes {nodes} runs inside a SLURM allocation, but neither SLURM_JOB_NODELIST nor "
                         "`scontrol show job $SLURM_JOB_ID` names its nodes")
    host = first_host(nodelist)
    srun = ["srun", f"--nodes={nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    if cpus:
        # srun (22.05 and later) no longer passes the job's --cpus-per-task on to its steps; torchrun and its
        # data loaders need all of them
        srun.append(f"--cpus-per-task={cpus}")
    return [*srun, "torchrun", f"--nnodes={nodes}", f"--nproc-per-node={max(gpus, 1)}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={host}:{rendezvous_port(env)}",
            f"--rdzv-id={env.get('SLURM_JOB_ID', 'iar2')}", *torchrun_target(cmd)]


def slurm_resources(gpus: int = 0, nodes: int = 1, cpus_per_task: int | None = None, mem_mb: int | None = None,
                    runtime: int | None = None, gpu_model: str | None = None) -> dict:
    """Snakemake `resources:` for snakemake-executor-plugin-slurm (2.x) that give a job the shape build_command
    expects; `gpus` counts per node. Keys that do not apply are left out (a resource callable returning None drops
    its key for that job), because the plugin reads some keys by their mere presence:

    One node: `gpu` (sbatch --gpus=G); the plugin runs the job's command in `srun -n1` and torchrun inside it
    starts the ranks. Several nodes: --nodes=N --ntasks=N (one torchrun per node) and the `mpi` key, which makes
    the plugin run the command without `srun -n1`, because build_command calls srun itself. `gpu` is then the
    job's total (--gpus counts the whole job: G per node on G-GPU nodes), and tasks_per_gpu=0 keeps the plugin from
    turning `tasks` into --ntasks-per-gpu. The plugin rejects `mpi` with one task, so one node never gets it."""
    res: dict = {}
    if cpus_per_task:
        res["cpus_per_task"] = int(cpus_per_task)
    if mem_mb:
        res["mem_mb"] = int(mem_mb)
    if runtime:
        res["runtime"] = int(runtime)
    if gpus > 0:
        res["gpu"] = int(gpus) * int(nodes)
        if gpu_model:
            res["gpu_model"] = gpu_model
    if nodes > 1:
        res.update(nodes=int(nodes), tasks=int(nodes), mpi="srun")
        if gpus > 0:
            res["tasks_per_gpu"] = 0
    return res


def route(gpus: int, nodes: int, force_srun: bool = False) -> str:
    if nodes > 1 or force_srun:
        return f"srun + torchrun on {nodes} node(s) x {max(gpus, 1)} process(es)"
    return "as is (one process)" if gpus <= 1 else f"torchrun --standalone, {gpus} processes"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m iar2.launch",
        description="Run CMD with one torch.distributed rank per GPU: as is (1 GPU or CPU), under torchrun "
                    "(several GPUs on one node) or under srun + torchrun (several nodes of a SLURM job).",
        epilog="example: python -m iar2.launch --gpus 8 --nodes 2 -- iar2 ar train --config c.yaml --out runs/x")
    p.add_argument("--gpus", type=nonneg_int, default=0, help="GPUs (= processes) per node; 0 or 1: one process")
    p.add_argument("--nodes", type=positive_int, default=1, help="nodes of the SLURM allocation to use (default 1)")
    p.add_argument("--srun", action="store_true",
                   help="use the multi-node route (srun + c10d rendezvous) even on one node")
    p.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- then the command and its arguments")
    args = p.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        p.error("no command given (put it after --)")
    try:
        command = build_command(cmd, args.gpus, args.nodes, force_srun=args.srun)
    except ValueError as e:
        p.error(str(e))
    if args.dry_run:
        print(shlex.join(command))
        return 0
    print(f"iar2.launch: {route(args.gpus, args.nodes, args.srun)}: {shlex.join(command)}", file=sys.stderr,
          flush=True)
    try:
        os.execvp(command[0], command)  # replaces this process: signals and the exit status are CMD's own
    except FileNotFoundError:
        print(f"iar2.launch: {command[0]!r} not found on PATH", file=sys.stderr)
        return 127


if __name__ == "__main__":
    raise SystemExit(main())
