"""Full weights out of a sharded model: collective helpers for saving under FSDP2 and ZeRO-3.

Under FSDP2 (``fully_shard``) every parameter is a ``DTensor`` holding one shard; under DeepSpeed
ZeRO-3 every parameter is partitioned (``ds_id`` set, its ``data`` empty: shape ``(0,)``). A plain
``state_dict()`` or ``save_pretrained`` of such a module writes the shards (or nothing), so:

* ``full_state_dict(module)``: the module's full state dict, gathered (CPU tensors, on the main
  process); works on a sub-module of a wrapped model too (``pair.strong`` inside an FSDP2- or
  ZeRO-3-wrapped pair), on a DDP-wrapped or plain module (then a CPU copy of its state dict);
* ``save_pretrained_full(model, output_dir)``: ``save_pretrained`` of those full weights by the
  main process, loadable by ``AutoModelForCausalLM.from_pretrained`` (a PEFT model: its adapter);
* ``is_main_process()``, ``barrier()``: ``torch.distributed`` when initialised, else one process;
* ``raise_everywhere(error)``: an error one process met, raised on every process.

The gathering functions are *collective*: every process of the group calls them, in the same order
(each one runs all-gathers); a call on the main process alone hangs.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch
from torch import nn

from .lora import AdapterView, is_peft_model, save_strong

# ZeRO-3 parameters are gathered in groups of at most this many elements (every process holds a
# group's full tensors at once; the main process then copies them to the CPU), so gathering a
# large model never needs the memory of the whole model on the accelerator.
ZERO3_GATHER_ELEMENTS = 1 << 27


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group is initialised."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def is_main_process() -> bool:
    """True on the process of global rank 0, and on a single process (no process group)."""
    return not is_distributed() or torch.distributed.get_rank() == 0


def barrier() -> None:
    """``torch.distributed.barrier()`` when distributed; nothing on a single process."""
    if is_distributed():
        torch.distributed.barrier()


def portable_error(error: BaseException, process: Optional[int] = None) -> Exception:
    """``error`` rebuilt from its text, so that it can be sent to the other processes (not every
    exception class can be pickled): a ``ValueError``, ``TypeError`` or ``OSError`` keeps that
    class (what the ``wmss`` commands report as a message), anything else becomes a
    ``RuntimeError`` naming it. ``process`` (a rank) is named in the message."""
    where = "" if process is None else f"process {process}: "
    kind = next((k for k in (ValueError, TypeError, OSError) if isinstance(error, k)), None)
    if kind is not None:
        return kind(f"{where}{error}")
    return RuntimeError(f"{where}{type(error).__name__}: {error}")


def raise_everywhere(error: Optional[BaseException]) -> None:
    """**Collective.** Every process passes what it met (None: no error). If any process met an
    error, every process raises: the one that met it its own error, the others the first one in
    rank order (``portable_error``), so no process is left waiting at a later collective for one
    that failed. On a single process: raises ``error`` if there is one."""
    if not is_distributed():
        if error is not None:
            raise error
        return
    rank = torch.distributed.get_rank()
    errors = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(
        errors, None if error is None else portable_error(error, rank))
    if error is not None:
        raise error
    failed = next((e for e in errors if e is not None), None)
    if failed is not None:
        raise failed


def strip_wrappers(model: nn.Module, *, keep_fsdp1: bool = False) -> nn.Module:
    """The module inside DDP, a DeepSpeed engine, an FSDP1 wrapper (unless ``keep_fsdp1``) and
    ``torch.compile`` (the same parameters). PEFT models are kept (``wmss.hf.models.unwrap`` goes
    through them too); FSDP2 needs no stripping (``fully_shard`` changes the class in place)."""
    while True:
        inner = None
        if isinstance(model, nn.parallel.DistributedDataParallel):
            inner = model.module
        elif _is_deepspeed_engine(model) or (_is_fsdp1_wrapper(model) and not keep_fsdp1):
            inner = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            inner = model._orig_mod
        if inner is None or inner is model:
            return model
        model = inner


def _is_deepspeed_engine(model) -> bool:
    deepspeed = sys.modules.get("deepspeed")  # never imported here: only loaded if in use
    return deepspeed is not None and isinstance(model, deepspeed.DeepSpeedEngine)


def _is_fsdp1_wrapper(model) -> bool:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        return False
    return isinstance(model, FullyShardedDataParallel)


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(t, DTensor)


def _is_fsdp1_flattened(t) -> bool:
    # FSDP1 marks the original parameters it flattened into its FlatParameter (use_orig_params):
    # outside its own state-dict context they are views of a local shard.
    return bool(getattr(t, "_fsdp_flattened", False))


def is_sharded(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is an FSDP2 shard (``DTensor``) or a ZeRO-3 parameter
    (``ds_id``), i.e. whether its plain ``state_dict()`` would not hold the full weights. The same
    answer on every process."""
    return any(_is_dtensor(p) or hasattr(p, "ds_id") or _is_fsdp1_flattened(p)
               for p in strip_wrappers(module).parameters())


def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True)


def _zero3_gather(parameters: list, main: bool, every_process: bool, copies: dict) -> None:
    """Gather ZeRO-3 ``parameters`` group by group (``ZERO3_GATHER_ELEMENTS``) and copy them to
    ``copies[id(parameter)]`` (on the main process, or on every process)."""
    if not parameters:  # nothing partitioned: DeepSpeed may not even be installed
        return
    import deepspeed

    def flush(group):
        if group:
            with deepspeed.zero.GatheredParameters(group, modifier_rank=None):
                if main or every_process:
                    for parameter in group:
                        copies[id(parameter)] = _cpu_copy(parameter.data)

    group, size = [], 0
    for parameter in parameters:
        full = parameter.ds_numel
        if group and size + full > ZERO3_GATHER_ELEMENTS:
            flush(group)
            group, size = [], 0
        group.append(parameter)
        size += full
    flush(group)


def full_state_dict(module: nn.Module, *, every_process: bool = False) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of ``module`` as CPU tensors. **Collective**: call it on
    every process, in the same order.

    Args:
        module: a plain module, a DDP / DeepSpeed-engine / ``torch.compile`` wrapper (its inner
            module's keys), a module with FSDP2 (``DTensor``) or ZeRO-3 (``ds_id``) parameters,
            including a *sub-module* of an FSDP2- or ZeRO-3-wrapped model (e.g. ``pair.strong``),
            or an FSDP1 root wrapper (gathered with its own full-state-dict support).
        every_process: return the full state dict on every process, not only on the main one.

    Returns:
        On the main process (rank 0; or every process with ``every_process``): ``{key: tensor}``
        with the keys of ``module.state_dict()``, each tensor a full CPU copy in the parameter's
        dtype; names that share one tensor (tied embeddings) share one copy, as in the module, so
        ``save_pretrained`` recognises the tie. On the other processes: ``{}``.

    Raises:
        ValueError: ``module`` is a sub-module of an FSDP1 wrapper (its parameters are views of
            the wrapper's flat shards; pass the FSDP1 root, or use FSDP2).
    """
    main = is_main_process()
    keep = main or every_process
    module = strip_wrappers(module, keep_fsdp1=True)
    if _is_fsdp1_wrapper(module):  # its state-dict hooks live on the wrapper: it gathers
        return _fsdp1_full_state_dict(module, main, every_process)
    if any(_is_fsdp1_flattened(p) for p in module.parameters()):
        raise ValueError(
            f"full_state_dict: {type(module).__name__} is part of an FSDP1 (FullyShardedDataParallel) "
            "model, whose parameters are views of flat shards; pass the FSDP1 root module, or "
            "shard with FSDP2 (fsdp_version=2)")
    entries = module.state_dict(keep_vars=True)  # the parameters themselves: ties stay visible
    unique = list({id(t): t for t in entries.values() if isinstance(t, torch.Tensor)}.values())
    copies: dict[int, torch.Tensor] = {}
    _zero3_gather([t for t in unique if hasattr(t, "ds_id")], main, every_process, copies)
    for tensor in unique:  # the same order on every process: each full_tensor is a collective
        if hasattr(tensor, "ds_id"):
            continue
        if _is_dtensor(tensor):
            full = tensor.full_tensor()
            if keep:
                copies[id(tensor)] = _cpu_copy(full)
        elif keep:
            copies[id(tensor)] = _cpu_copy(tensor)
    if not keep:
        return {}
    return {key: copies[id(t)] if isinstance(t, torch.Tensor) else t for key, t in entries.items()}


def _fsdp1_full_state_dict(wrapper, main: bool, every_process: bool) -> dict:
    """An FSDP1 root's full state dict (its inner module's keys), by torch's own gathering
    (``cpu_offload`` keeps it on rank 0 alone, unless it is wanted on every process)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=not every_process)
    state = get_model_state_dict(wrapper, options=options)
    if every_process:
        return {key: _cpu_copy(t) if isinstance(t, torch.Tensor) else t for key, t in state.items()}
    return dict(state) if main else {}


def save_pretrained_full(model: nn.Module, output_dir, *, is_main_process: Optional[bool] = None,
                         **save_kwargs) -> None:
    """``save_pretrained`` of ``model``'s full weights, however it is sharded. **Collective**:
    every process calls it; then only the main process writes ``output_dir``, and every process
    returns once it is written (a barrier).

    Args:
        model: a transformers model (``AutoModelForCausalLM.from_pretrained`` loads the folder;
            tied embeddings are saved once, as ``save_pretrained`` saves them) or a PEFT model (its
            active adapter: ``adapter_config.json`` and the adapter's weights, as
            ``WMSSPair.save_pretrained`` saves a LoRA pair's strong model), plain, DDP-wrapped,
            FSDP2-sharded (also as a sub-module of a sharded pair: ``pair.strong``) or ZeRO-3
            partitioned.
        output_dir: the folder.
        is_main_process: which processes write (default: rank 0). When given, the full weights are
            gathered on every process (so any process may be the writer).
        save_kwargs: passed to ``save_pretrained`` (e.g. ``safe_serialization``).

    Raises:
        ValueError: ``model`` is a LoRA pair's weak view (``AdapterView``: its adapter is saved
            with the strong PEFT model), before anything is gathered.
        The writer's error (e.g. ``OSError``: a full disk), on every process (``raise_everywhere``).
    """
    outer = strip_wrappers(model)
    if isinstance(outer, AdapterView):
        raise ValueError("save_pretrained_full: the model is a LoRA pair's weak view (AdapterView); "
                         "its adapter lives in the strong PEFT model: save pair.strong")
    for key in ("state_dict", "is_main_process"):
        if key in save_kwargs:
            raise TypeError(f"save_pretrained_full: {key} is not a save_pretrained option here "
                            "(the full state dict and the writing process are its own)")
    explicit = is_main_process is not None
    state = full_state_dict(outer, every_process=explicit)
    writer = globals()["is_main_process"]() if not explicit else bool(is_main_process)
    error = None
    if writer:
        try:
            if is_peft_model(outer):
                save_strong(outer, output_dir, merged=False, state_dict=state, **save_kwargs)
            else:
                outer.save_pretrained(output_dir, state_dict=state, **save_kwargs)
        except Exception as caught:  # noqa: BLE001 - e.g. a full disk: raised on every process
            error = caught
    del state
    raise_everywhere(error)  # also the barrier: every process returns once the folder is written
