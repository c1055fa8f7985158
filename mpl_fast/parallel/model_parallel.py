"""Model-parallel MPL: the teacher and the student on different devices, each with a whole
device's memory.

The MPL step (mpl_fast.algo.MPL) is a teacher half and a student half joined by a *link*
(mpl_fast.algo.interfaces.Link: y_hat to the student; h and the student's loss back; the
verdict ``ok`` to the student). Every layout runs the same step code; only the link differs:

  two-devices   one process, ``--teacher-device cuda:0 --student-device cuda:1``: the one-process
                link, mpl_fast.algo.interfaces.InProcessLink, moves the values (and the student's
                inputs) between the devices with ``.to``.
  rank-pair     torchrun with 2 processes: rank 0 holds the teacher, rank 1 the student
                (``DistributedLink``); both read the same data streams (same seed), so batches
                never travel, only the three values above, by torch.distributed send/recv (gloo
                on CPU, NCCL on GPU; the process group's timeout bounds every wait).
  rank-groups   torchrun with 2k processes: ranks 0..k-1 hold the teacher, k..2k-1 the student;
                teacher rank i and student rank k+i are peers that read the same shard i of the
                global batch and exchange the three values as a rank pair does. Each group is
                data parallel within its own process group (``HalfGroups``): every student rank
                computes the same h from the averaged g_u and g_l', every teacher rank the same
                verdict from the averaged losses. k = 1 is the rank pair.

(The trainer names these layouts, and "single-device", in mpl_fast.train.topology.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from mpl_fast.algo.interfaces import InProcessLink
from mpl_fast.checkpoint import map_tensors

TEACHER_RANK, STUDENT_RANK = 0, 1


class DistributedLink:
    """One half per process, send/recv with the peer rank: a rank pair (rank 0 the teacher, rank 1
    the student), or a peer pair of rank groups (teacher rank i, student rank k+i: pass ``peer``).

    No host sync beyond what send/recv imply: the received values stay device tensors.
    ``pseudo_label_kind`` and ``num_classes`` fix what the student receives: class indices (int64,
    one per row) for "hard"/"sample", distributions (fp32, rows x num_classes) for "soft".
    ``peer`` is the other half's global rank (default: the rank pair's). ``half_group`` is the
    process group of this process's half in rank groups (None in a rank pair): the only group a data-
    parallel gradient averager of this half may use (mpl_fast.algo.MPL checks it).
    """

    def __init__(self, role: str, device: torch.device | str, pseudo_label_kind: str = "hard",
                 num_classes: int = 0, peer: int | None = None, half_group: dist.ProcessGroup | None = None):
        if role not in ("teacher", "student"):
            raise ValueError(f"role must be 'teacher' or 'student', got {role!r}")
        self.role, self.device, self.group = role, torch.device(device), None  # send/recv: global ranks
        self.soft = pseudo_label_kind == "soft"
        if self.soft and num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 for soft pseudo labels, got {num_classes}")
        self.num_classes = num_classes
        self.holds_teacher = role == "teacher"
        self.holds_student = role == "student"
        self.peer = peer if peer is not None else (STUDENT_RANK if self.holds_teacher else TEACHER_RANK)
        self.half_group = half_group

    def student_inputs(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tensors  # each rank reads the same batches itself

    def pseudo_labels(self, y_hat: torch.Tensor | None, rows: int) -> torch.Tensor | None:
        if self.holds_teacher:
            dist.send(y_hat.contiguous(), self.peer, group=self.group)
            return None
        shape, dtype = ((rows, self.num_classes), torch.float32) if self.soft else ((rows,), torch.int64)
        y_hat = torch.empty(shape, dtype=dtype, device=self.device)
        dist.recv(y_hat, self.peer, group=self.group)
        return y_hat

    def feedback(self, h: torch.Tensor | None, loss_student: torch.Tensor | None):
        if self.holds_student:
            dist.send(torch.stack([h.detach().float(), loss_student.detach().float()]), self.peer, group=self.group)
            return h, loss_student
        pair = torch.empty(2, dtype=torch.float32, device=self.device)
        dist.recv(pair, self.peer, group=self.group)
        return pair[0], pair[1]

    def verdict(self, ok: torch.Tensor | None) -> torch.Tensor | None:
        if self.holds_teacher:
            dist.send(ok.reshape(1).to(torch.uint8), self.peer, group=self.group)  # gloo has no bool
            return None
        flag = torch.empty(1, dtype=torch.uint8, device=self.device)
        dist.recv(flag, self.peer, group=self.group)
        return flag[0].bool()


# ----------------------------------------------------------------------------- rank groups


class HalfGroups:
    """Who is who among 2k model-parallel ranks (rank groups; k = 1 is the rank pair).

    Ranks 0..k-1 hold the teacher, k..2k-1 the student; teacher rank i and student rank k+i are
    peers and read shard ``index`` = i of the global batch. ``create`` makes the process groups
    (every rank must call it, in the same order: dist.new_group is collective): the teacher's
    ranks, the student's ranks, and the two leaders (rank 0 and rank k, which evaluate and meet
    at checkpoints). With k = 1 it makes none: a half of one rank averages nothing, and the
    leaders are the whole world (None: the default group).
    """

    def __init__(self, world_size: int, rank: int, teacher_group=None, student_group=None, leaders_group=None):
        if world_size < 2 or world_size % 2:
            raise ValueError(f"model-parallel ranks come in teacher/student pairs: the world size must be an "
                             f"even number >= 2, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.world_size, self.rank, self.per_half = world_size, rank, world_size // 2
        self.teacher_group, self.student_group, self.leaders_group = teacher_group, student_group, leaders_group

    @classmethod
    def create(cls, world_size: int, rank: int, backend: str | None = None) -> "HalfGroups":
        """The groups for this rank (collective: every rank calls it with the same world size)."""
        k = world_size // 2
        groups = cls(world_size, rank)  # validates before any collective
        if k > 1:
            groups.teacher_group = dist.new_group(list(range(k)), backend=backend)
            groups.student_group = dist.new_group(list(range(k, 2 * k)), backend=backend)
            groups.leaders_group = dist.new_group([0, k], backend=backend)
        return groups

    @property
    def role(self) -> str:
        return "teacher" if self.rank < self.per_half else "student"

    @property
    def index(self) -> int:
        """This rank's place in its half: the shard of the global batch it reads."""
        return self.rank % self.per_half

    @property
    def peer(self) -> int:
        """The other half's rank that reads the same shard."""
        return self.rank + self.per_half if self.role == "teacher" else self.rank - self.per_half

    @property
    def leader(self) -> int:
        """The first rank of this rank's half (0 or k)."""
        return 0 if self.role == "teacher" else self.per_half

    @property
    def is_leader(self) -> bool:
        return self.rank == self.leader

    @property
    def half_group(self):
        """This rank's half's process group (None when k = 1)."""
        return self.teacher_group if self.role == "teacher" else self.student_group

    def link(self, device: torch.device | str, pseudo_label_kind: str = "hard",
             num_classes: int = 0) -> "DistributedLink":
        """This rank's DistributedLink to its peer."""
        return DistributedLink(self.role, device, pseudo_label_kind, num_classes, peer=self.peer,
                               half_group=self.half_group)


# ----------------------------------------------------------------------------- placement


@dataclass(frozen=True)
class Placement:
    """Where this process puts what. ``role`` is "both" in one process, else "teacher"/"student"."""

    layout: str                 # "single-device", "two-devices", "rank-pair" or "rank-groups"
    role: str
    teacher_device: torch.device | None
    student_device: torch.device | None
    per_half: int = 1           # rank pair/groups: k, the ranks holding each network (1: a rank pair)
    shard: int = 0              # rank groups: this rank's shard of the global batch (its place in its half)

    @property
    def data_device(self) -> torch.device:
        """Where the data streams deliver batches: the teacher's device (it reads every batch)."""
        return self.teacher_device if self.teacher_device is not None else self.student_device


def check_device(spec: str, flag: str) -> torch.device:
    """``spec`` as a torch.device that exists on this machine, or a ValueError naming ``flag``."""
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ValueError(f"{flag} {spec!r} is not a device name (use cpu, cuda or cuda:N)") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise ValueError(f"{flag} {spec}: model-parallel MPL places networks on cpu or cuda devices only")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = 0 if device.index is None else device.index
    if index >= count:
        seen = ("no CUDA GPU is visible" if count == 0
                else f"only {count} CUDA GPU(s) are visible (cuda:0..cuda:{count - 1})")
        raise ValueError(f"{flag} {spec}: that device does not exist here: {seen}")
    return torch.device("cuda", index)


def resolve_placement(model_parallel: bool, device: str, teacher_device: str | None = None,
                      student_device: str | None = None, world_size: int | None = None,
                      rank: int | None = None, local_rank: int | None = None) -> Placement:
    """The placement for the run's flags; bad combinations raise ValueError before any work.

    ``world_size``/``rank``/``local_rank`` default to torchrun's environment variables (absent: 1
    process). Without --model-parallel: both networks on ``device``. With it, in one process:
    ``--teacher-device`` and ``--student-device`` (default: cuda:0 and cuda:1 when ``device`` is
    cuda and two GPUs are visible, else both ``device``). Under torchrun: 2k processes, ranks
    0..k-1 the teacher, k..2k-1 the student (k = 1: a rank pair), each on ``device`` (cuda: its
    cuda:LOCAL_RANK); an odd number is refused.
    """
    from mpl_fast.parallel.distributed import env_int  # noqa: PLC0415 - names a bad variable in its error

    world_size = env_int("WORLD_SIZE", 1) if world_size is None else world_size
    rank = env_int("RANK", 0) if rank is None else rank
    local_rank = env_int("LOCAL_RANK", 0) if local_rank is None else local_rank
    if not model_parallel:
        if teacher_device is not None or student_device is not None:
            raise ValueError("--teacher-device/--student-device place the networks of a --model-parallel run; "
                             "add --model-parallel, or use --device for both")
        return Placement("single-device", "both", torch.device(device), torch.device(device))
    if world_size > 1:
        if world_size % 2:
            raise ValueError(f"--model-parallel under torchrun runs the teacher on the first half of the ranks and "
                             f"the student on the second (rank i and rank k+i are peers): it needs an even number "
                             f"of processes, got WORLD_SIZE={world_size} (use torchrun --nproc_per_node=2k, or "
                             f"drop torchrun for one-process placement)")
        if teacher_device is not None or student_device is not None:
            raise ValueError("--teacher-device/--student-device are for a one-process --model-parallel run; under "
                             "torchrun each rank uses --device (cuda: its cuda:LOCAL_RANK)")
        kind = torch.device(device).type
        mine = check_device(f"cuda:{local_rank}" if kind == "cuda" else device,
                            "--device" if kind != "cuda" else f"--device cuda (LOCAL_RANK {local_rank})")
        who = HalfGroups(world_size, rank)
        layout = "rank-pair" if who.per_half == 1 else "rank-groups"
        if who.role == "teacher":
            return Placement(layout, "teacher", mine, None, who.per_half, who.index)
        return Placement(layout, "student", None, mine, who.per_half, who.index)
    if teacher_device is None and student_device is None and torch.device(device).type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count < 2:
            raise ValueError(f"--model-parallel --device cuda puts the teacher on cuda:0 and the student on cuda:1, "
                             f"but {count} CUDA GPU(s) are visible; name the devices to share one "
                             f"(--teacher-device cuda:0 --student-device cpu, or cuda:0 for both)")
        teacher_device, student_device = "cuda:0", "cuda:1"
    teacher = check_device(teacher_device or device, "--teacher-device")
    student = check_device(student_device or device, "--student-device")
    return Placement("two-devices", "both", teacher, student)


def make_link(placement: Placement, pseudo_label_kind: str = "hard", num_classes: int = 0,
              groups: HalfGroups | None = None):
    """The link between the halves for ``placement`` (across ranks the process group must exist;
    ``groups``, this rank's HalfGroups, names its peer: default the rank pair's)."""
    if placement.role == "both":
        return InProcessLink(placement.teacher_device, placement.student_device)
    device = placement.teacher_device if placement.role == "teacher" else placement.student_device
    if groups is not None:
        return groups.link(device, pseudo_label_kind, num_classes)
    return DistributedLink(placement.role, device, pseudo_label_kind, num_classes)


# ----------------------------------------------------------------------------- the trainer's view


def _detached_cpu(t: torch.Tensor) -> torch.Tensor:
    """A tensor as it travels between ranks and to disk: detached, on the CPU."""
    return t.detach().cpu()


# What the student's process owns in MPL.state_dict(); the rest comes from the teacher's.
STUDENT_STATE_KEYS = ("student", "student_opt", "ema", "baseline", "student_grad_scaler")


class RankSync:
    """The trainer's few meeting points between the teacher's and the student's ranks (a rank
    pair or rank groups); in one process every method is the identity and ``is_main`` is True.

    Rank 0 (the teacher's leader) is the main process: it logs, writes the metrics, the
    checkpoint (it gathers the student's half from rank k, the student's leader: one atomic file)
    and the summary. The leaders (rank 0 and rank k; k = 1 in a rank pair) evaluate the networks
    they hold and merge their lines. Every rank runs the trainer's loop in lockstep; they meet
    only at evaluations (the leaders; with --fsdp each half gathers its network's weights),
    checkpoints and the per-step stop flag.
    """

    def __init__(self, placement: Placement, groups: HalfGroups | None = None):
        self.distributed = placement.role != "both"  # teacher and student on different ranks
        if self.distributed and groups is None:  # a rank pair
            groups = HalfGroups(2, STUDENT_RANK if placement.role == "student" else TEACHER_RANK)
        self.groups = groups
        self.is_main = not self.distributed or groups.rank == TEACHER_RANK
        self.is_leader = not self.distributed or groups.is_leader
        self.student_leader = groups.per_half if self.distributed else None

    def merge(self, values: dict) -> dict:
        """The union of the dicts the two leaders pass (evaluation lines: each measures the
        networks its half holds); where both have a key, the teacher's wins. Leaders only."""
        if not self.distributed:
            return values
        gathered = [None, None]  # the leaders' group: [rank 0, rank k]
        dist.all_gather_object(gathered, map_tensors(values, _detached_cpu), group=self.groups.leaders_group)
        return {**gathered[1], **gathered[0]}

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def gather_checkpoint(self, state: dict, student_extra: dict) -> dict | None:
        """Rank 0 gets the whole run's state: its own ``state`` with the student leader's half of
        ``state["mpl"]`` (whole tensors: under --fsdp the caller gathers them first) and its
        ``student_extra`` (its best weights, its RNG) merged in; every other rank gets None (every
        rank calls this). In one process: ``state`` as it is."""
        if not self.distributed:
            return state
        is_student_leader = self.groups.rank == self.student_leader
        mine = ({"mpl": {k: state["mpl"][k] for k in STUDENT_STATE_KEYS}, **student_extra}
                if is_student_leader else None)
        gathered = [None] * self.groups.world_size if self.is_main else None
        dist.gather_object(map_tensors(mine, _detached_cpu), gathered, dst=TEACHER_RANK)
        if not self.is_main:
            return None
        theirs = gathered[self.student_leader]
        merged = dict(state, mpl={**state["mpl"], **theirs["mpl"]})
        if theirs["best"]["state"] is not None:
            merged["best"] = theirs["best"]
        merged["rng"] = dict(state["rng"], student_rank=theirs["rng"])
        return merged
