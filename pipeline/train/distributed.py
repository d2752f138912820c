"""Who am I in the job: rank, world size and device, from torchrun, SLURM, Ray or nothing.

Order of precedence:
1. a process group that already exists (Ray Train initialises it before calling `run`): use it,
   and leave it for its owner to destroy;
2. torchrun's RANK / WORLD_SIZE / LOCAL_RANK (MASTER_ADDR / MASTER_PORT are set by torchrun);
3. srun's SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, with MASTER_ADDR / MASTER_PORT from the
   environment, else the first host of SLURM_JOB_NODELIST (`scontrol show hostnames`) and a port
   derived from the job id, so that every task of the step agrees without talking first;
4. otherwise one process, no process group.
The backend follows the device: NCCL on CUDA, gloo on CPU.
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from typing import List, Mapping, Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool             # we created the process group, so we destroy it
    control_group: Optional[object] = None  # gloo group for CPU-side flags (stop requests)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


@dataclass(frozen=True)
class LaunchInfo:
    """Rank layout read from the launcher's environment variables (before any group exists)."""
    rank: int
    world_size: int
    local_rank: int
    launcher: str                # torchrun | slurm | none
    master_addr: Optional[str] = None
    master_port: Optional[str] = None


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list such as 'gpu[01-04],big7' (via scontrol)."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                             capture_output=True, text=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError) as err:
        raise RuntimeError(f"cannot expand SLURM_JOB_NODELIST={nodelist!r} with scontrol: {err}; "
                           "set MASTER_ADDR instead") from None
    if not out:
        raise RuntimeError(f"scontrol show hostnames {nodelist!r} returned no host; set MASTER_ADDR")
    return out[0]


def planned_world_size(environ: Optional[Mapping[str, str]] = None) -> int:
    """The world size `setup` will join, read before any rendezvous (to reject bad configs early)."""
    environ = os.environ if environ is None else environ
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    if "WORLD_SIZE" in environ and "RANK" in environ:
        return int(environ["WORLD_SIZE"])
    return int(environ["SLURM_NTASKS"]) if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ else 1


def launch_info(environ: Mapping[str, str]) -> LaunchInfo:
    if "WORLD_SIZE" in environ and "RANK" in environ:
        return LaunchInfo(int(environ["RANK"]), int(environ["WORLD_SIZE"]),
                          int(environ.get("LOCAL_RANK", 0)), "torchrun",
                          environ.get("MASTER_ADDR"), environ.get("MASTER_PORT"))
    if int(environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in environ:
        addr = environ.get("MASTER_ADDR") or first_slurm_host(environ["SLURM_JOB_NODELIST"])
        # Tasks of one job step must agree on a port without communicating: derive it from the job id.
        port = environ.get("MASTER_PORT") or str(15000 + int(environ.get("SLURM_JOB_ID", "0")) % 20000)
        return LaunchInfo(int(environ["SLURM_PROCID"]), int(environ["SLURM_NTASKS"]),
                          int(environ.get("SLURM_LOCALID", 0)), "slurm", addr, port)
    return LaunchInfo(0, 1, 0, "none")


def pick_device(preference: str, local_rank: int) -> torch.device:
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("train.device=cuda but CUDA is not available on this machine")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def setup(device_preference: str = "auto", environ: Optional[Mapping[str, str]] = None) -> DistEnv:
    """Join (or create) the process group for this job; see the module docstring."""
    environ = os.environ if environ is None else environ
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(environ.get("LOCAL_RANK", 0))
        device = pick_device(device_preference, local)
        return DistEnv(rank, world, local, device, owns_group=False, control_group=_control_group(world))
    info = launch_info(environ)
    device = pick_device(device_preference, info.local_rank)
    if info.world_size == 1:
        return DistEnv(0, 1, 0, device, owns_group=False)
    if info.launcher == "slurm":  # env:// reads these
        os.environ.setdefault("MASTER_ADDR", info.master_addr or "")
        os.environ.setdefault("MASTER_PORT", info.master_port or "")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method="env://", rank=info.rank, world_size=info.world_size,
                            timeout=timedelta(minutes=30),
                            device_id=device if device.type == "cuda" else None)
    return DistEnv(info.rank, info.world_size, info.local_rank, device, owns_group=True,
                   control_group=_control_group(info.world_size))


def _control_group(world_size: int):
    # A gloo group lets ranks agree on CPU flags every step without syncing the CUDA stream.
    if world_size == 1:
        return None
    return dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD


def teardown(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def any_rank(env: DistEnv, *flags: bool) -> List[bool]:
    """Each flag: true when it is true on at least one rank, all in one all-reduce (all ranks must
    call this together, with the same number of flags)."""
    if not env.distributed:
        return list(flags)
    t = torch.tensor([1 if flag else 0 for flag in flags], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=env.control_group)
    return [bool(v) for v in t.tolist()]


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier(group=env.control_group)


def broadcast_object(env: DistEnv, obj):
    """rank 0's `obj` on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=env.control_group)
    return box[0]


def all_gather_object(env: DistEnv, obj) -> list:
    if not env.distributed:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj, group=env.control_group)
    return out
