"""Per-example layer inputs and output gradients, captured with hooks.

Only module outputs require grad during a pass: parameters are frozen, and the first tracked
layer's output becomes a leaf, so autograd computes no parameter gradients and nothing upstream
of the first tracked layer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._warn import warn


def _is_hf_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 Conv1D: y = x W + b with W (d_in, d_out); matched by name so transformers
    # stays an optional dependency.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def layer_kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Conv1d):
        return "nn_conv1d"  # torch's convolution ("conv1d" is transformers' Conv1D, a linear layer)
    if _is_hf_conv1d(module):
        return "conv1d"
    return None


# Convolutions: a token is an output position, its input the unfolded patch (channels × kernel).
CONVOLUTIONS = ("conv2d", "nn_conv1d")


@dataclass(frozen=True)
class LayerSpec:
    """A tracked layer as the math sees it: gradient matrix (d_out, d_a), d_a = d_in (+1 bias column, last).

    A grouped convolution is `groups` layers, one per group, named "module[g]": group g maps input
    channels [g·C_in/G, (g+1)·C_in/G) to output channels [g·C_out/G, (g+1)·C_out/G) with weights of its
    own, and its weights' gradient never sees the other groups' inputs, so each group has Kronecker
    factors of its own (kronfluence instead averages the inputs over the groups, which is not the
    gradient). d_in and d_out are the group's."""

    name: str
    kind: str
    d_in: int
    d_out: int
    has_bias: bool
    group: int = 0
    groups: int = 1

    @property
    def d_a(self) -> int:
        return self.d_in + int(self.has_bias)

    @property
    def module(self) -> str:
        """The module's name (a group's layer is named "module[g]")."""
        return self.name if self.groups == 1 else self.name[: self.name.rindex("[")]

    @classmethod
    def of(cls, name: str, module: nn.Module) -> list[LayerSpec]:
        """The module's layer, or a grouped convolution's layer per group."""
        kind = layer_kind(module)
        groups = 1
        if kind == "linear":
            d_in, d_out = module.in_features, module.out_features
        elif kind in CONVOLUTIONS:
            if module.padding_mode != "zeros":
                raise ValueError(f"module {name!r}: {type(module).__name__} padding_mode={module.padding_mode!r} is not "
                                 "supported; to attribute through the other layers, name them in the task's "
                                 "get_influence_tracked_modules")
            groups = module.groups
            d_in = module.in_channels // groups * math.prod(module.kernel_size)
            d_out = module.out_channels // groups
        elif kind == "conv1d":
            d_in, d_out = module.weight.shape
        else:
            raise TypeError(
                f"module {name!r} is a {type(module).__name__}; supported layers are nn.Linear, nn.Conv2d, "
                "nn.Conv1d and transformers' Conv1D"
            )
        has_bias = getattr(module, "bias", None) is not None
        if groups == 1:
            return [cls(name, kind, int(d_in), int(d_out), has_bias)]
        return [cls(f"{name}[{g}]", kind, int(d_in), int(d_out), has_bias, g, groups) for g in range(groups)]

    def whole(self) -> LayerSpec:
        """The module's layer as capture sees it: all of a grouped convolution's channels."""
        if self.groups == 1:
            return self
        return dataclasses.replace(self, name=self.module, d_in=self.d_in * self.groups,
                                   d_out=self.d_out * self.groups, group=0, groups=1)

    def param_matrix(self, params: dict[str, Tensor]) -> Tensor:
        """The layer's parameters (weight, bias) as one (d_out, d_a) matrix, from a name → tensor dict
        (a group's: its output channels' rows of the convolution's weight, which holds only its group's
        input channels)."""
        rows = slice(self.group * self.d_out, (self.group + 1) * self.d_out)
        w = params[f"{self.module}.weight"]
        w = w.T if self.kind == "conv1d" else w[rows].reshape(self.d_out, self.d_in)
        if self.has_bias:
            w = torch.cat([w, params[f"{self.module}.bias"][rows].reshape(self.d_out, 1)], dim=1)
        return w


# Marks a parameter that exists only to be there and never trains: kronfluence's `_constant`, which
# interop.kronfluence.prepare_model adds so that DistributedDataParallel accepts a frozen model.
PLACEHOLDER = "_source_fast_placeholder"


def is_placeholder(p: nn.Parameter) -> bool:
    return getattr(p, PLACEHOLDER, False)


def _refuse_sharded(model: nn.Module) -> None:
    """Layers split over ranks cannot be captured whole: FSDP's (fully_shard's DTensor parameters, or
    FullyShardedDataParallel's flat ones), tensor parallelism's (DTensors), DeepSpeed ZeRO-3's (each
    parameter a partition, with a ds_tensor)."""
    # Only what a sharded model has imported is looked for: importing FSDP or DTensor here, for every
    # model, made gloo's processes abort at exit (3 of 12 runs of a 2-rank fit).
    tensor = sys.modules.get("torch.distributed.tensor") or sys.modules.get("torch.distributed._tensor")
    dtensor = getattr(tensor, "DTensor", ())  # () where not imported: isinstance(x, ()) is False
    fsdp = getattr(sys.modules.get("torch.distributed.fsdp"), "FullyShardedDataParallel", ())
    sharded = next((f"{n!r} is a DTensor" for n, p in model.named_parameters() if isinstance(p, dtensor)), None)
    sharded = sharded or next((f"DeepSpeed ZeRO-3: {n!r} is a partition" for n, p in model.named_parameters()
                               if hasattr(p, "ds_tensor")), None)
    if sharded is not None or any(isinstance(m, fsdp) for m in model.modules()):
        raise ValueError(
            f"the model's parameters are split over the ranks ({sharded or 'FullyShardedDataParallel'}): "
            "source_fast reads whole layers (their weights and per-layer factors), so give every rank the whole "
            "model, plain or in DistributedDataParallel: each rank then fits on and scores its share of the "
            "data. Checkpoints FSDP and DeepSpeed save in the ranks' pieces are read (see the README)")


def tracked_layers(model: nn.Module, names: list[str] | None) -> list[LayerSpec]:
    """The named modules, or by default every supported layer that trains. A layer that did not train
    carries no training-data effect, so with some layers frozen (requires_grad=False: fine-tuning the
    top, LoRA's frozen base) the default leaves them out, and naming one gets a warning; a model frozen
    whole was frozen after training, and all its layers count."""
    modules = dict(model.named_modules())
    _refuse_sharded(model)
    some_train = any(p.requires_grad and not is_placeholder(p) for p in model.parameters())
    if not some_train and names is None and any("lora_A" in n.split(".") for n in modules):
        # A LoRA model frozen whole was loaded for inference: read as frozen after training, every base
        # layer would count as trained, while only the adapters did.
        raise ValueError("the model has LoRA adapters (lora_A / lora_B modules) and no parameter that trains: load "
                         "it as it was trained (PeftModel.from_pretrained(..., is_trainable=True)), so the adapters "
                         "are tracked, or name the modules to track in the task's get_influence_tracked_modules")
    frozen = {n for n, m in modules.items()
              if some_train and not any(p.requires_grad and not is_placeholder(p) for p in m.parameters(recurse=False))}
    if names is None:
        # nn.MultiheadAttention uses its out_proj's weights without calling it (and its in-projection is a
        # bare parameter): there is no layer call to capture, so the default leaves it out, and says so.
        attention = [n for n, m in modules.items() if isinstance(m, nn.MultiheadAttention) and n not in frozen]
        unseen = {f"{n}.out_proj" if n else "out_proj" for n in attention}
        if attention:
            warn(f"nn.MultiheadAttention modules {attention[:8]} are not tracked: they compute their projections "
                 "from their weights without calling a layer, so their part of the scores is left out")
        specs = [s for n, m in modules.items() if layer_kind(m) is not None and n not in frozen and n not in unseen
                 for s in LayerSpec.of(n, m)]
        if not specs:
            raise ValueError("the model has no nn.Linear, nn.Conv2d, nn.Conv1d or Conv1D layer to track (that trains)")
        _check_examples_first(specs, modules)
        _warn_untracked(model, specs, attention, some_train)
        return specs
    if isinstance(names, str):  # a str is a sequence too: "fc1" would be the modules 'f', 'c' and '1'
        raise ValueError(f"the task's get_influence_tracked_modules returned the string {names!r}: return a list of "
                         f"module names ([{names!r}] for that one module)")
    if not names:
        raise ValueError("the task's get_influence_tracked_modules returned no modules: name the layers to track, or "
                         "return None to track every layer that trains")
    if len(set(names)) != len(names):
        raise ValueError(f"tracked modules are listed more than once: {names}")
    specs = []
    for name in names:
        if name not in modules:
            base = name[: name.rfind("[")] if name.endswith("]") else None
            if base in modules and getattr(modules[base], "groups", 1) > 1 and layer_kind(modules[base]) is not None:
                raise ValueError(f"tracked module {name!r} does not exist in the model: a grouped convolution's groups are "
                                 f"tracked together, as its module {base!r}")
            close = [n for n in modules if n and (name in n or n in name)][:5]
            raise ValueError(f"tracked module {name!r} does not exist in the model" + (f" (close: {close})" if close else ""))
        specs += LayerSpec.of(name, modules[name])
    _check_examples_first(specs, modules)
    named_frozen = [n for n in names if n in frozen]
    if named_frozen:
        warn(f"tracked modules {named_frozen[:8]} are frozen (requires_grad=False) while others train: a "
             "layer that did not train carries no training-data effect, so their part of the scores is not "
             "one")
    return specs


def _check_examples_first(specs: list[LayerSpec], modules: dict[str, nn.Module]) -> None:
    """torch's transformer layers built with batch_first=False feed their linear layers (tokens, batch,
    features): the tokens would be read as examples, silently when there are as many as examples."""
    for s in specs:
        parts = s.name.split(".")
        for outer in (modules.get(".".join(parts[:k])) for k in range(len(parts))):  # a LoRA layer's too
            if isinstance(outer, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)) and not outer.self_attn.batch_first:
                raise ValueError(f"module {s.name!r} is in a {type(outer).__name__} built with batch_first=False, "
                                 "which feeds it (tokens, batch, features); examples must be the first dimension: build "
                                 "the layers with batch_first=True (the same weights) and give them (batch, tokens, "
                                 "features)")


def _warn_untracked(model: nn.Module, specs: list[LayerSpec], said: list[str], some_train: bool) -> None:
    """Default tracking sees layers, not bare parameters: a mixture of experts' weights (3-D tensors its
    module multiplies by itself) would be left out without a word. Embeddings and normalization layers
    are left out by design, and attention modules `said` already; anything else that trains (any
    parameter, in a model frozen whole) and is not a tracked layer's (a parametrized weight's original
    included) is named when it is a tenth of the trainable parameters or more."""
    tracked = {id(p) for s in specs for p in model.get_submodule(s.module).parameters()}
    total, left = 0, {}
    for name, module in model.named_modules():
        kind = type(module).__name__  # ViTEmbeddings' bare position and class tokens are embeddings too
        design = (bool(name) and ("Embedding" in kind or "Norm" in kind)
                  or any(name == a or name.startswith(a + ".") for a in said))
        for p in module.parameters(recurse=False):
            if (some_train and not p.requires_grad) or is_placeholder(p):
                continue
            total += p.numel()
            if id(p) not in tracked and not design:
                left[name] = left.get(name, 0) + p.numel()
    if sum(left.values()) >= 0.1 * total > 0:
        largest = [n or "the model's own" for n in sorted(left, key=left.get, reverse=True)[:4]]
        warn(f"{sum(left.values()) / total:.0%} of the parameters that train are outside the layers source_fast "
             f"tracks (nn.Linear, nn.Conv1d/2d, Conv1D), e.g. in {largest} (a mixture of experts' weights, used "
             "without a layer call?): their part of the scores is left out")


@dataclass
class Captured:
    """One tracked layer on one batch. a: (n, t, d_in) inputs (no ones column), g: (n, t, d_out)
    output gradients of the summed loss, mask: (n, t) or None. The mask drops padded tokens from the
    covariance of a; gradients take every token, padded ones included (zero unless the loss reads
    them), with NaN and inf at padded tokens set to 0 (values the loss does not read: it is finite).
    half: the layer computed in float16 (a float16 model, or float16 autocast), for error messages."""

    a: Tensor
    g: Tensor | None
    mask: Tensor | None
    half: bool = False
    calls: int = 1  # a shared (re-used) layer's calls in the forward pass, their tokens one after another
    call: int = 0  # which call of the module in the forward pass this is (calls under no_grad counted): its mask
    # Read from (examples × k, t, features) rows with t > 1 (Swin's windows, a video's frames): its tokens
    # are windows or frames one after another, not positions in the examples' sequences.
    regrouped: bool = False
    selected: bool = False  # its rows were picked by indexing (a mixture of experts' share of the tokens?)


def _joined(name: str, calls: list[Captured]) -> Captured:
    """A shared layer's calls as one record: tokens of call 1, then call 2, ... A call whose output
    did not reach the loss contributes zero output gradients."""
    sizes = {c.a.shape[0] for c in calls}
    if len(sizes) > 1:
        raise ValueError(f"module {name!r} ran {len(calls)} times in one forward pass on {sorted(sizes)} examples: "
                         "a shared layer must see the same examples in every call")
    n = calls[0].a.shape[0]
    with_g = [c.g for c in calls if c.g is not None]
    g = None if not with_g else torch.cat([
        c.g if c.g is not None else with_g[0].new_zeros(n, c.a.shape[1], with_g[0].shape[2]) for c in calls], 1)
    masks = [c.mask for c in calls if c.mask is not None]
    mask = None if not masks else torch.cat([
        c.mask if c.mask is not None else masks[0].new_ones(n, c.a.shape[1]) for c in calls], 1)
    return Captured(a=torch.cat([c.a for c in calls], 1), g=g, mask=mask, half=any(c.half for c in calls),
                    calls=len(calls), regrouped=any(c.regrouped for c in calls), selected=any(c.selected for c in calls))


def all_finite(x: Tensor) -> Tensor:
    """Whether every value of x is finite, as a 0-d bool tensor (no device sync): from its sum, which a
    NaN or inf anywhere makes NaN or inf. One reduction, where isfinite(x).all() is two passes over a
    bool copy; a sum of finite values that overflows only sends the caller to its exact check."""
    return torch.isfinite(x.sum(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32))


def _zero_unread(x: Tensor, keep: Tensor) -> Tensor:
    """x with the NaN and inf at masked positions (keep False) set to 0: values the finite loss does not
    read (a fully masked attention row's), which 0 · NaN would spread over the example's gradient. On the
    CPU a sum says first whether there is any (a sync costs nothing there; isfinite and where over every
    value were 14-21 % of a GPT-2 pass); on a GPU the where runs, without a sync."""
    if x.device.type == "cpu" and bool(all_finite(x)):
        return x
    return torch.where(keep | x.isfinite(), x, 0)


def rotate(x: Tensor, q: Tensor) -> Tensor:
    """x @ q (tokens into an eigenbasis) in x's dtype, but float16 in float32: a rotated entry can be as
    large as the whole vector's length, past float16's 65504 where every entry is well inside it
    (bfloat16 has float32's range)."""
    dt = torch.float32 if x.dtype == torch.float16 else x.dtype
    return x.to(dt) @ q.to(dt)


def with_ones(a: Tensor, spec: LayerSpec) -> Tensor:
    """(n, t, d_a): the inputs with the bias ones column appended last."""
    if not spec.has_bias:
        return a
    return torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], dim=-1)


def _as_2d(module: nn.Conv1d | nn.Conv2d) -> tuple[tuple[int, int], tuple[int, int], Any, tuple[int, int]]:
    """(kernel_size, dilation, padding, stride) of a convolution as a Conv2d's: a Conv1d's input is
    unfolded as an image of height 1."""
    if isinstance(module, nn.Conv2d):
        return module.kernel_size, module.dilation, module.padding, module.stride
    padding = module.padding if isinstance(module.padding, str) else (0, module.padding[0])
    return (1, module.kernel_size[0]), (1, module.dilation[0]), padding, (1, module.stride[0])


def _string_padding(padding: str, kernel_size: tuple[int, int], dilation: tuple[int, int]) -> tuple[int, int, int, int]:
    """F.pad's (left, right, top, bottom) for padding="valid" / "same". "same" pads dilation·(k − 1)
    per dimension, the odd element on the right / bottom, as torch's convolution does."""
    if padding == "valid":
        return (0, 0, 0, 0)
    pads = []
    for k, d in zip(reversed(kernel_size), reversed(dilation)):  # width first, as F.pad wants
        total = d * (k - 1)
        pads += [total // 2, total - total // 2]
    return tuple(pads)


@dataclass(frozen=True)
class MaskWhereItFits:
    """kronfluence's rule for a task's attention mask (a tensor, or a dict of them per module): a
    module is masked only where the mask has one entry per row of its input (examples × tokens), and
    is left unmasked otherwise; source_fast's own rule refuses a mask that does not fit. The
    kronfluence shim's tasks return their masks in this wrapper, so that kronfluence's scripts (an
    encoder-decoder's task giving only the encoder's mask) run and score as they do there."""

    mask: Tensor | dict[str, Tensor]


# Autograd nodes of ops that pick rows by index, and of those that keep rows as they are.
_PICKS = {"IndexBackward0", "IndexSelectBackward0", "MaskedSelectBackward0", "GatherBackward0", "TakeBackward0"}
_KEEPS = {"ViewBackward0", "ReshapeAliasBackward0", "UnsafeViewBackward0", "SqueezeBackward0", "SqueezeBackward1",
          "UnsqueezeBackward0", "CloneBackward0", "ToCopyBackward0", "TBackward0", "TransposeBackward0"}


def _selected_rows(x: Tensor) -> bool:
    """Whether a layer's input was picked out of another tensor by index (a mixture of experts' tokens
    routed to one expert; a masked-LM head's masked positions), within a few reshapes: such rows may
    belong to the examples differently in every batch, so run_pass checks every batch's."""
    fn = x.grad_fn
    for _ in range(4):
        if fn is None:
            return False
        kind = type(fn).__name__
        if kind in _PICKS:
            return True
        if kind not in _KEEPS:
            return False
        fn = next((f for f, _ in fn.next_functions if f is not None), None)
    return False


class _Enough(Exception):
    """Ends check_order's forward pass once every layer it compares has run."""


def _check_mask_values(mask: Any) -> None:
    """A mask is 1 at the tokens to keep and 0 at padding: other values (labels' -100, token ids) would be
    read as "keep" everywhere, masking nothing, without a word."""
    for name, m in mask.items() if isinstance(mask, dict) else [(None, mask)]:
        for t in m if isinstance(m, (list, tuple)) else [m]:
            if isinstance(t, Tensor) and t.dtype != torch.bool and ((t != 0) & (t != 1)).any():
                other = t[(t != 0) & (t != 1)].unique()[:4].tolist()
                whose = "" if name is None else f" for module {name!r}"
                raise ValueError(f"get_attention_mask returned a mask{whose} holding values other than 0 and 1 (such as "
                                 f"{other}): a mask is 1 at the tokens to keep, 0 at padding (labels or input_ids in "
                                 "place of the attention mask?)")


class Capturer:
    """Hooks the tracked layers of `model`; `capture(mask)` records inputs and output gradients."""

    def __init__(self, model: nn.Module, specs: list[LayerSpec], grad_scale: float = 1.0):
        self.model = model
        self.specs = specs
        self._hooked = {s.module: s.whole() for s in specs}  # hooks see modules: a grouped one whole
        self._groups: dict[str, list[LayerSpec]] = {}  # a grouped convolution's layers, by module
        for s in specs:
            if s.groups > 1:
                self._groups.setdefault(s.module, []).append(s)
        self.grouped: dict[str, Captured] = {}  # after capture(): a grouped convolution's whole record, by module
        self.grad_scale = grad_scale  # the loss's backward was scaled by it: output gradients are divided by it
        self.modules = dict(model.named_modules())
        self.records: dict[str, Captured] = {}
        self._mask: Tensor | dict[str, Tensor | list[Tensor | None]] | None = None
        self.folded: list[str] = []

    def _tokens(self, spec: LayerSpec, module: nn.Module, x: Tensor) -> Tensor:
        if spec.kind in CONVOLUTIONS:
            kernel_size, dilation, padding, stride = _as_2d(module)
            if spec.kind == "nn_conv1d":
                x = x.unsqueeze(2)
            if isinstance(padding, str):  # "valid" or "same": pad as the convolution does, then unfold
                x = F.pad(x, _string_padding(padding, kernel_size, dilation))
                padding = 0
            cols = F.unfold(x, kernel_size, dilation=dilation, padding=padding, stride=stride)
            return cols.transpose(1, 2)
        return x.reshape(x.shape[0], -1, x.shape[-1])

    def _layer_mask(self, spec: LayerSpec, n: int, t: int, x_dim: int, call: int = 0) -> Tensor | None:
        if isinstance(self._mask, MaskWhereItFits):
            given = self._mask.mask
            mask = given.get(spec.name) if isinstance(given, dict) else given
            if mask is None or spec.kind in CONVOLUTIONS:  # kronfluence masks no convolution
                return None
            if not isinstance(mask, Tensor):
                raise TypeError(f"get_attention_mask returned a {type(mask).__name__} for module {spec.name!r}: "
                                "kronfluence's masks are tensors")
            if mask.numel() != n * t:
                if x_dim != 2:  # a (batch, features) input has no tokens to mask: nothing to say
                    self._unfit.add(spec.name)
                return None
            return mask.reshape(n, t)
        per_module = isinstance(self._mask, dict)
        mask = self._mask.get(spec.name) if per_module else self._mask  # a module a dict leaves out: unmasked
        per_call = isinstance(mask, (list, tuple))  # a shared layer's masks, one per call (a Siamese encoder's)
        if per_call:
            if call >= len(mask):
                raise ValueError(f"module {spec.name!r} ran more than the {len(mask)} times its attention masks are for")
            mask = mask[call]
        if mask is None or spec.kind in CONVOLUTIONS or x_dim == 2:
            return None  # no token axis to mask
        if mask.dim() != 2 or tuple(mask.shape) != (n, t):
            whose = f"module {spec.name!r}'s attention mask" if per_module else "attention mask"
            if per_call or call:
                whose += f" for its call {call + 1}"
            raise ValueError(
                f"{whose} has shape {tuple(mask.shape)} but module {spec.name!r} sees {n} examples × {t} tokens"
                + ("" if per_module else " (modules that see other sequences, as an encoder-decoder's do, take "
                   "masks of their own: a dict from module name to mask)")
            )
        return mask

    @contextlib.contextmanager
    def capture(self, mask: Tensor | dict[str, Tensor | list[Tensor | None]] | MaskWhereItFits | None,
                examples: int) -> Iterator[dict[str, Captured]]:
        """Records each tracked layer's inputs and output gradients while the block runs a forward and
        backward pass of a batch of `examples` examples; afterwards `folded` names the layers whose
        rows _folded read as examples × tokens."""
        if isinstance(mask, (list, tuple)):  # would mask every layer's calls by position, with nothing to check
            raise TypeError("get_attention_mask returned a list: masks per call are for a shared layer, inside the "
                            "dict of masks per module ({name: [mask of call 1, mask of call 2, ...]})")
        lenient = isinstance(mask, MaskWhereItFits)
        given = mask.mask if lenient else mask
        if isinstance(given, dict):  # per module (kronfluence's form): a name that is no module is a typo
            unknown = sorted(set(given) - set(self.modules))
            if unknown and lenient:  # kronfluence ignores them
                warn(f"get_attention_mask returned masks for {unknown}, which name no module of the model: ignored")
            elif unknown:
                raise ValueError(f"get_attention_mask returned masks for {unknown}, which name no module of the model")
            tracked = list(self._hooked)
            parents = sorted(k for k in given if k not in tracked and any(k == "" or t.startswith(f"{k}.") for t in tracked))
            if parents:  # kronfluence takes a key for the module it names only: so do we, but say so
                warn(f"get_attention_mask returned masks for {parents}, which contain tracked modules but are not "
                     "tracked themselves: a mask applies only to the module it names, so name each tracked module")
        _check_mask_values(given)
        self.records = {}
        self.grouped = {}
        self.folded = []
        self._calls: dict[str, list[Captured]] = {}
        self._seen: dict[str, int] = {}  # calls per module, those under no_grad too (per-call masks count them)
        self._outputs: dict[str, list[tuple[Tensor | None, int]]] = {}  # each tracked call's output, its version then
        self._backward = False  # set by forward_done(): calls from then on are activation checkpointing's re-runs
        self._mask = mask
        self._unfit: set[str] = set()  # modules a MaskWhereItFits left unmasked
        handles = []
        for spec in self._hooked.values():
            handles.append(self.modules[spec.name].register_forward_hook(self._make_hook(spec)))
        frozen = [p for p in self.model.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        try:
            yield self.records
            for name, calls in self._calls.items():
                masks = self._mask.get(name) if isinstance(self._mask, dict) else None
                if isinstance(masks, (list, tuple)) and len(masks) != self._seen[name]:
                    raise ValueError(f"module {name!r} ran {self._seen[name]} times but has attention masks for {len(masks)}")
                for record, (out, version) in zip(calls, self._outputs[name]):
                    # autograd drops a hook on a view once the view is modified in place: a view that is no
                    # reshape of its base (the hook went on the base otherwise) has lost its gradient, not zero.
                    if record.g is None and out is not None and out._version != version:
                        raise ValueError(f"module {name!r}: its output was modified in place (an in-place activation "
                                         "such as ReLU(inplace=True)?), so its output gradient could not be captured; "
                                         "use the op out of place")
                folded = [self._folded(name, c, examples, len(calls)) for c in calls]
                if any(f is not c for f, c in zip(folded, calls)):
                    self.folded.append(name)
                self.records[name] = _joined(name, folded) if len(folded) > 1 else folded[0]
            self._split_groups()
            if self._unfit:  # kronfluence leaves them unmasked without a word
                warn(f"the attention mask does not fit the inputs of modules {sorted(self._unfit)} (it needs one entry "
                     "per example and token): they are left unmasked, as kronfluence leaves them; to mask them, return "
                     "a dict of masks per module from get_attention_mask")
        finally:
            for h in handles:
                h.remove()
            for p in frozen:
                p.requires_grad_(True)
            self._mask = None
            self._calls, self._seen, self._outputs = {}, {}, {}
            self._backward = False

    def _split_groups(self) -> None:
        """Replaces a grouped convolution's record by one per group: its input channels' columns of the
        unfolded input (channels are the slowest of unfold's (channel, kernel row, kernel column)) and its
        output channels' gradients, as views."""
        for module, groups in self._groups.items():
            if module not in self.records:  # did not run: run_pass says so
                continue
            whole = self.grouped[module] = self.records.pop(module)
            fields = vars(whole)
            for s in groups:
                cols, rows = slice(s.group * s.d_in, (s.group + 1) * s.d_in), slice(s.group * s.d_out, (s.group + 1) * s.d_out)
                self.records[s.name] = Captured(**{**fields, "a": whole.a[..., cols],
                                                   "g": None if whole.g is None else whole.g[..., rows]})

    def whole(self, modules: list[str]) -> dict[str, Captured]:
        """The named modules' records of the last capture, a grouped convolution's whole (its groups share
        their rows: the order check and the finiteness check read a module once)."""
        return {name: self.grouped[name] if name in self.grouped else self.records[name] for name in modules}

    def _folded(self, name: str, rec: Captured, n: int, calls: int) -> Captured:
        """One call's record whose input held n·k rows for the batch's n examples (OPT's fc1 and fc2 take
        (examples × tokens, features); Swin's attention (examples × windows, tokens, features)), read as
        each example's k rows one after another: (n, k·t, ·). Rows of a 2-D input are tokens, masked by
        the task's mask where it fits them, (n, k); others were masked by the hook where theirs fit. The
        order is run_pass's to check (check_order); a row count no multiple of n, its to refuse."""
        rows, t = rec.a.shape[:2]
        if rows == n or rows % n:
            return rec
        a = rec.a.reshape(n, -1, rec.a.shape[-1])
        g = None if rec.g is None else rec.g.reshape(n, -1, rec.g.shape[-1])
        if rec.mask is not None:
            return dataclasses.replace(rec, a=a, g=g, mask=rec.mask.reshape(n, -1), regrouped=t > 1)
        mask = self._fitting_mask(name, rec.call, (n, a.shape[1]), calls) if t == 1 else None
        if mask is not None:
            keep = (mask != 0).unsqueeze(-1)
            a = _zero_unread(a, keep)
            g = None if g is None else _zero_unread(g, keep)
        return dataclasses.replace(rec, a=a, g=g, mask=mask, regrouped=t > 1)

    def _fitting_mask(self, name: str, call: int, shape: tuple[int, int], calls: int) -> Tensor | None:
        """The task's mask for a module's call where it is a tensor of `shape`; else None (a 2-D input's
        rows, read per example, may be no tokens: a multiple-choice model's choices, an expert's share),
        but for a module that runs `calls` > 1 times given one mask for all its calls' tokens (a Siamese
        pair's joined), which would mask the wrong ones: refused."""
        if isinstance(self._mask, MaskWhereItFits):  # its rule masked the rows where the mask fitted them
            return None
        mask = self._mask.get(name) if isinstance(self._mask, dict) else self._mask
        if isinstance(mask, (list, tuple)):
            mask = mask[call] if call < len(mask) else None
        if not isinstance(mask, Tensor) or mask.dim() != 2:
            return None
        if calls > 1 and tuple(mask.shape) == (shape[0], shape[1] * calls):
            raise ValueError(f"module {name!r}'s attention mask" + (f" for its call {call + 1}" if call else "")
                             + f" has shape {tuple(mask.shape)} but module {name!r} sees {shape[0]} examples × "
                             f"{shape[1]} tokens (a module that runs more than once takes a mask per call: a dict "
                             "from its name to the list of them)")
        return mask if tuple(mask.shape) == shape else None

    def check_order(self, records: dict[str, Captured], names: list[str], n: int, run: Callable[[], Any],
                    reverse: bool = True) -> dict[str, str]:
        """Runs `run()` (a forward pass of the batch with its n examples reversed) and compares each named
        module's rows, read per example as in `records` (Capturer.whole's), with the records' reversed: "in order" (they
        match, and the examples differ), "alike" (the examples' rows are the same: nothing to see),
        "unmoved" (the rows did not change: the input is no example's, or the reversal did not reach it)
        or "out of order". With `reverse` False, `run()` is a forward pass of the batch as it was: "same"
        or "different" (one that draws random numbers). It stops once every named layer has run; no
        gradients."""
        specs = self._hooked  # by module: a grouped convolution is checked whole (Capturer.whole)
        pending = {name: records[name].calls for name in names}
        rows: dict[str, list[Tensor]] = {name: [] for name in names}
        found: dict[str, str] = {}
        norms: dict[str, Tensor] = {}  # read after the pass: no device sync (nor torch.compile graph break) in it

        def finite(x: Tensor) -> Tensor:  # padded positions' NaN and inf are set to 0 in the records too
            x = x.float()
            return torch.where(x.isfinite(), x, 0)

        def compare(name: str) -> None:
            calls, mine = rows.pop(name), finite(records[name].a)
            if any(c.shape[0] % n for c in calls):  # a mixture of experts' share of the tokens, say
                found[name] = "out of order"
                return
            theirs = finite(torch.cat([c.reshape(n, -1, c.shape[-1]) for c in calls], 1))
            if theirs.shape != mine.shape:
                found[name] = "out of order"
                return
            norms[name] = torch.stack([mine.norm(), (mine - mine.flip(0)).norm(), (mine - theirs.flip(0)).norm(),
                                       (mine - theirs).norm()])

        def hook_for(name: str):
            spec, weight = specs[name], self.modules[name].weight
            dtype = weight.dtype if weight.is_floating_point() and weight.dtype.itemsize >= 2 else None

            def hook(module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> None:
                if name not in pending or not torch.is_grad_enabled():  # as the capture: no_grad calls take no part
                    return
                rows[name].append(self._tokens(spec, module, inputs[0].detach().to(dtype)))
                pending[name] -= 1
                if not pending[name]:
                    del pending[name]
                    compare(name)
                if not pending:
                    raise _Enough

            return hook

        handles = [self.modules[name].register_forward_hook(hook_for(name)) for name in names]
        frozen = [p for p in self.model.parameters() if p.requires_grad]
        for p in frozen:  # grad mode on, as in the pass (a task's no_grad calls stay apart), building no graph
            p.requires_grad_(False)
        try:
            run()
        except _Enough:
            pass
        finally:
            for h in handles:
                h.remove()
            for p in frozen:
                p.requires_grad_(True)
        for name, (size, alike, flipped, unmoved) in ((k, v.tolist()) for k, v in norms.items()):
            close = lambda d: d <= 1e-2 * size  # noqa: E731  (rows computed in another order round differently)
            if not reverse:
                found[name] = "same" if close(unmoved) else "different"
            else:
                found[name] = ("alike" if close(alike) else "in order" if close(flipped)
                               else "unmoved" if close(unmoved) else "out of order")
        return found

    def forward_done(self) -> None:
        """Call between the forward pass and backward: keeps only the outputs that can have lost their
        gradient hook (views modified in place) for the check at the end of capture(). Holding every
        output through backward would keep alive those autograd frees (a Linear feeding a residual add),
        as much memory again as the output gradients being captured."""
        for name, outs in self._outputs.items():
            self._outputs[name] = [(o if o is not None and o._is_view() and o._version != v else None, v) for o, v in outs]
        self._backward = True

    def _make_hook(self, spec: LayerSpec):
        # Inputs and output gradients in the weights' dtype: under autocast a float32 model's layer sees
        # bfloat16 ones (kronfluence takes them in float32 too), and the kernels take one dtype. Not for
        # 8-bit weights (int8, float8: a quantized layer computes in its inputs' dtype).
        weight = self.modules[spec.name].weight
        dtype = weight.dtype if weight.is_floating_point() and weight.dtype.itemsize >= 2 else None

        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Tensor):
            if self._backward:  # torch.utils.checkpoint re-running the forward in backward: not another call
                # (the forward's own call holds its record and gradient hook); the first tracked layer's output
                # is replaced as in the forward, so the re-run saves the same tensors checkpoint checks for.
                return None if output.requires_grad else output.detach().requires_grad_(True).clone()
            call = self._seen[spec.name] = self._seen.get(spec.name, 0) + 1
            if not torch.is_grad_enabled():  # a call under no_grad (a stop-gradient branch) takes no part in
                return None                  # the loss's gradient: not in the factors either
            x = inputs[0]
            a = self._tokens(spec, module, x.detach().to(dtype))
            n, t = a.shape[0], a.shape[1]
            mask = self._layer_mask(spec, n, t, x.dim(), call - 1)
            # Padded tokens count in the gradients as autograd and kronfluence count them (their share is
            # zero unless the loss reads them: a classifier pooling a left-padded [CLS] does). A NaN or inf
            # there (a fully masked attention row) is a value the finite loss does not read: set to 0,
            # as 0 · NaN would make the whole gradient NaN.
            keep = None if mask is None else (mask != 0).unsqueeze(-1)
            if keep is not None:
                a = _zero_unread(a, keep)
            record = Captured(a=a, g=None, mask=mask, half=torch.float16 in (x.dtype, output.dtype), call=call - 1,
                              selected=_selected_rows(x))
            # A layer that runs more than once (shared weights: an RNN cell, a Siamese encoder): its
            # per-example gradient sums over every call's tokens, so the calls join as one longer sequence.
            self._calls.setdefault(spec.name, []).append(record)
            self.records.setdefault(spec.name, record)
            if not output.requires_grad:
                # The first tracked layer (parameters are frozen during a pass): its output starts the
                # graph. Cloned, so an in-place op right after the layer (ReLU(inplace=True)) does not
                # modify a leaf, which autograd refuses.
                output = output.detach().requires_grad_(True).clone()

            # A Linear on 3-D input returns a reshaped view of its 2-D matmul result. Autograd drops a hook
            # on the view once it is modified in place (ReLU(inplace=True)), not one on its base, whose
            # gradient is the same numbers (those of the output before the in-place op). Not for a view a
            # custom autograd.Function returns of a tensor of its own (a fused linear's): that base is
            # outside the graph and takes no hook.
            base = output._base if output._is_view() else None
            reshaped = (base is not None and base.requires_grad and base.numel() == output.numel()
                        and base.is_contiguous() and output.is_contiguous() and base.data_ptr() == output.data_ptr())
            shape = output.shape

            def grad_hook(grad: Tensor):
                grad = grad.reshape(shape)
                if spec.kind in CONVOLUTIONS:
                    g = grad.flatten(2).transpose(1, 2)
                else:
                    g = grad.reshape(grad.shape[0], -1, grad.shape[-1])
                if keep is not None:
                    g = _zero_unread(g, keep)
                g = g.detach()
                if self.grad_scale != 1:  # unscaled in float32: a float16 gradient would underflow again
                    g = g.float() / self.grad_scale
                record.g = g.to(dtype if dtype is not None else grad.dtype)

            (base if reshaped else output).register_hook(grad_hook)
            self._outputs.setdefault(spec.name, []).append((None if reshaped else output, output._version))
            return output

        return hook
