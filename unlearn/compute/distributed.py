"""Several processes, one run: what every rank needs to agree on, over torch.distributed.

A launcher (`torchrun`, `accelerate launch`) starts one process per GPU (or per CPU share) and sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `World.from_env` joins that group (NCCL between GPUs, gloo
on CPUs). Without a launcher the world is one process and every operation here is a no-op.

Data parallelism is explicit rather than through a DistributedDataParallel wrapper: every rank holds the whole
model and the whole data stream, evaluates its own shards of each step's batch, and then
* first-order grades all-reduce the summed gradients once per step (`sum_tensors`), and
* zeroth-order grades exchange only the scalar loss of each shard (`gather_floats`): one float per forward.
Both sums are taken in shard order, on every rank alike, so a step's result depends on the global batch, not on
how many processes computed it. Because no wrapper sits between the model and the code that calls it, the
scorers' head-only shortcut and RMU's stop-the-forward hook work unchanged.

`train.parallel: fsdp` shards the model instead (`shard_model`, FSDP2's `fully_shard` on every decoder layer
and on the whole): each rank holds a slice of every parameter, FSDP gathers a layer's weights for its forward
and backward and reduce-scatters its gradients (summed, like the data-parallel path). Every forward is then a
collective, so every rank runs every evaluation too, in lockstep; rank 0 alone still writes.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from unlearn.core.errors import UserError, shown

# Rank 0 alone evaluates and writes (minutes to hours on a large benchmark) while the others wait at a barrier.
TIMEOUT = datetime.timedelta(hours=6)


def _env_int(env: dict[str, str], key: str, default: int) -> int:
    value = env.get(key, "").strip()
    if not value:
        return default
    if not value.isdigit():
        raise UserError(f"{key} must be a non-negative integer (set by the launcher), got {shown(value)}")
    return int(value)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @classmethod
    def from_env(cls, device: torch.device) -> World:
        """The launcher's process group, joined (once per process); a single process when there is none."""
        env = dict(os.environ)
        size = _env_int(env, "WORLD_SIZE", 1)
        if size <= 1:
            return cls()
        rank = _env_int(env, "RANK", 0)
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group(backend=backend, timeout=TIMEOUT)
        return cls(rank=rank, size=size)

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def sum_tensors(self, tensors: Sequence[torch.Tensor]) -> None:
        """In place: every tensor becomes its sum over the ranks (one flat all-reduce per dtype and device)."""
        if not self.distributed or not tensors:
            return
        import torch.distributed as dist

        groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
        for t in tensors:
            groups.setdefault((t.dtype, t.device), []).append(t)
        for group in groups.values():
            flat = torch.cat([t.reshape(-1) for t in group])
            dist.all_reduce(flat)
            offset = 0
            for t in group:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()

    def gather_floats(self, values: Sequence[float]) -> list[float]:
        """Every rank's `values` (each rank gives as many), concatenated in rank order, on every rank."""
        if not self.distributed:
            return list(values)
        import torch.distributed as dist

        device = torch.device("cuda", torch.cuda.current_device()) \
            if dist.get_backend() == "nccl" else torch.device("cpu")
        local = torch.tensor(list(values), dtype=torch.float64, device=device)
        out = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(out, local)
        return [float(v) for part in out for v in part.tolist()]

    def broadcast_object(self, value: object) -> object:
        """Rank 0's `value` on every rank (small Python objects: a run folder's path, an error message)."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def shard_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """FSDP2 over the launcher's ranks: each decoder layer is one unit (gathered only while it runs), the rest
    of the model (embeddings, final norm, head) the root unit. Gradients are summed across ranks, not averaged:
    the training loop has already weighted each shard's loss by its share of the batch."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise UserError("train.parallel=fsdp needs a decoder with a `.layers` list (Llama/Mistral/Qwen-style models)")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    # Every other module with weights of its own (embeddings, final norm, head) is a unit too, tied ones sharing
    # one: FSDP reduces the root unit's gradients only once per backward, which loses them when a step runs
    # several forwards (forget and retain batches) before its backward, so the root must hold no weights.
    inside = {id(m) for layer in layers for m in layer.modules()}
    groups: dict[int, list[torch.nn.Module]] = {}
    owner: dict[int, int] = {}
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if id(module) in inside or not own:
            continue
        key = next((owner[id(q)] for q in own if id(q) in owner), id(module))
        groups.setdefault(key, []).append(module)
        owner.update({id(q): key for q in own})
    for group in groups.values():
        fully_shard(group if len(group) > 1 else group[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    from torch.distributed.fsdp import FSDPModule

    for unit in model.modules():  # the setting is per unit
        if isinstance(unit, FSDPModule):
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def gathered_model(model: torch.nn.Module, world: World) -> torch.nn.Module | None:
    """A plain copy of a sharded model, on rank 0's CPU (None on the other ranks), to save; a collective call."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoModelForCausalLM

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not world.is_main:
        return None
    dtype = next(iter(state.values())).dtype
    plain = AutoModelForCausalLM.from_config(model.config, dtype=dtype)
    plain.load_state_dict(state, assign=True)
    plain.tie_weights()
    return plain.eval()


SINGLE = World()
