"""What the fused loss needs from a Hugging Face causal LM: final hidden states and its lm head.

``LMHead.of(model)`` finds the output layer of any causal LM whose head is a plain linear layer
(``get_output_embeddings()``), with the logit transforms some families add on top:

* Gemma 2/3: ``final_logit_softcapping`` -> the fused loss's ``softcap``;
* Cohere: ``logits * logit_scale``; Granite: ``logits / logits_scaling`` -> a scale folded into the
  hidden states (``z = (s h) W^T`` is exactly ``s (h W^T)``).

Anything else is caught by ``LMHead.verify``, which compares the model's own logits with
``LMHead.logits`` on a few tokens and raises if they differ. Under DeepSpeed ZeRO-3 (models built
or loaded under ``deepspeed.zero.Init``) every parameter is a ``(0,)`` partition outside its
module's forward: the checks read the full shapes (``full_shape``) and ``verify`` gathers each
module's parameters for its forward (``gathered``). ``final_hidden_states`` runs the
model's backbone (``backbone(model)``, after its final norm) and never computes logits;
``RouterAux.of(model)`` is a mixture-of-experts model's router load-balancing loss, as its own
class adds it to the loss. PEFT wrappers are unwrapped first; nothing is patched, so the weak
model, which shares the class, is untouched.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from ..loss.engines.contract import ModelInputs


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside PEFT / DDP / torch.compile wrappers (same parameters)."""
    while True:
        if hasattr(model, "get_base_model") and callable(model.get_base_model):  # PEFT
            inner = model.get_base_model()
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            inner = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            inner = model._orig_mod
        else:
            return model
        if inner is model:
            return model
        model = inner


def _is_plain_linear(module: nn.Module) -> bool:
    """``nn.Linear`` itself, or as FSDP2's ``fully_shard`` leaves it: the class
    ``FSDPLinear(FSDPModule, Linear)``, which shards the parameters and adds nothing to the
    computation."""
    cls = type(module)
    if cls is nn.Linear:
        return True
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a build without distributed
        return False
    return issubclass(cls, FSDPModule) and [b for b in cls.__bases__ if b is not FSDPModule] == [
        nn.Linear]


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(t, DTensor)


def is_zero3_parameter(tensor: Optional[torch.Tensor]) -> bool:
    """Whether ``tensor`` is a parameter DeepSpeed ZeRO-3 partitions (``deepspeed.zero.Init``, or
    ``deepspeed.initialize`` at stage 3, gave it a ``ds_id``)."""
    return tensor is not None and hasattr(tensor, "ds_id")


def full_shape(tensor: torch.Tensor) -> torch.Size:
    """``tensor.shape``; for a ZeRO-3 parameter, whose own shape is ``(0,)`` while it is
    partitioned, the full parameter's (``ds_shape``)."""
    return torch.Size(tensor.ds_shape) if is_zero3_parameter(tensor) else tensor.shape


def gathered(*tensors: Optional[torch.Tensor]):
    """A context in which the ZeRO-3 parameters among ``tensors`` hold their full values
    (read-only: ``deepspeed.zero.GatheredParameters`` with ``modifier_rank=None``, partitioned
    again on exit); a no-op when none is one. For checks only: gradients of what is computed inside
    do not reach DeepSpeed's partitioned gradients (training reads the heads through
    ``WMSSPair``'s head module, see ``wmss.hf.pair``)."""
    params = [t for t in tensors if is_zero3_parameter(t)]
    if not params:
        return contextlib.nullcontext()
    import deepspeed  # a ZeRO-3 parameter exists: deepspeed is installed and imported

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


@contextlib.contextmanager
def gathered_by_module(model: nn.Module):
    """A context in which each module of ``model`` holding ZeRO-3 parameters of its own gathers
    them for its forward and partitions them again after it (what DeepSpeed's engine does, for a
    model that is not run by one yet: built under ``deepspeed.zero.Init``, before
    ``deepspeed.initialize``). One module's parameters at a time, never the whole model's."""
    opened: list = []

    def gather(module, args):
        context = gathered(*module.parameters(recurse=False))
        context.__enter__()
        opened.append(context)

    def release(module, args, output):
        opened.pop().__exit__(None, None, None)

    handles = []
    for module in model.modules():
        if any(is_zero3_parameter(p) for p in module.parameters(recurse=False)):
            handles += [module.register_forward_pre_hook(gather),
                        module.register_forward_hook(release)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        while opened:  # a forward that raised left its modules gathered
            opened.pop().__exit__(None, None, None)


@dataclass
class LMHead:
    """A causal LM's output layer: ``logits = softcap(scale * (h @ weight^T + bias))``."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    softcap: Optional[float]
    scale: float = 1.0

    @classmethod
    def of(cls, model: nn.Module) -> "LMHead":
        """Read the head of ``model`` (a transformers causal LM); raises ``ValueError`` if unsupported."""
        model = unwrap(model)
        name = type(model).__name__
        if not hasattr(model, "get_output_embeddings") or not hasattr(model, "base_model"):
            raise ValueError(f"{name} is not a Hugging Face causal LM (no get_output_embeddings / "
                             "base_model)")
        head = model.get_output_embeddings()
        if not _is_plain_linear(head):  # a subclass or wrapper (e.g. LoRA on the head) may add terms
            raise ValueError(f"{name}'s output layer is {type(head).__name__}, not a plain "
                             "torch.nn.Linear; wmss supports plain linear lm heads")
        if _is_dtensor(head.weight):
            raise ValueError(
                f"{name}'s lm-head weight is sharded (a DTensor) where the loss reads it: its FSDP "
                "unit is not gathered in the pair's forward. Shard the lm head in a unit that "
                "holds a module the backbone runs (accelerate's FSDP2 puts it with the final "
                "norm), or in the root unit (fully_shard the pair, not the head alone)")
        if backbone(model) is model:
            raise ValueError(f"{name} has no separate backbone (base_model is the model itself)")
        config = getattr(model, "config", None)
        softcap = getattr(config, "final_logit_softcapping", None)
        scale = 1.0
        logit_scale = getattr(model, "logit_scale", None)  # Cohere: logits * logit_scale
        if isinstance(logit_scale, (int, float)):
            scale *= float(logit_scale)
        logits_scaling = getattr(config, "logits_scaling", None)  # Granite: logits / scaling
        if isinstance(logits_scaling, (int, float)):
            scale /= float(logits_scaling)
        return cls(head.weight, head.bias, None if softcap is None else float(softcap), scale)

    @property
    def vocab_size(self) -> int:
        """The head's rows (its full shape's, under ZeRO-3)."""
        return full_shape(self.weight)[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The full logits from final hidden states (for checks only: materialises ``[.., V]``)."""
        z = nn.functional.linear(hidden, self.weight, self.bias) * self.scale
        if self.softcap is not None:
            z = self.softcap * torch.tanh(z / self.softcap)
        return z

    def model_inputs(self, hidden: torch.Tensor) -> ModelInputs:
        """What the fused loss takes for final hidden states ``(..., d)``: the scale folded into
        the hidden states and the bias (``z = (s h) W^T + s b``); the soft-cap is ``softcap``."""
        if self.scale == 1.0:
            return ModelInputs(hidden, self.weight, self.bias)
        bias = None if self.bias is None else self.bias * self.scale
        return ModelInputs(hidden * self.scale, self.weight, bias)

    @torch.no_grad()
    def verify(self, model: nn.Module, tokens: int = 4) -> None:
        """Compare the model's own logits with ``self.logits`` on ``tokens`` tokens; raise on mismatch.

        Catches logit transforms this module does not know. Runs in eval mode (no dropout) and
        restores the training mode afterwards. ZeRO-3 parameters are gathered module by module.
        """
        model = unwrap(model)
        was_training = model.training
        model.eval()
        try:
            input_ids = torch.arange(1, tokens + 1, device=self.weight.device).clamp(
                max=self.vocab_size - 1)[None]
            with gathered_by_module(model):
                expected = model(input_ids=input_ids).logits.float()
                hidden = final_hidden_states(model, input_ids)
            with gathered(self.weight, self.bias):
                got = self.logits(hidden).float()
        finally:
            model.train(was_training)
        tolerance = 1e-3 if self.weight.dtype == torch.float32 else 5e-2
        scale = expected.abs().max().clamp(min=1.0)
        if got.shape != expected.shape or ((got - expected).abs().max() / scale) > tolerance:
            raise ValueError(f"{type(model).__name__}'s logits are not softcap(scale * lm_head(h)) "
                             "of its backbone's final hidden states: its head applies a transform "
                             "wmss does not support")


def backbone(model: nn.Module) -> nn.Module:
    """The decoder under a causal LM's head: ``model.base_model``, or ``model.model`` where
    ``base_model`` is the model itself (transformers 4.x's Gemma3ForCausalLM declares
    ``base_model_prefix = "language_model"`` but keeps its decoder in ``model``)."""
    inner = model.base_model
    if inner is model and isinstance(getattr(model, "model", None), nn.Module):
        inner = model.model
    return inner


def backbone_outputs(model: nn.Module, input_ids: torch.Tensor,
                     attention_mask: Optional[torch.Tensor] = None, **kwargs):
    """The backbone's (``backbone(model)``) ``ModelOutput``: ``last_hidden_state`` ``(batch, seq,
    d)`` after the final norm, and e.g. ``router_logits`` when ``output_router_logits=True`` is
    passed to an MoE backbone. No logits are computed."""
    inner = backbone(unwrap(model))
    kwargs.update(use_cache=False, return_dict=True)  # training: no KV cache, a ModelOutput back
    return inner(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def final_hidden_states(model: nn.Module, input_ids: torch.Tensor,
                        attention_mask: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
    """``(batch, seq, d)`` hidden states after the backbone's final norm; no logits computed."""
    return backbone_outputs(model, input_ids, attention_mask, **kwargs).last_hidden_state


# The signature the MoE CausalLM classes of transformers (Mixtral, Qwen2/3-MoE, OLMoE, GPT-OSS,
# Granite-MoE, PhiMoE, Jamba, DBRX...) call their module's load-balancing loss with.
_LOAD_BALANCING_PARAMETERS = ("gate_logits", "num_experts", "top_k", "attention_mask")


@dataclass(frozen=True)
class RouterAux:
    """A mixture-of-experts causal LM's router auxiliary loss, as its own class adds it to the loss:
    ``coef * loss_func(router_logits, num_experts, top_k, attention_mask)`` (the
    ``load_balancing_loss_func`` of the model's modeling module, with the ``num_experts``,
    ``num_experts_per_tok`` and ``router_aux_loss_coef`` the CausalLM class reads from its
    config)."""

    loss_func: Callable
    num_experts: int
    top_k: int
    coef: float

    @classmethod
    def of(cls, model: nn.Module) -> Optional["RouterAux"]:
        """The router loss of ``model``, or None for a model without one (a dense model).

        Raises ``ValueError`` for an MoE model whose load-balancing loss wmss cannot call the way
        its class does (another signature, or the class lacks the expert counts).
        """
        model = unwrap(model)
        name = type(model).__name__
        loss_func = None
        for klass in type(model).__mro__:  # a user subclass lives in the user's module
            loss_func = getattr(sys.modules.get(klass.__module__), "load_balancing_loss_func", None)
            if loss_func is not None:
                break
        if loss_func is None:
            return None
        parameters = tuple(inspect.signature(loss_func).parameters)
        parameters = parameters[:len(_LOAD_BALANCING_PARAMETERS)]
        settings = {key: getattr(model, key, None)
                    for key in ("num_experts", "num_experts_per_tok", "router_aux_loss_coef")}
        if parameters != _LOAD_BALANCING_PARAMETERS or None in settings.values():
            raise ValueError(
                f"{name}: its router load-balancing loss is not "
                f"load_balancing_loss_func{_LOAD_BALANCING_PARAMETERS} with the model's "
                "num_experts, num_experts_per_tok and router_aux_loss_coef, so wmss cannot add it; "
                "set config.output_router_logits=False to train without it")
        return cls(loss_func, int(settings["num_experts"]), int(settings["num_experts_per_tok"]),
                   float(settings["router_aux_loss_coef"]))

    def __call__(self, router_logits, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """``coef * load_balancing_loss`` as a float32 scalar (router_logits: the backbone's
        per-layer tuple of ``(batch * seq, num_experts)`` tensors)."""
        if router_logits is None:
            raise ValueError("the MoE backbone returned no router_logits although "
                             "output_router_logits=True was passed")
        loss = self.loss_func(router_logits, self.num_experts, self.top_k, attention_mask)
        if not isinstance(loss, torch.Tensor):  # HF returns the int 0 for no router logits
            loss = torch.tensor(float(loss), device=router_logits[0].device)
        return self.coef * loss.float()


def load_causal_lm(path: str, dtype: str = "float32"):
    """``AutoModelForCausalLM.from_pretrained(path)`` in ``dtype`` ("float32", "bfloat16",
    "float16", or "auto": the checkpoint's own), across transformers versions (the keyword was
    ``torch_dtype`` before 5.0)."""
    import transformers
    from transformers import AutoModelForCausalLM

    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    return AutoModelForCausalLM.from_pretrained(
        path, **{key: dtype if dtype == "auto" else getattr(torch, dtype)})
