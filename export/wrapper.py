"""Wrap a Hugging Face backbone as a forward-only graph that emits tapped block outputs.

Generic by construction: the block list is found by shape (the longest homogeneous
``nn.ModuleList`` whose length is the model's depth), blocks after the deepest tap are
removed from the module, and every module that runs only after the deepest tap (final
norm, pooler, heads) is replaced by a pass-through, so neither its compute nor its
weights reach the exported graph. Tap i is read by a forward hook on block i.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fedmobillm.errors import FedMobiLLMError

log = logging.getLogger(__name__)


@dataclass
class BackboneInfo:
    """What the exporter learned about a loaded backbone."""

    family: str
    kind: str  # "encoder" | "decoder"
    depth: int
    hidden_size: int
    blocks_path: str  # dotted module path of the block list, e.g. "encoder.layer"


class Passthrough(nn.Module):
    """Stands in for a module that runs after the deepest tap: returns its first input."""

    def forward(self, *args, **kwargs):
        if args:
            return args[0]
        return next(iter(kwargs.values()))


def hf_load_kwargs(folder: Path) -> dict[str, object]:
    """``from_pretrained`` arguments for a local folder: its GGUF file when it has no
    config.json, else ``use_safetensors=True`` (weights never unpickled: a folder with only
    ``pytorch_model.bin`` is refused by transformers with a message naming the file)."""
    folder = Path(folder)
    gguf = sorted(folder.glob("*.gguf"))
    if gguf and not (folder / "config.json").is_file():
        return {"gguf_file": gguf[0].name}
    return {"use_safetensors": True}


def load_hf_model(folder: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load the base model (no task head) of a local Hugging Face folder, eager, eval mode."""
    from transformers import AutoConfig, AutoModel

    folder = Path(folder)
    kwargs = hf_load_kwargs(folder)
    config = AutoConfig.from_pretrained(
        folder, **{k: v for k, v in kwargs.items() if k == "gguf_file"}
    )
    model = AutoModel.from_pretrained(folder, config=config, dtype=dtype, **kwargs)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    return model.eval()


def text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def config_depth(model: nn.Module) -> int | None:
    cfg = text_config(model)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer block list: the longest ModuleList of same-class modules, preferring
    one whose length equals the configured depth."""
    depth = config_depth(model)
    candidates = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            classes = {type(m) for m in module}
            if len(classes) == 1:
                candidates.append((len(module) == depth, len(module), name, module))
    if not candidates:
        raise FedMobiLLMError(
            f"no transformer block list found in {type(model).__name__}",
            hint="the exporter needs a model whose blocks sit in an nn.ModuleList",
        )
    candidates.sort(key=lambda c: (c[0], c[1]), reverse=True)
    _, _, name, blocks = candidates[0]
    return name, blocks


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, leaf, module)


def example_inputs(batch: int, seq: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    low = min(5, max(vocab - 1, 0))
    input_ids = torch.randint(low, vocab, (batch, seq), generator=g)  # (B, T)
    attention_mask = torch.ones(batch, seq, dtype=torch.int64)  # (B, T)
    if batch > 1 and seq > 2:
        attention_mask[1, seq - 2 :] = 0  # one right-padded row
    return input_ids, attention_mask


def _call_model(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)


def _run_with_block_hooks(model, blocks, index, input_ids, attention_mask):
    """Eager forward; returns the output hidden states of blocks[index] for each index."""
    captured: dict[int, torch.Tensor] = {}
    handles = [blocks[i].register_forward_hook(_capture_hook(captured, i)) for i in index]
    try:
        with torch.no_grad():
            _call_model(model, input_ids, attention_mask)
    finally:
        for h in handles:
            h.remove()
    return [captured[i] for i in index]


class _capture_hook:  # noqa: N801 - used like a function
    """Forward hook storing a block's hidden-state output (the first element of a tuple)."""

    def __init__(self, store: dict, key: int) -> None:
        self.store = store
        self.key = key

    def __call__(self, module, args, output) -> None:
        self.store[self.key] = output[0] if isinstance(output, (tuple, list)) else output


def detect_kind(model: nn.Module, blocks: nn.ModuleList, vocab: int) -> str:
    """Decoder if changing the last token leaves earlier positions unchanged (causal)."""
    ids, mask = example_inputs(1, 6, vocab, seed=1)
    ids2 = ids.clone()
    ids2[0, -1] = (ids[0, -1] + 1) % vocab
    last = len(blocks) - 1
    (a,) = _run_with_block_hooks(model, blocks, [last], ids, mask)
    (b,) = _run_with_block_hooks(model, blocks, [last], ids2, mask)
    causal = torch.allclose(a[:, :-1], b[:, :-1], atol=1e-5, rtol=1e-4)
    return "decoder" if causal else "encoder"


def modules_after(model: nn.Module, block: nn.Module, vocab: int) -> list[str]:
    """Top-level names of modules that start running after `block` has finished and are not
    its ancestors: the final norm, poolers, heads."""
    events: list[tuple[str, str]] = []
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue
        handles.append(module.register_forward_pre_hook(_event(events, name, "start")))
        handles.append(module.register_forward_hook(_event(events, name, "end")))
    try:
        ids, mask = example_inputs(1, 4, vocab)
        with torch.no_grad():
            _call_model(model, ids, mask)
    finally:
        for h in handles:
            h.remove()
    block_name = next(n for n, m in model.named_modules() if m is block)
    ends = [i for i, (n, kind) in enumerate(events) if n == block_name and kind == "end"]
    started_after = {n for n, kind in events[ends[-1] + 1 :] if kind == "start"}
    started_before = {n for n, kind in events[: ends[-1] + 1] if kind == "start"}
    late = sorted(started_after - started_before)
    return [n for n in late if not any(n.startswith(p + ".") for p in late)]


def _event(events: list, name: str, kind: str):
    def hook(*_args, **_kwargs):
        events.append((name, kind))

    return hook


class TapWrapper(nn.Module):
    """(input_ids, attention_mask) -> float32 taps (B, K, d) at the pivot, or (B, K, T, d).

    The tap blocks are found by module path and hooked for the duration of each forward
    only, so the wrapper survives deepcopy and repeated torch.export tracing."""

    def __init__(self, model: nn.Module, block_paths: list[str], taps: list[int], pivot: str):
        super().__init__()
        self.model = model
        self.pivot = pivot
        self._taps = list(taps)
        self._paths = list(block_paths)  # module path of tap i's block, inside self.model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        captured: dict[int, torch.Tensor] = {}
        handles = [
            self.model.get_submodule(path).register_forward_hook(_capture_hook(captured, t))
            for t, path in zip(self._taps, self._paths, strict=True)
        ]
        try:
            _call_model(self.model, input_ids, attention_mask)
        finally:
            for h in handles:
                h.remove()
        states = torch.stack([captured[t] for t in self._taps], dim=1)  # (B, K, T, d)
        return select_pivot(states, attention_mask, self.pivot).float()


def select_pivot(
    states: torch.Tensor, attention_mask: torch.Tensor, pivot: str, reference: bool = False
) -> torch.Tensor:
    """states (B, K, T, d) -> (B, K, d) at the pivot token (first, last real token, or the
    mean over real tokens), or unchanged for pivot none. ``reference``: compute the mean the
    plain way (mask, sum, divide) instead of the graph-friendly way, for verification."""
    if pivot == "none":
        return states
    if pivot == "first":
        return states[:, :, 0, :]  # (B, K, d)
    if pivot == "mean":
        return (
            _masked_mean(states, attention_mask)
            if reference
            else _span_mean(states, attention_mask)
        )
    return _at(states, _last_real(attention_mask))  # (B, K, d)


def _last_real(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B,): position of the last real token (right or left padding)."""
    positions = torch.arange(
        attention_mask.shape[1], dtype=attention_mask.dtype, device=attention_mask.device
    )
    return (attention_mask * positions).argmax(dim=1)


def _at(states: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """states (B, K, T, d), pos (B,) -> (B, K, d): each sample's state at its position."""
    index = pos.view(-1, 1, 1, 1).expand(-1, states.shape[1], 1, states.shape[3])  # (B,K,1,d)
    return states.gather(2, index).squeeze(2)


def _span_mean(states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real tokens, which are contiguous (right or left padding), as a running
    sum read at the span's ends: no reshape of the (batch, seq) mask, which XNNPACK cannot
    lower with two dynamic dimensions."""
    seq = attention_mask.shape[1]
    positions = torch.arange(seq, dtype=attention_mask.dtype, device=attention_mask.device)
    last = _last_real(attention_mask)  # (B,)
    first = (attention_mask * (seq - positions)).argmax(dim=1)  # (B,): smallest real position
    running = states.cumsum(dim=2)  # (B, K, T, d)
    total = _at(running, last) - _at(running, first) + _at(states, first)  # (B, K, d)
    count = attention_mask.sum(dim=1).clamp(min=1).to(states.dtype)  # (B,)
    return total / count.view(-1, 1, 1)


def _masked_mean(states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    m = attention_mask.to(states.dtype)[:, None, :, None]  # (B, 1, T, 1)
    return (states * m).sum(dim=2) / m.sum(dim=2).clamp(min=1.0)  # (B, K, d)


def default_taps(depth: int, k: int) -> list[int]:
    """Average-interval block sampling: split depth into k equal blocks, tap each block's last."""
    return sorted({max(1, round(depth * (i + 1) / k)) for i in range(k)})


def resolve_taps(depth: int, num_taps: int | None, layers: list[int] | None) -> list[int]:
    """The 1-based blocks to tap: ``layers``, else ``num_taps`` (default: every block) by
    average-interval block sampling."""
    if num_taps is not None and layers is not None:
        raise FedMobiLLMError("give either --taps or --layers, not both")
    if layers is not None:
        chosen = sorted(set(int(x) for x in layers))
        if not chosen or chosen[0] < 1 or chosen[-1] > depth:
            raise FedMobiLLMError(
                f"layers {layers} are outside 1..{depth} (the model has {depth} blocks)",
                hint=f"pick 1-based block indices between 1 and {depth}",
            )
        return chosen
    k = depth if num_taps is None else int(num_taps)
    if k < 1 or k > depth:
        raise FedMobiLLMError(
            f"--taps {k} is not possible: the model has {depth} blocks",
            hint=f"use --taps between 1 and {depth}",
        )
    return default_taps(depth, k)


def declared_pooling(folder: Path | str | None) -> str | None:
    """The sentence pooling a model folder declares: "mean" or "cls" from a
    sentence-transformers ``1_Pooling/config.json``, or from the registry entry of a model
    this project built (``fedmobillm-model.json``); None when it declares none."""
    if folder is None:
        return None
    folder = Path(folder)
    cfg = folder / "1_Pooling" / "config.json"
    if cfg.is_file():
        try:
            pooling = json.loads(cfg.read_text())
        except (OSError, ValueError):
            return None
        if pooling.get("pooling_mode_mean_tokens"):
            return "mean"
        if pooling.get("pooling_mode_cls_token"):
            return "cls"
        return None
    from fedmobillm.export.models import INFO_FILE, MODELS

    info = folder / INFO_FILE
    if info.is_file():
        try:
            name = json.loads(info.read_text()).get("name")
        except (OSError, ValueError):
            return None
        spec = MODELS.get(str(name))
        return spec.pooling if spec is not None else None
    return None


def auto_pivot(kind: str, pooling: str | None) -> str:
    """The default pivot: the token (or pooling) the model was trained to be read at.
    Decoders: the last real token. Encoders: the mean over real tokens when the model is a
    mean-pooled sentence encoder (its pooling config says so), else the first token (CLS)."""
    if kind != "encoder":
        return "last"
    return "mean" if pooling == "mean" else "first"


def wrap_backbone(
    model: nn.Module,
    num_taps: int | None,
    layers: list[int] | None,
    pivot: str,
    pooling: str | None = None,
) -> tuple[TapWrapper, BackboneInfo, list[int], str]:
    """Truncate after the deepest tap, neutralise post-tap modules, hook the tap blocks.
    ``pooling``: what the model folder declares (``declared_pooling``), for pivot auto."""
    cfg = text_config(model)
    vocab = int(getattr(cfg, "vocab_size", 1000))
    path, blocks = find_blocks(model)
    depth = len(blocks)
    taps = resolve_taps(depth, num_taps, layers)
    kind = detect_kind(model, blocks, vocab)
    if pivot == "auto":
        pivot = auto_pivot(kind, pooling)
    hidden = int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", 0))
    info = BackboneInfo(cfg.model_type, kind, depth, hidden, path)
    kept = nn.ModuleList(list(blocks)[: taps[-1]])
    set_submodule(model, path, kept)
    for name in modules_after(model, kept[-1], vocab):
        log.info(
            "wrap: removing %s (%s), it runs after the deepest tap",
            name,
            type(model.get_submodule(name)).__name__,
        )
        set_submodule(model, name, Passthrough())
    linearise_conv1d(model)
    paths = [f"{path}.{t - 1}" for t in taps]
    return TapWrapper(model, paths, taps, pivot).eval(), info, taps, pivot


def linearise_conv1d(model: nn.Module) -> int:
    """Swap transformers' ``Conv1D`` (GPT-2's linear layer with a transposed weight, applied
    as ``addmm`` on ``x.view(-1, d)``) for the equal ``nn.Linear``: the view of its input
    fails in the ExecuTorch lowering once the batch dimension is dynamic ("Cannot view a
    tensor with shape [batch, seq, d] and strides (d, d*batch, 1)"), and weight
    quantisation recognises only ``nn.Linear``. Returns how many were swapped."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always has it
        return 0
    swaps = [(n, m) for n, m in model.named_modules() if isinstance(m, Conv1D)]
    for name, conv in swaps:
        d_in, d_out = conv.weight.shape  # Conv1D keeps (in, out)
        linear = nn.Linear(d_in, d_out, bias=conv.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(conv.weight.t())
            if conv.bias is not None:
                linear.bias.copy_(conv.bias)
        set_submodule(model, name, linear)
    if swaps:
        log.info("wrap: %d Conv1D layers replaced by the equal nn.Linear", len(swaps))
    return len(swaps)


def eager_reference(
    folder: Path, taps: list[int], pivot: str, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Independent reference: the untouched full model, block outputs read by hooks."""
    model = load_hf_model(folder)
    _, blocks = find_blocks(model)
    states = _run_with_block_hooks(model, blocks, [t - 1 for t in taps], input_ids, attention_mask)
    stacked = torch.stack(states, dim=1)  # (B, K, T, d)
    return select_pivot(stacked, attention_mask, pivot, reference=True).float()
