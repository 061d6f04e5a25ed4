"""``wmss.apply_wmss``: the fused WMSS loss for any pair of Hugging Face causal LMs.

``WMSSPair`` holds the strong and the weak model as submodules (their parameters are the pair's
parameters, so one optimizer trains both) and replaces their logits and cross-entropy by
``wmss.fused_loss`` on the two backbones' final hidden states. It works with ``transformers.Trainer``
(see ``wmss.trainer.WMSSTrainer``), TRL, accelerate/DDP, or a plain loop::

    pair = wmss.apply_wmss(strong, weak, lam=0.5)
    out = pair(input_ids=ids, attention_mask=mask, labels=labels)  # labels as for the HF model
    out.loss.backward()
    pair.save_pretrained("strong-out")                             # the strong model alone
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn
from transformers.utils import ModelOutput

from .. import defaults
from ..loss import LossOptions, TokenStats, fused_loss_with
from .batches import shift_labels as shift
from ..validation import check_flag
from .lora import AdapterView, adapter_view, checkpointing_enabled, is_peft_model, save_strong
from .models import LMHead, RouterAux, backbone_outputs, is_zero3_parameter, unwrap


@dataclass
class WMSSOutput(ModelOutput):
    """Output of ``WMSSPair.forward``; no logits.

    Attributes:
        loss: the mixed loss (float32 scalar), as ``wmss.fused_loss`` reduces it, plus the router
            auxiliary loss when asked (see ``WMSSPair.forward``); None without labels.
        strong_loss: mean plain cross-entropy of the strong model over supervised tokens (logging).
        weak_loss: the same for the weak model.
        entropy_strong, entropy_weak: mean next-token entropies over supervised tokens.
        mixed_fraction: share of supervised tokens trained with the mixed loss (1 without gap masking).
        num_tokens: number of supervised (shifted) tokens the means above average over (int64
            scalar); a trainer weights the means by it to average over several batches.
        aux_loss: ``sum(router_aux_loss_coef * load_balancing_loss)`` of the trained MoE models
            (float32 scalar) when router logits were asked for, else None.
        stats: per-token ``wmss.TokenStats`` shaped like the (shifted) labels.
    """

    loss: Optional[torch.Tensor] = None
    strong_loss: Optional[torch.Tensor] = None
    weak_loss: Optional[torch.Tensor] = None
    entropy_strong: Optional[torch.Tensor] = None
    entropy_weak: Optional[torch.Tensor] = None
    mixed_fraction: Optional[torch.Tensor] = None
    num_tokens: Optional[torch.Tensor] = None
    aux_loss: Optional[torch.Tensor] = None
    stats: Optional[TokenStats] = None

    @property
    def logits(self):
        """Never built: reading them raises ``AttributeError`` saying which trainer to use."""
        # TRL's SFTTrainer of older releases (0.19, for one) runs the pair's forward, then reads
        # outputs.logits for its token accuracy; without this it fails with a bare "'WMSSOutput'
        # object has no attribute 'logits'".
        raise AttributeError(_NO_LOGITS)


_NO_LOGITS = (
    "WMSSOutput has no logits (the pair never builds them): the trainer that read them expects a "
    "plain causal LM (TRL's SFTTrainer does), not a WMSSPair; train the pair with "
    "wmss.WMSSSFTTrainer or wmss.WMSSTrainer instead.")


_NO_BACKBONE = (
    "WMSSPair has no single backbone (base_model): something tried to run the strong model's "
    "backbone and head alone, which would bypass the WMSS loss. TRL's SFTTrainer does this when it "
    "installs its own fused LM head; train the pair with wmss.WMSSSFTTrainer or "
    "wmss.WMSSTrainer instead.")

_NO_CHECKPOINTING_WITH_ADAPTERS = (
    "activation checkpointing cannot be used with weak_model='adapter:NAME': the two models "
    "share their layers and switch adapters between their forwards, so a layer recomputed in the "
    "backward would use the wrong adapter; turn activation checkpointing off, or freeze the weak "
    "model (train_weak=False, or weak_model='base'), whose forward runs without autograd")


class FusedHeads(nn.Module):
    """The fused loss on the two models' lm heads: the one module of the pair that reads the
    heads' weights (``LMHead.model_inputs``; ``lm_head.forward`` never runs, it would build the
    logits).

    It has no parameters (the heads stay their models'), and holds the two models without
    registering them (the pair does). Under DeepSpeed ZeRO-3 the heads' weights and biases are its
    external parameters (``deepspeed.zero.register_external_parameter``): DeepSpeed's hooks on it
    gather the full ``(V, d)`` weights for its forward and again for its backward, and the heads'
    gradients are reduced into their partitions by DeepSpeed as any parameter's; a tied head (the
    embeddings' weight) gets both uses' gradients. The pair registers them when the models are
    partitioned already (built under ``deepspeed.zero.Init``); for models ``deepspeed.initialize``
    partitions, DeepSpeed registers them itself when this module's forward first reads them.
    Only tensors are passed positionally: DeepSpeed's hooks track them for the backward.
    """

    def __init__(self, strong: nn.Module, weak: nn.Module):
        super().__init__()
        object.__setattr__(self, "models", (strong, weak))

    def heads(self) -> tuple[LMHead, LMHead]:
        return LMHead.of(self.models[0]), LMHead.of(self.models[1])

    def register_zero3_heads(self) -> None:
        """Make the heads' ZeRO-3 parameters (if any) external parameters of this module."""
        params = [p for head in self.heads() for p in (head.weight, head.bias)
                  if is_zero3_parameter(p)]
        if params:
            import deepspeed  # a ZeRO-3 parameter exists: deepspeed is imported

            for param in params:
                deepspeed.zero.register_external_parameter(self, param)

    def forward(self, hidden_strong: torch.Tensor, hidden_weak: torch.Tensor,
                targets: torch.Tensor, num_items_in_batch=None, *,
                options: LossOptions) -> tuple[torch.Tensor, ...]:
        """``(loss, *TokenStats fields)`` of ``fused_loss_with(options, ...)`` for the backbones'
        final hidden states ``(batch, seq, d)`` and shifted ``targets`` ``(batch, seq)``."""
        strong_head, weak_head = self.heads()
        loss, stats = fused_loss_with(options, strong_head.model_inputs(hidden_strong),
                                      weak_head.model_inputs(hidden_weak), targets,
                                      num_items_in_batch)
        return (loss, *(getattr(stats, f.name) for f in dataclasses.fields(stats)))


class WMSSPair(nn.Module):
    """A strong and a weak causal LM trained together through the fused mixed-logit loss.

    Build it with ``wmss.apply_wmss``. Attributes HF's Trainer reads: ``accepts_loss_kwargs`` (it
    passes ``num_items_in_batch``) and ``loss_type = "ForCausalLM"`` (recent versions of a plain
    Trainer then count ``num_items_in_batch`` on shifted labels, though always with -100 as the
    ignored label; ``WMSSTrainer`` counts it itself, with the pair's ``ignore_index``).
    """

    accepts_loss_kwargs = True
    loss_type = "ForCausalLM"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True

    def __init__(self, strong: nn.Module, weak: nn.Module, options: Optional[LossOptions] = None,
                 **option_values):
        """``options``, or the ``LossOptions`` fields as keywords (``lam=...``); prefer
        ``wmss.apply_wmss``, which checks the pair and takes LoRA pairs too."""
        if options is None:
            options = LossOptions(**option_values)
        elif option_values:
            raise TypeError(f"WMSSPair takes options or option keywords, not both (got "
                            f"{sorted(option_values)})")
        super().__init__()
        self.strong, self.weak = strong, weak
        strong_head, weak_head = LMHead.of(strong), LMHead.of(weak)
        if strong_head.vocab_size != weak_head.vocab_size:
            raise ValueError(
                f"vocabulary mismatch: the strong model's head has {strong_head.vocab_size} rows "
                f"and the weak model's {weak_head.vocab_size}; WMSS mixes logits token by token, "
                "so both models need the same vocabulary (resize_token_embeddings one of them)")
        if strong_head.softcap != weak_head.softcap:
            raise ValueError(f"the strong model soft-caps its logits at {strong_head.softcap} and the "
                             f"weak model at {weak_head.softcap}; they must agree")
        # The loss's options, the heads' soft-cap included; the pair reduces with "mean" and
        # reads the per-token statistics for its logged means.
        self.loss_options = options.replace(softcap=strong_head.softcap, reduction="mean",
                                            return_stats=True)
        for name, model, head in (("strong", strong, strong_head), ("weak", weak, weak_head)):
            try:
                head.verify(model)
            except ValueError as error:
                raise ValueError(f"{name} model: {error}") from None
        # Each model's router loss (None for a dense model), or why it cannot be computed.
        self._router_aux: dict[str, Optional[RouterAux]] = {}
        self._router_error: dict[str, str] = {}
        for name, model in (("strong", strong), ("weak", weak)):
            try:
                self._router_aux[name] = RouterAux.of(model)
            except ValueError as error:
                self._router_aux[name], self._router_error[name] = None, str(error)
                if self._config_wants_router_logits(model) and (
                        name == "strong" or options.train_weak):
                    raise ValueError(f"{name} model: {error}") from None
        if not options.train_weak and not isinstance(weak, AdapterView):
            weak.requires_grad_(False)  # a view's adapters were set by adapter_view
        self.fused_heads = FusedHeads(strong, weak)
        self.fused_heads.register_zero3_heads()

    def _option(name: str, settable: bool = True):
        """A loss option as an attribute; setting it (e.g. a lam schedule) checks the new value
        and applies from the next forward."""
        def get(self):
            return getattr(self.loss_options, name)

        def set_(self, value):
            self.loss_options = self.loss_options.replace(**{name: value})

        return property(get, set_ if settable else None, doc=f"The loss option {name!r}.")

    lam, gap_threshold, backend, ignore_index = (
        _option("lam"), _option("gap_threshold"), _option("backend"), _option("ignore_index"))
    # Freezing or unfreezing changes which parameters train: build a new pair for that.
    train_weak = _option("train_weak", settable=False)
    del _option

    @staticmethod
    def _config_wants_router_logits(model: nn.Module) -> bool:
        return bool(getattr(getattr(unwrap(model), "config", None), "output_router_logits", False))

    def _router_requests(self, output_router_logits: Optional[bool]) -> dict[str, bool]:
        """Which models' router losses to add: the trained MoE models, when the caller asks
        (``output_router_logits=True``) or, when it says nothing, when their config asks."""
        trained = {"strong": self.strong, **({"weak": self.weak} if self.train_weak else {})}
        requests = {}
        for name, model in trained.items():
            asked = (self._config_wants_router_logits(model) if output_router_logits is None
                     else bool(output_router_logits))
            if asked and name in self._router_error:
                raise ValueError(f"{name} model: {self._router_error[name]}")
            requests[name] = asked and self._router_aux[name] is not None
        if output_router_logits and not any(requests.values()):
            raise ValueError("output_router_logits=True, but no trained model of the pair is a "
                             "mixture-of-experts model with a router load-balancing loss")
        return requests

    def __getattr__(self, name: str):
        """Attributes the pair lacks come from the strong model (its ``config``,
        ``generation_config``, ``add_model_tags``...), as trainers expect of the model they train;
        this is the model that is kept, saved and evaluated."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("strong", "weak"):  # not registered yet (during __init__)
                raise
            if name == "base_model":
                raise AttributeError(_NO_BACKBONE) from None
            return getattr(unwrap(self.strong), name)

    def enable_input_require_grads(self) -> None:
        """For activation checkpointing with frozen embeddings (PEFT): both models."""
        for model in (self.strong, self.weak):
            unwrap(model).enable_input_require_grads()

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, num_items_in_batch=None,
                return_stats: bool = False, shift_labels: Optional[torch.Tensor] = None,
                output_router_logits: Optional[bool] = None, **model_kwargs) -> WMSSOutput:
        """Both backbones on the same batch, then the fused loss on their final hidden states.

        Args:
            input_ids, attention_mask: ``(batch, seq)``, as for the HF models.
            labels: ``(batch, seq)`` HF convention (shifted inside; ``ignore_index`` ignored).
            num_items_in_batch: supervised tokens of the whole accumulated batch (HF Trainer passes
                it; the loss is then ``sum / num_items_in_batch``).
            return_stats: also return the per-token ``TokenStats``.
            shift_labels: labels already shifted (HF's context/sequence-parallel convention);
                replaces ``labels``.
            output_router_logits: add the router load-balancing loss of the trained
                mixture-of-experts models (the strong one, and the weak one when it is trained),
                ``router_aux_loss_coef * load_balancing_loss`` as their own classes add it; None
                (default) follows each model's ``config.output_router_logits``. Without
                ``num_items_in_batch`` the loss is the mixed loss plus that term, as the HF model's
                loss is; with it, the term is weighted by this batch's share of the supervised
                tokens (``num_tokens / num_items_in_batch``), so over an accumulated (or
                distributed) batch the router term is the token-weighted mean of the micro-batches'
                and its weight does not grow with the number of micro-batches.
            model_kwargs: forwarded to both backbones (e.g. ``position_ids``).
        """
        for key in ("return_dict", "use_cache", "fused_lm_head"):
            model_kwargs.pop(key, None)
        routers = self._router_requests(output_router_logits)

        def run(name, model):
            kwargs = dict(model_kwargs)
            if self._router_aux[name] is not None:  # only MoE backbones take the flag
                kwargs["output_router_logits"] = routers.get(name, False)
            out = backbone_outputs(model, input_ids, attention_mask, **kwargs)
            aux = (self._router_aux[name](out.router_logits, attention_mask)
                   if routers.get(name) else None)
            return out.last_hidden_state, aux

        hidden_s, aux_s = run("strong", self.strong)
        frozen = not self.train_weak or not torch.is_grad_enabled()
        if not frozen and self._shares_weights and checkpointing_enabled(unwrap(self.strong)):
            raise ValueError(_NO_CHECKPOINTING_WITH_ADAPTERS)
        with torch.no_grad() if frozen else contextlib.nullcontext(), self._weak_active():
            hidden_w, aux_w = run("weak", self.weak)
        terms = [aux for aux in (aux_s, aux_w) if aux is not None]
        aux_loss = sum(terms[1:], terms[0]) if terms else None
        if labels is None and shift_labels is None:
            return WMSSOutput(aux_loss=aux_loss)

        targets = (shift_labels if shift_labels is not None
                   else shift(labels, self.ignore_index))
        loss, *fields = self.fused_heads(hidden_s, hidden_w, targets, num_items_in_batch,
                                         options=self.loss_options)
        stats = TokenStats(*fields)
        supervised = targets != self.ignore_index
        num_tokens = supervised.sum()
        count = num_tokens.clamp(min=1)
        if aux_loss is not None:
            aux_loss = aux_loss.to(loss.device)
            if num_items_in_batch is None:
                loss = loss + aux_loss
            else:
                total = torch.as_tensor(num_items_in_batch, device=loss.device)
                loss = loss + aux_loss * num_tokens / total.to(torch.float32).clamp(min=1)

        def mean(values):
            return values.float().sum() / count

        return WMSSOutput(loss=loss, strong_loss=-mean(stats.logprob_strong),
                          weak_loss=-mean(stats.logprob_weak),
                          entropy_strong=mean(stats.entropy_strong),
                          entropy_weak=mean(stats.entropy_weak),
                          mixed_fraction=mean(stats.mixed), num_tokens=num_tokens,
                          aux_loss=aux_loss, stats=stats if return_stats else None)

    @property
    def _shares_weights(self) -> bool:
        """A LoRA pair: the weak model is a view of the strong PEFT model."""
        return isinstance(self.weak, AdapterView)

    def models_with_weights(self) -> dict[str, nn.Module]:
        """The models holding weights of their own, by name: both, or for a LoRA pair the strong
        (PEFT) model alone, which holds the weak adapter too."""
        if self._shares_weights:
            return {"strong": self.strong}
        return {"strong": self.strong, "weak": self.weak}

    def _weak_active(self):
        return self.weak.active() if self._shares_weights else contextlib.nullcontext()

    def save_pretrained(self, save_directory, *, merged: bool = False, **kwargs) -> None:
        """Save the strong model alone, loadable by ``AutoModelForCausalLM.from_pretrained``.

        A PEFT strong model is saved as its active adapter (``adapter_config.json`` and the
        adapter's weights, which ``AutoModelForCausalLM`` and ``PeftModel.from_pretrained`` load
        onto the base model), or with ``merged=True`` as a full model with the adapter merged into
        a copy of the base weights (the pair's own weights are left as they are).
        """
        check_flag("merged", merged)
        if is_peft_model(self.strong):
            save_strong(self.strong, save_directory, merged=merged, **kwargs)
        else:
            unwrap(self.strong).save_pretrained(save_directory, **kwargs)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **kwargs):
        """Checkpoint the activations of both models (HF Trainer's ``activation_checkpointing``)."""
        if self._shares_weights and self.train_weak:
            raise ValueError(_NO_CHECKPOINTING_WITH_ADAPTERS)
        for wrapped in (self.strong, self.weak):
            model = unwrap(wrapped)
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(
                    activation_checkpointing_kwargs=activation_checkpointing_kwargs, **kwargs)
            else:  # transformers < 5
                model.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs=activation_checkpointing_kwargs)
            if is_peft_model(wrapped) or isinstance(wrapped, AdapterView):
                # PEFT freezes the embeddings: reentrant checkpointing (transformers 4's default)
                # would then see no input that needs a gradient and cut the adapters off.
                model.enable_input_require_grads()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs):
        """Alias of ``activation_checkpointing_enable`` (the name transformers < 5 uses)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)


def apply_wmss(strong_model: nn.Module, weak_model: Union[nn.Module, str],
               lam: float = defaults.LAMBDA, train_weak: Optional[bool] = None,
               gap_threshold: Optional[float] = None, backend: str = "auto", *,
               ignore_index: int = defaults.IGNORE_INDEX, use_liger: bool = False) -> WMSSPair:
    """Wrap a strong and a weak HF causal LM into a ``WMSSPair`` trained by the fused loss.

    Args:
        strong_model: a transformers causal LM (PEFT-wrapped ones too) whose lm head is a plain
            linear layer. Gemma's final-logit soft-capping and Cohere/Granite logit scales are
            applied; any other head transform is detected (by comparing with the model's own
            logits on a few tokens) and refused with a ValueError.
        weak_model: another such model with the same vocabulary; or, when ``strong_model`` is a
            PEFT model, a LoRA pair on its one base model (see ``wmss.hf.lora``): ``"base"`` (the
            base with the adapters disabled; frozen) or ``"adapter:NAME"`` (the base with the
            PEFT model's adapter ``NAME``; trained unless ``train_weak=False``).
        lam: mixing weight of the strong logits.
        train_weak: False freezes the weak model (``requires_grad_(False)``, or the weak adapter
            alone; run without autograd). None (default): True, but False for ``"base"``.
        gap_threshold: gap masking (see ``wmss.fused_loss``); None mixes every supervised token.
        backend: as for ``wmss.fused_loss``.
        ignore_index: label value that is not supervised.
        use_liger: also apply Liger-Kernel's RMSNorm, RoPE and SwiGLU kernels to both models
            (CUDA only; their loss and logits are left alone: wmss computes the loss).

    Nothing is patched globally; the models are used as they are (the weak model is only frozen
    when ``train_weak`` is False).
    """
    if train_weak is not None:
        check_flag("train_weak", train_weak)
    # Every option is checked before anything changes (adapter_view sets requires_grad flags).
    options = LossOptions(lam=lam, train_weak=True if train_weak is None else train_weak,
                          gap_threshold=gap_threshold, backend=backend, ignore_index=ignore_index)
    check_flag("use_liger", use_liger)
    if isinstance(weak_model, str):
        weak_model, weak_trained = adapter_view(strong_model, weak_model, train_weak)
        options = options.replace(train_weak=weak_trained)
    if strong_model is weak_model:
        raise ValueError("strong_model and weak_model are the same object; WMSS needs two models "
                         "(load the weak checkpoint separately, or name the weak model inside a "
                         "PEFT strong model: 'base' or 'adapter:NAME')")
    if use_liger:
        _apply_liger(strong_model, *(() if isinstance(weak_model, AdapterView) else (weak_model,)))
    return WMSSPair(strong_model, weak_model, options)


def _apply_liger(*models: nn.Module) -> None:
    """Liger-Kernel's per-instance RMSNorm/RoPE/SwiGLU kernels (never its loss or logits code)."""
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError as error:
        raise ValueError("use_liger=True needs the liger-kernel package "
                         "(pip install liger-kernel)") from error
    for model in models:
        device = next(unwrap(model).parameters()).device
        if device.type != "cuda":
            raise ValueError(f"use_liger=True needs the models on CUDA (found {device})")
        _apply_liger_kernel_to_instance(model=unwrap(model), rope=True, rms_norm=True, swiglu=True,
                                        cross_entropy=False, fused_linear_cross_entropy=False)
