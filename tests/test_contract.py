"""The engine contract and the public surface: one options type for the three entry points, every
backend (the reference one included) reached through the same ``Engine`` call, and the public
names of the API where users import them."""

import inspect
import math

import pytest
import torch
from conftest import BACKENDS, make_inputs

import wmss
from wmss.loss import LossOptions, engines
from wmss.loss.engines.contract import Engine, FusedEngine, ModelInputs
from wmss.loss.engines.torch_engine import TorchEngine
from wmss.recipe.toy import tiny_causal_lm

# One bad value per option, with the error every entry point must give for it.
BAD_OPTIONS = [
    (dict(lam=1.5), ValueError, "lam must be a finite number in \\[0, 1\\], got 1.5"),
    (dict(lam=math.nan), ValueError, "lam must be a finite number"),
    (dict(lam="0.5"), TypeError, "lam must be a real number, got str"),
    (dict(gap_threshold=math.nan), ValueError, "gap_threshold must be a number or None"),
    (dict(train_weak="yes"), TypeError, "train_weak must be True or False, got str"),
    (dict(backend="cuda"), ValueError, "backend must be one of .*got 'cuda'"),
    (dict(ignore_index=1.5), TypeError, "ignore_index must be an int, got float"),
]


def fused_loss_call(**options):
    inputs, labels = make_inputs(shape=(2, 5), vocab=40, d_strong=16, d_weak=12)
    return wmss.fused_loss(**inputs, labels=labels, **options)


def apply_wmss_call(**options):
    strong = tiny_causal_lm("llama", vocab_size=40, seed=1)
    weak = tiny_causal_lm("llama", vocab_size=40, seed=2)
    return wmss.apply_wmss(strong, weak, **options)


ENTRY_POINTS = {"fused_loss": fused_loss_call, "FusedWMSSLoss": lambda **o: wmss.FusedWMSSLoss(**o),
                "apply_wmss": apply_wmss_call, "LossOptions": lambda **o: LossOptions(**o)}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("option, error, message", BAD_OPTIONS, ids=repr)
def test_every_entry_point_refuses_a_bad_option_with_the_same_message(entry, option, error,
                                                                      message):
    """``FusedWMSSLoss`` and ``apply_wmss`` refuse at construction, before any step."""
    with pytest.raises(error, match=message):
        ENTRY_POINTS[entry](**option)


def test_options_are_normalised_once_and_give_the_engines_their_spec():
    options = LossOptions(lam=1, gap_threshold=0, softcap=30)
    assert type(options.lam) is float and type(options.gap_threshold) is float
    assert options.spec == engines.contract.MixedLossSpec(lam=1.0, softcap=30.0,
                                                          gap_threshold=0.0, ignore_index=-100)
    with pytest.raises(ValueError, match="reduction"):
        options.replace(reduction="avg")
    # The module keeps the options it was built with, and calls with exactly them.
    criterion = wmss.FusedWMSSLoss(lam=0.25, reduction="sum")
    assert criterion.options == LossOptions(lam=0.25, reduction="sum")
    inputs, labels = make_inputs(shape=(2, 5), vocab=40, d_strong=16, d_weak=12)
    assert torch.equal(criterion(*inputs.values(), labels),
                       wmss.fused_loss(**inputs, labels=labels, lam=0.25, reduction="sum"))


def test_the_pair_holds_one_options_object_with_the_heads_softcap():
    pair = apply_wmss_call(lam=0.25, train_weak=False, gap_threshold=0.5, ignore_index=-1)
    assert pair.loss_options == LossOptions(lam=0.25, train_weak=False, gap_threshold=0.5,
                                            ignore_index=-1, return_stats=True)
    assert (pair.lam, pair.train_weak, pair.gap_threshold, pair.ignore_index) == (
        0.25, False, 0.5, -1)


class Recorder:
    """An engine that records each call and hands it to the real engine."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []
        self.supported_dtypes = inner.supported_dtypes

    def mixed_loss(self, strong, weak, labels, spec):
        self.calls.append(("mixed_loss", strong, weak, spec))
        return self.inner.mixed_loss(strong, weak, labels, spec)

    def single_stats(self, model, labels, softcap, ignore_index):
        self.calls.append(("single_stats", model, softcap))
        return self.inner.single_stats(model, labels, softcap, ignore_index)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_is_called_through_the_engine_contract(backend, monkeypatch):
    """No backend is special-cased: the public functions hand each engine flat ``ModelInputs``
    and the options' spec, and return what it computed."""
    real = engines.engine(backend)
    assert isinstance(real, Engine)
    assert isinstance(real, FusedEngine) == (backend != "reference")
    recorder = Recorder(real)
    monkeypatch.setattr(engines, "engine", lambda name: recorder if name == backend else None)
    inputs, labels = make_inputs(shape=(2, 5), vocab=40, d_strong=16, d_weak=12, bias=True)
    loss = wmss.fused_loss(**inputs, labels=labels, lam=0.3, softcap=20.0, backend=backend)
    loss.backward()
    (name, strong, weak, spec), = recorder.calls
    assert name == "mixed_loss" and spec == LossOptions(lam=0.3, softcap=20.0).spec
    assert isinstance(strong, ModelInputs) and strong.hidden.shape == (10, 16)
    assert weak.bias is not None and weak.weight.shape == (40, 12)
    assert inputs["weak_hidden"].grad is not None
    wmss.token_entropy(inputs["strong_hidden"], inputs["strong_weight"], softcap=20.0,
                       backend=backend)
    name, model, softcap = recorder.calls[-1]
    assert name == "single_stats" and model.hidden.shape == (10, 16) and softcap == 20.0


def test_model_inputs_map_keeps_a_missing_bias_missing():
    model = ModelInputs(torch.ones(2, 3), torch.ones(4, 3))
    doubled = model.map(lambda t: 2 * t)
    assert doubled.bias is None and torch.equal(doubled.hidden, 2 * torch.ones(2, 3))
    assert (model.dtype, model.vocab) == (torch.float32, 4)


def test_the_public_api_keeps_its_names_and_signatures():
    """The names and keyword arguments of the public API (docs/design.md, the README)."""
    parameters = list(inspect.signature(wmss.fused_loss).parameters)
    assert parameters == ["strong_hidden", "strong_weight", "weak_hidden", "weak_weight", "labels",
                          "lam", "strong_bias", "weak_bias", "ignore_index", "reduction",
                          "num_items_in_batch", "softcap", "train_weak", "gap_threshold",
                          "return_stats", "backend"]
    defaults = {name: p.default for name, p in inspect.signature(wmss.fused_loss).parameters.items()
                if p.default is not inspect.Parameter.empty}
    assert defaults == dict(lam=0.5, strong_bias=None, weak_bias=None, ignore_index=-100,
                            reduction="mean", num_items_in_batch=None, softcap=None,
                            train_weak=True, gap_threshold=None, return_stats=False,
                            backend="auto")
    # apply_wmss: train_weak=None is True, but False for a LoRA pair's weak_model="base".
    defaults = {name: p.default for name, p in inspect.signature(wmss.apply_wmss).parameters.items()
                if p.default is not inspect.Parameter.empty}
    assert defaults == dict(lam=0.5, train_weak=None, gap_threshold=None, backend="auto",
                            ignore_index=-100, use_liger=False)
    assert list(inspect.signature(wmss.token_entropy).parameters) == [
        "hidden", "weight", "labels", "bias", "softcap", "ignore_index", "backend"]
    assert list(inspect.signature(wmss.apply_wmss).parameters) == [
        "strong_model", "weak_model", "lam", "train_weak", "gap_threshold", "backend",
        "ignore_index", "use_liger"]
    from wmss import selection

    for name in ("sampling_weights", "draw_active", "score_dataset"):
        assert callable(getattr(selection, name))


def test_modules_users_import_by_their_old_names_are_the_modules_themselves():
    import wmss.pair
    import wmss.pipeline
    import wmss.selection
    import wmss.trainer
    from wmss.selection import draw_active
    from wmss.trainer import WMSSSFTTrainer, WMSSTrainer, training_arguments

    assert wmss.selection is wmss.recipe.selection and draw_active is wmss.selection.draw_active
    assert wmss.pipeline is wmss.recipe.pipeline
    assert wmss.trainer is wmss.hf.trainer and WMSSTrainer is wmss.WMSSTrainer
    assert WMSSSFTTrainer is wmss.WMSSSFTTrainer
    assert training_arguments is wmss.training_arguments
    assert wmss.pair is wmss.hf.pair and wmss.WMSSPair is wmss.hf.pair.WMSSPair


def test_submodules_of_old_names_are_the_modules_themselves_too():
    import wmss.selection.flow
    from wmss.selection.signatures import HASH_CHUNK_BYTES

    assert wmss.selection.flow is wmss.recipe.selection.flow
    assert HASH_CHUNK_BYTES == wmss.recipe.selection.signatures.HASH_CHUNK_BYTES
    assert wmss.selection.flow.__spec__.name == "wmss.recipe.selection.flow"


def test_a_pairs_options_can_be_set_and_are_checked():
    pair = apply_wmss_call(lam=0.5)
    pair.lam = 0.25  # e.g. a schedule over training
    assert pair.loss_options.lam == 0.25 and pair.lam == 0.25
    with pytest.raises(ValueError, match="lam must be a finite number in \\[0, 1\\]"):
        pair.lam = 2.0
    assert pair.lam == 0.25
    with pytest.raises(AttributeError):
        pair.train_weak = False  # which parameters train is fixed when the pair is built
    again = wmss.WMSSPair(pair.strong, pair.weak, lam=0.25, train_weak=True)
    assert again.loss_options == pair.loss_options


class LocalState(TorchEngine):
    """A fused engine with an attribute the custom ops cannot carry as text."""

    def __init__(self):
        super().__init__()
        self.dtype = torch.float32


def test_a_fused_engine_whose_configuration_is_not_plain_values_is_refused_by_name():
    inputs, labels = make_inputs(shape=(2, 5), vocab=40, d_strong=16, d_weak=12)
    strong = ModelInputs(inputs["strong_hidden"].reshape(-1, 16), inputs["strong_weight"])
    weak = ModelInputs(inputs["weak_hidden"].reshape(-1, 12), inputs["weak_weight"])
    with pytest.raises(TypeError, match="LocalState's attributes must be plain Python values"):
        LocalState().mixed_loss(strong, weak, labels.reshape(-1), LossOptions().spec)
    assert engines.engine("torch").key.startswith("wmss.loss.engines.torch_engine|TorchEngine|")
