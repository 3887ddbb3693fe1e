"""Latent widths per layer, chosen by what truncating each layer costs the model (docs/design.md s2).

Layers differ by an order of magnitude in how much a narrower latent costs them, and keys and
values differ again; the energy a truncation keeps does not show it. So conversion measures:
for every layer, its keys alone and then its values alone are truncated to a few widths around
the uniform one while every other layer stays exact, the source model runs on from that layer,
and the KL divergence of its next-token distributions from the source's is the cost of that
width (zero at full rank). The probe is text windows, scored at every SCORED-th position; with a
copy window a second probe adds its costs: long windows that repeat at their end a passage from
thousands of tokens earlier, scored on the repeat, so that what long-range retrieval reads has a
price too (the 1,024-token text KL alone moves budget away from it). Between measured widths the
cost is interpolated linearly, on the lower convex hull of the points. Assuming costs add over
layers, the widths with the least total cost under the byte budget are then found greedily: on
convex curves the next number of the budget always goes where it removes the most cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from tucker_serve.attention import TuckerAttention
from tucker_serve.calibrate import AttentionShape
from tucker_serve.config import TuckerConfig


# Head sizes vLLM's CPU attention kernel takes (vLLM 0.32; tests/test_plugin_settings.py checks them).
# A layer whose key and value widths are equal and one of these is plain MQA that kernel serves.
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
FRACTIONS = (0.5, 1.0, 1.5)  # measured widths, as fractions of the uniform widths
SCORED = 4  # text windows: the KL is taken at every fourth position
COPY_PASSAGE = 64  # copy windows: tokens repeated at the end


@dataclass(frozen=True)
class LayerCosts:
    """One layer's measured costs: {width: KL in nats per token} for its keys and for its values,
    each with every other latent of the model at full rank."""

    key: dict[int, float]
    value: dict[int, float]

    def row(self, prefix: str = "") -> dict:
        return {f"{prefix}key_kl": {w: round(v, 6) for w, v in self.key.items()},
                f"{prefix}value_kl": {w: round(v, 6) for w, v in self.value.items()}}

    def __add__(self, other: "LayerCosts") -> "LayerCosts":
        return LayerCosts({w: c + other.key[w] for w, c in self.key.items()},
                          {w: c + other.value[w] for w, c in self.value.items()})


@dataclass(frozen=True)
class Probe:
    """Windows (B, T) of token ids and the positions (P,) whose next-token KL is scored."""

    windows: torch.Tensor
    scored: torch.Tensor


def text_probe(ids: torch.Tensor, window: int, count: int) -> Probe:
    """`count` windows spread over `ids`, scored at every SCORED-th position (the LM head over all of
    them would cost as much as 7 layers)."""
    step = (ids.numel() - window) // max(count - 1, 1)
    windows = torch.stack([ids[k * step: k * step + window] for k in range(count)])
    return Probe(windows, torch.arange(0, window, SCORED))


def copy_probe(ids: torch.Tensor, window: int, passage: int = COPY_PASSAGE) -> Probe:
    """Two windows of `window` tokens from the start of `ids` whose last `passage` tokens repeat the
    passage at 1/64 and at 1/2 of the text (so it lies about `window` and `window`/2 tokens back),
    scored where the model predicts the repeat's second token on."""
    body = window - passage
    if ids.numel() < 2 * body:
        raise ValueError(f"copy windows of {window} tokens need {2 * body} calibration tokens; got {ids.numel()}")
    windows = []
    for k, at in enumerate((body // 64, body // 2)):
        text = ids[k * body: (k + 1) * body]
        windows.append(torch.cat([text, text[at: at + passage]]))
    return Probe(torch.stack(windows), torch.arange(body, window - 1))


def measured_widths(uniform: int, full: int, step: int) -> list[int]:
    """The widths measured around `uniform`, multiples of `step`, below full rank."""
    widths = {min(full, step * max(1, round(f * uniform / step))) for f in FRACTIONS}
    return sorted(w for w in widths if w < full)


class TuckerLayer(torch.nn.Module):
    """Stands in for a transformers attention module: the Tucker attention of given tensors."""

    def __init__(self, attention: TuckerAttention) -> None:
        super().__init__()
        self.attention = attention

    def forward(self, hidden_states, *args, **kwargs):
        return self.attention(hidden_states), None


def tucker_module(tensors: dict, s: AttentionShape, r3: int, rt3: int, freqs: torch.Tensor) -> TuckerAttention:
    """The reference Tucker attention holding one converted layer's tensors (float32)."""
    config = TuckerConfig(s.hidden, s.heads, s.heads, s.heads * s.head_dim, r3, s.heads, s.heads * s.head_dim, rt3)
    module = TuckerAttention(config, freqs, s.head_dim**-0.5, block_core=True, bias="q_shared.bias" in tensors)
    module.load_state_dict({k: v.float() for k, v in tensors.items()})
    return module.eval()


@torch.no_grad()
def measure(model, probe: Probe, layer_tensors, uniform: tuple[int, int], full: int,
            progress: bool = True, desc: str = "measuring layers") -> list[LayerCosts]:
    """Costs of every layer of a transformers Llama-family `model` on one probe.

    `layer_tensors(i, r3, rt3)` returns layer i's converted tensors and latent frequencies at those widths.
    """
    s = AttentionShape.from_config(model.config.to_dict())
    body, layers = model.model, model.model.layers
    windows, scored = probe.windows.to(model.device), probe.scored.to(model.device)
    inputs = []
    grab = lambda module, args, kwargs: inputs.append(args[0] if args else kwargs["hidden_states"])  # noqa: E731
    handles = [layer.register_forward_pre_hook(grab, with_kwargs=True) for layer in layers]
    try:
        hidden = model.model(windows).last_hidden_state
    finally:
        for h in handles:
            h.remove()
    reference = model.lm_head(hidden[:, scored]).log_softmax(-1)
    positions = torch.arange(windows.shape[1], device=model.device)[None].expand(windows.shape[0], -1)
    rotary = body.rotary_emb(inputs[0], positions)

    def kl_with(i: int, r3: int, rt3: int) -> float:
        """KL of the source model from the one whose layer i alone is Tucker at (r3, rt3)."""
        tensors, freqs = layer_tensors(i, r3, rt3)
        original = layers[i].self_attn
        layers[i].self_attn = TuckerLayer(tucker_module(tensors, s, r3, rt3, freqs).to(model.device))
        try:
            x = inputs[i]
            for layer in layers[i:]:
                x = layer(x, position_embeddings=rotary, position_ids=positions)
        finally:
            layers[i].self_attn = original
        logp = model.lm_head(body.norm(x)[:, scored]).log_softmax(-1)
        return max((reference.exp() * (reference - logp)).sum(-1).mean().item(), 0.0)

    keys, values = measured_widths(uniform[0], full, 2), measured_widths(uniform[1], full, 1)
    return [LayerCosts({w: kl_with(i, w, full) for w in keys}, {w: kl_with(i, full, w) for w in values})
            for i in tqdm(range(len(layers)), desc=desc, unit="layer", disable=not progress)]


def convex_steps(costs: dict[int, float], full: int, step: int) -> list[tuple[float, int]]:
    """(cost removed per number, numbers) of each step of `step` numbers from the narrowest measured
    width up to full rank, on the lower convex hull of the measured points and (full, 0)."""
    hull = _hull(costs, full)
    steps = []
    for (w0, c0), (w1, c1) in zip(hull, hull[1:]):
        gain = max(c0 - c1, 0.0) / (w1 - w0)  # per number
        steps += [(gain, step)] * ((w1 - w0) // step)
    return steps


def _hull(costs: dict[int, float], full: int) -> list[tuple[int, float]]:
    """The lower convex hull of the measured (width, cost) points and (full, 0), by width."""
    hull: list[tuple[int, float]] = []
    for p in sorted({**costs, full: 0.0}.items()):  # monotone chain: keep the turns that make the slope rise
        while len(hull) >= 2 and _cross(hull[-2], hull[-1], p) <= 0:
            hull.pop()
        hull.append(p)
    return hull


def _cross(o, a, b) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def allocate(costs: list[LayerCosts], budget: int, full: int) -> list[tuple[int, int]]:
    """Per-layer (r3, rt3) whose widths sum to at most `budget`, least total interpolated cost.

    Every layer starts at its narrowest measured widths (no extrapolation below what was measured);
    the rest of the budget goes, a step at a time, where a step removes the most cost per number.
    """
    widths = [[min(c.key), min(c.value)] for c in costs]
    used = sum(a + b for a, b in widths)
    if used > budget:
        raise ValueError(f"a budget of {budget} numbers per token cannot give every layer its narrowest "
                         "measured widths")
    steps = []  # (gain per number, layer, kind, numbers); each layer's gains descend (convex curves)
    for i, c in enumerate(costs):
        for kind, curve, step in ((0, c.key, 2), (1, c.value, 1)):
            steps += [(gain, i, kind, n) for gain, n in convex_steps(curve, full, step)]
    steps.sort(key=lambda t: -t[0])
    for _, i, kind, n in steps:
        if used + n <= budget:
            widths[i][kind] += n
            used += n
    return [(a, b) for a, b in widths]


def cost_at(costs: dict[int, float], full: int, width: int) -> float:
    """The interpolated cost at `width` (from the narrowest measured width to full rank)."""
    hull = _hull(costs, full)
    for (w0, c0), (w1, c1) in zip(hull, hull[1:]):
        if w0 <= width < w1:
            return c0 + (c1 - c0) * (width - w0) / (w1 - w0)
    if width == full:
        return 0.0
    raise ValueError(f"width {width} lies outside the measured {hull[0][0]} to full rank {full}")


def allocate_equal(costs: list[LayerCosts], budget: int, full: int,
                   sizes=VLLM_CPU_HEAD_SIZES) -> list[tuple[int, int]]:
    """Per-layer equal key and value widths (r3 = rt3 = w, w one of `sizes`), summing to at most
    `budget`, least total interpolated cost: every layer stays plain MQA for vLLM's own kernels.
    Exact over the choices, by dynamic programming over the numbers used."""
    options = []
    for i, c in enumerate(costs):
        lo = max(min(c.key), min(c.value))
        choices = [(2 * w, cost_at(c.key, full, w) + cost_at(c.value, full, w))
                   for w in sizes if lo <= w <= full and w % 2 == 0]
        if not choices:
            raise ValueError(f"layer {i}: no head size in {sizes} lies between {lo} and full rank {full}")
        options.append(choices)
    best: dict[int, tuple[float, list[int]]] = {0: (0.0, [])}  # numbers used -> least cost, widths
    for choices in options:
        nxt: dict[int, tuple[float, list[int]]] = {}
        for used, (cost, picks) in best.items():
            for numbers, c in choices:
                key = used + numbers
                if key <= budget and (key not in nxt or cost + c < nxt[key][0]):
                    nxt[key] = (cost + c, picks + [numbers // 2])
        if not nxt:
            raise ValueError(f"a budget of {budget} numbers per token cannot give every layer a head size")
        best = nxt
    _, picks = min(best.values())
    return [(w, w) for w in picks]
