"""Convert a Llama-family checkpoint to Tucker attention (docs/design.md s2), exact at full rank.

Keys: per RoPE frequency k, the G KV heads' rotate-half pairs form z_k in C^G; a complex basis
per frequency commutes with RoPE, so the latent key keeps the leading components of z_k chosen
globally across frequencies, and each query head reads it through a least-squares decoder.
Values: the top principal directions of the stacked values under the output projection's metric;
each head's output map is then fitted by least squares on its calibrated attention outputs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from tucker_serve import cache_layout as cl
from tucker_serve.allocate import allocate, allocate_equal, copy_probe, measure, text_probe
from tucker_serve.calibrate import AttentionShape, LayerStats, calibrated
from tucker_serve.chat import can_chat, source_chats
from tucker_serve.rope import basis_freqs, complex_basis_map
from tucker_serve.checkpoint import ModelError, converted_config, one_or_list, write_folder
from tucker_serve.device import compute_device, host_frees_returned, release
from tucker_serve.options import cite, flag, invalid, option, options_record
from tucker_serve.sources import load_source, load_tokenizer, resolve
from tucker_serve.text import text_tokens


@dataclass(frozen=True)
class ConvertOptions:
    # Exactly one of kv_ratio, full_rank or key_rank with value_rank (choose_ranks).
    kv_ratio: float | None = option(None, float, "target KV-cache compression against the source", one_of="rank")
    key_rank: int | None = option(None, int, "latent key width r3 (with --value-rank)", one_of="rank")
    value_rank: int | None = option(None, int, "latent value width rt3 (with --key-rank)")
    full_rank: bool = option(False, flag, "exact conversion (no compression)", one_of="rank")
    # text and the source's own chat answers (see calibration_tokens)
    calib_text: str = option("wiki,chat", str, "comma-separated: wiki, news, chat (the source's own answers to "
                                               "healing prompts) or UTF-8 files")
    calib_tokens: int = option(16384, int, "calibration tokens, shared out over --calib-text")
    # Long windows: the attention statistics of 512-token windows miss how attention reads tokens
    # thousands back, and retrieval at 4k tokens collapsed (docs/quality.md, "Long context").
    calib_window: int = option(4096, int, "tokens per calibration window (at most the calibration and the "
                                          "source's context)")
    dtype: str = option("auto", str, "dtype of the converted weights (auto: the source checkpoint's)",
                        choices=("auto", "float32", "bfloat16", "float16"))
    key_metric: str = option("attention", str, "key importance (see key_bases): attention-centred and "
                                               "query-weighted, query-weighted, or raw",
                             choices=("attention", "query", "plain"))
    layer_widths: str = option("uniform", str, "latent widths with --kv-ratio: the same in every layer, each "
                                               "layer's chosen by the measured cost of truncating it, or so with "
                                               "equal key and value widths that vLLM's own kernels serve",
                               choices=("uniform", "measured", "measured-equal"))
    measure_window: int = option(1024, int, "with measured widths: tokens per text window the cost of each "
                                            "layer's truncation is measured on")
    measure_windows: int = option(2, int, "with measured widths: text windows, spread over the calibration text")
    copy_window: int = option(0, int, "with measured widths: tokens of the long windows whose repeated passage "
                                      "prices long-range retrieval (0: text windows only)")
    key_share: float | None = option(None, float, "with --kv-ratio: the share of each layer's latent given to keys "
                                                  "(default: half up to 3x, more beyond)")
    value_stat: str = option("values", str, "value directions from the values' Gram matrix or the attention "
                                            "outputs'", choices=("values", "outputs"))


def choose_ranks(s: AttentionShape, opt: ConvertOptions) -> tuple[int, int]:
    """Latent key and value widths (r3, rt3) from full_rank, explicit ranks or kv_ratio."""
    full = s.groups * s.head_dim
    chosen = [opt.full_rank, opt.kv_ratio is not None, opt.key_rank is not None or opt.value_rank is not None]
    if sum(chosen) != 1:
        raise ModelError(f"give exactly one of {cite('full_rank', 'kv_ratio', 'key_rank')} (key_rank with "
                         "value_rank)")
    if opt.key_share is not None and opt.kv_ratio is None:
        raise ModelError(f"{cite('key_share')} shares out the latent of {cite('kv_ratio')}: give it")
    if opt.full_rank:
        return full, full
    if opt.kv_ratio is not None:
        if not 1 <= opt.kv_ratio <= s.kv_width / 4:
            raise ModelError(invalid("kv_ratio", opt.kv_ratio, f"must lie in [1, {s.kv_width / 4:g}] for this model"))
        total = s.kv_width / opt.kv_ratio
        if opt.key_share is not None and not 0 < opt.key_share < 1:
            raise ModelError(invalid("key_share", opt.key_share, "must lie strictly between 0 and 1"))
        fraction = default_key_fraction(opt.kv_ratio) if opt.key_share is None else opt.key_share
        if fraction == 0.5:  # equal widths (plain MQA: vLLM's own kernels), at least the asked compression
            key = 2 * int(total // 4)
            return min(key, full), min(key, full)
        key = 2 * round(total * fraction / 2)
        return min(key, full), min(round(total) - key, full)
    if opt.key_rank is None or opt.value_rank is None:
        raise ModelError(f"{cite('key_rank', 'value_rank', conj='and')} go together")
    for name, rank in (("key_rank", opt.key_rank), ("value_rank", opt.value_rank)):
        if not 1 <= rank <= full:
            raise ModelError(invalid(name, rank, f"must lie in [1, {full}], G*D of this model"))
    if opt.key_rank % 2:
        raise ModelError(invalid("key_rank", opt.key_rank, "must be even: latent RoPE rotates pairs"))
    return opt.key_rank, opt.value_rank


def default_key_fraction(ratio: float) -> float:
    """Share of the latent given to keys: equal up to 3x, more beyond 3x.

    Follows the prototype's split measurements (docs/design.md s2: 60/36 at 4x, 48/16 at 6x).
    """
    return 0.5 if ratio <= 3 else min(0.75, 0.5 + 0.0625 * (ratio - 3))


def key_bases(st: LayerStats, s: AttentionShape, r3: int, metric: str):
    """Per-frequency encoder and decoder bases (G, m_k) complex, and the retained key energy.

    metric 'plain' ranks components by key energy E|z|^2; 'query' weighs each KV head's keys by
    the energy of the queries that read them (the expected squared logit error); 'attention' also
    measures keys by their spread under each query's attention, since softmax ignores errors shared
    by all keys of a query.
    """
    cov, w, lam, vec = _key_eigen(st, s, metric)
    keep = torch.zeros_like(lam, dtype=torch.bool).flatten()
    keep[lam.flatten().argsort(descending=True)[: r3 // 2]] = True
    counts = keep.view(lam.shape).sum(1)
    enc, dec = [], []
    for k, m in enumerate(counts.tolist()):
        p = w[k, :, None] * vec[k, :, :m]  # encoder: c = p^H z
        enc.append(p)
        dec.append(_ls_decoder(cov[k], p))
    return enc, dec, (lam.flatten()[keep].sum() / lam.sum()).item()


def _key_eigen(st: LayerStats, s: AttentionShape, metric: str):
    """Key covariance per frequency (D/2, G, G), the metric weights, and the weighted covariance's
    eigenvalues and vectors, descending per frequency."""
    cov = (st.key_attn_cov if metric == "attention" else st.key_cov) / st.tokens  # (D/2, G, G)
    if metric in ("query", "attention"):
        rep = s.heads // s.groups
        qe = (st.query_energy / st.tokens).unflatten(0, (s.groups, rep)).sum(1).T  # (D/2, G)
        w = (qe + 1e-6 * qe.mean()).sqrt().to(cov.dtype)
    else:
        w = torch.ones(cov.shape[:2], dtype=cov.dtype)
    lam, vec = torch.linalg.eigh(w[:, :, None] * cov * w[:, None, :])  # ascending per frequency
    return cov, w, lam.flip(-1).clamp_min(0), vec.flip(-1)


def _ls_decoder(cov: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """M minimizing E|z - M p^H z|^2 under covariance `cov`: exact inverse when p is square."""
    m = p.shape[1]
    if m == 0:
        return p
    if m == p.shape[0]:
        return torch.linalg.inv(p.conj().T)
    gram = p.conj().T @ cov @ p
    ridge = 1e-9 * gram.diagonal().real.mean() * torch.eye(m, dtype=gram.dtype)
    return torch.linalg.solve(gram + ridge, (cov @ p).conj().T).conj().T


def value_maps(st: LayerStats, s: AttentionShape, o_weight: torch.Tensor, rt3: int, stat: str):
    """Value encoder (G*D, rt3), per-head output maps (H, D, rt3), retained (metric) energy."""
    D, G, H, rep = s.head_dim, s.groups, s.heads, s.heads // s.groups
    root, lam, vec = _value_eigen(st, s, o_weight, stat)
    enc = root @ vec[:, :rt3]  # latent value = v @ enc
    decoders = []
    for h in range(H):
        block = slice((h // rep) * D, (h // rep + 1) * D)
        if rt3 == G * D:
            decoders.append(torch.linalg.inv(enc)[:, block])
            continue
        g_h = enc.T @ st.out_gram[h] @ enc
        ridge = 1e-9 * g_h.diagonal().mean() * torch.eye(rt3, dtype=g_h.dtype)
        decoders.append(torch.linalg.solve(g_h + ridge, enc.T @ st.out_gram[h][:, block]))
    o_core = torch.stack(decoders).transpose(1, 2)  # (H, D, rt3)
    return enc, o_core, (lam[:rt3].sum() / lam.sum()).item()


def _value_eigen(st: LayerStats, s: AttentionShape, o_weight: torch.Tensor, stat: str):
    """The output projection's metric root (G*D, G*D) and the metric-weighted value statistic's
    eigenvalues and vectors, descending."""
    D, G, H, rep = s.head_dim, s.groups, s.heads, s.heads // s.groups
    wo = o_weight.double().T.unflatten(0, (H, D))  # (H, D, d): head h's rows of Wo
    metric = torch.einsum("hid,hjd->hij", wo, wo).unflatten(0, (G, rep)).sum(1)  # (G, D, D)
    root = torch.block_diag(*[_sqrtm(m) for m in metric])  # (G*D, G*D)
    gram = st.value_gram if stat == "values" else st.out_gram.mean(0)
    lam, vec = torch.linalg.eigh(root @ (gram / st.tokens) @ root)
    return root, lam.flip(0).clamp_min(0), vec.flip(1)


def _sqrtm(m: torch.Tensor) -> torch.Tensor:
    lam, vec = torch.linalg.eigh(m)
    lam = lam.clamp_min(1e-8 * lam.max())
    return (vec * lam.sqrt()) @ vec.T


def convert_layer(attn, st: LayerStats, s: AttentionShape, r3: int, rt3: int, opt: ConvertOptions):
    """Tucker tensors of one layer (names relative to `self_attn.`), latent freqs, report row."""
    D, G, rep = s.head_dim, s.groups, s.heads // s.groups
    enc, dec, key_energy = key_bases(st, s, r3, opt.key_metric)
    a_key = complex_basis_map(enc, D)  # (G, D, r3)
    a_query = complex_basis_map(dec, D)
    # the basis arithmetic runs on the CPU, where the statistics are, whatever device the model is on
    q, k, v, o = ({n: getattr(m, n).detach().cpu() for n in ("weight", "bias") if getattr(m, n, None) is not None}
                  for m in s.family.attention_projections(attn))
    wk = k["weight"].double().unflatten(0, (G, D))  # (G, D, d)
    out = {
        "q_shared.weight": q["weight"],
        "q_core": a_query.repeat_interleave(rep, 0),  # (H, D, r3)
        "k_latent.weight": torch.einsum("gir,gid->rd", a_key, wk),
        "o_shared.weight": o["weight"],
    }
    v_enc, o_core, value_energy = value_maps(st, s, o["weight"], rt3, opt.value_stat)
    out["v_latent.weight"] = v_enc.T @ v["weight"].double()
    out["o_core"] = o_core
    if "bias" in q:
        out["q_shared.bias"] = q["bias"]
        out["k_latent.bias"] = torch.einsum("gir,gi->r", a_key, k["bias"].double().unflatten(0, (G, D)))
        out["v_latent.bias"] = v["bias"].double() @ v_enc
    freqs = basis_freqs(enc, s.inv_freq)
    row = {"key_energy": round(key_energy, 6), "value_energy": round(value_energy, 6),
           "key_pairs_per_frequency": [p.shape[1] for p in enc]}
    return out, freqs, row


def calibration_tokens(model, tokenizer, source_folder: Path, opt: ConvertOptions, progress: bool):
    """`calib_tokens` tokens shared out over the comma-separated sources of `calib_text`: built-in
    texts (calibration split), files, and `chat`, the source's own answers to the healing prompts
    (left out, with a notice, when the tokenizer has no chat template). Returns the tokens, whole
    windows of `calib_window` tokens (fewer when the calibration or the source's context is shorter),
    the window and the sources used."""
    parts = [p.strip() for p in opt.calib_text.split(",") if p.strip()]
    if not parts:
        raise ModelError(invalid("calib_text", opt.calib_text, "names no text"))
    if "chat" in parts and not can_chat(tokenizer, source_folder.name, "calibrating on text only"):
        parts = [p for p in parts if p != "chat"] or ["wiki"]
    share, ids = opt.calib_tokens // len(parts), []
    for part in parts:
        if part == "chat":
            ids += source_chats(model, tokenizer, source_folder, min_tokens=share, progress=progress)[:share].tolist()
        else:
            ids += text_tokens(tokenizer, part, share)
    window = min(opt.calib_window, len(ids), getattr(model.config, "max_position_embeddings", None) or len(ids))
    if window < 16:
        raise ModelError(f"calibration text has {len(ids)} tokens; need at least 16")
    return torch.tensor(ids[: len(ids) // window * window]), window, ",".join(parts)


def convert(model_spec: str, out_dir, opt: ConvertOptions, progress: bool = True, device: str = "auto") -> dict:
    """Write a Tucker folder for `model_spec` to `out_dir` (atomically); return the report. The source
    runs on `device` (calibration, its chat answers, measured widths; tucker_serve.device)."""
    start, on = time.time(), compute_device(device)  # a device this machine lacks fails before any work
    host_frees_returned()
    source = resolve(model_spec)
    if source.is_tucker:
        raise ModelError(f"{model_spec} is already a Tucker checkpoint")
    cfg = source.config
    s = AttentionShape.from_config(cfg)
    if s.heads * s.head_dim > s.hidden:
        raise ModelError(f"{model_spec}: heads x head_dim > hidden_size is not supported")
    r3, rt3 = choose_ranks(s, opt)
    dtype = getattr(torch, opt.dtype, None) if opt.dtype != "auto" else "auto"
    if dtype != "auto" and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ModelError(invalid("dtype", opt.dtype, "must be auto, float32, bfloat16 or float16"))
    # in its own dtype, computing in float32: memory stays near the checkpoint's size (docs/deploy.md)
    model, tokenizer = load_source(source.folder, on), load_tokenizer(source.folder)
    dtype = model.dtype if dtype == "auto" else dtype
    dtype_name = str(dtype).removeprefix("torch.")
    ids, window, texts = calibration_tokens(model, tokenizer, source.folder, opt, progress)
    stats = calibrated(model, str(source.folder.resolve()), ids, window, progress)
    state = {k: v for k, v in model.state_dict().items() if ".self_attn." not in k}
    if cfg.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    layers = model.model.layers
    widths, costs = layer_widths(model, ids, stats, s, (r3, rt3), opt, progress)
    freqs, rows = [], []
    for i, layer in enumerate(tqdm(layers, desc="converting", unit="layer", disable=not progress)):
        tensors, f, row = convert_layer(layer.self_attn, stats[i], s, *widths[i], opt)
        row = {"key_rank": widths[i][0], "value_rank": widths[i][1], **row, **(costs[i] if costs else {})}
        state.update({f"model.layers.{i}.self_attn.{k}": v.to("cpu", dtype) for k, v in tensors.items()})
        freqs.append(f.tolist())
        rows.append(row)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}
    del model, layers
    release(on)
    r3s, rt3s = [w[0] for w in widths], [w[1] for w in widths]
    report = build_report(model_spec, s, r3s, rt3s, opt, dtype_name, texts, ids.numel(), window, rows,
                          time.time() - start)
    report["device"] = str(on)
    config = converted_config(cfg, heads=s.heads, head_dim=s.head_dim, r3=r3s, rt3=rt3s,
                              qkv_bias=s.family.has_qkv_bias(cfg),
                              source_kv_width=s.kv_width, latent_rope_freqs=freqs, dtype=dtype_name)
    write_folder(out_dir, config, state, report, tokenizer_from=source.folder)
    return report


def layer_widths(model, ids: torch.Tensor, stats: list[LayerStats], s: AttentionShape, uniform: tuple[int, int],
                 opt: ConvertOptions, progress: bool):
    """(r3, rt3) of every layer, and report rows of the measured costs when they were chosen by measurement."""
    layers = model.model.layers
    if opt.layer_widths == "uniform":
        return [uniform] * len(layers), None
    if opt.kv_ratio is None:
        raise ModelError(f"{cite('layer_widths')}={opt.layer_widths} shares out the budget of {cite('kv_ratio')}: "
                         "give it")
    need = max(opt.measure_window * opt.measure_windows, 2 * opt.copy_window)
    if ids.numel() < need:
        raise ModelError(f"measuring layers needs {need} calibration tokens; {cite('calib_tokens')} gives "
                         f"{ids.numel()}")
    probes = {"": text_probe(ids, opt.measure_window, opt.measure_windows)}  # spread over every text
    if opt.copy_window:
        probes["copy_"] = copy_probe(ids, opt.copy_window)

    def tensors(i, r3, rt3):
        out, freqs, _ = convert_layer(layers[i].self_attn, stats[i], s, r3, rt3, opt)
        return out, freqs

    full = s.groups * s.head_dim
    parts = {name: measure(model, probe, tensors, uniform, full, progress, f"measuring layers{name and ' (copy)'}")
             for name, probe in probes.items()}
    costs = [sum(layer[1:], layer[0]) for layer in zip(*parts.values())]
    rows = [{k: v for name, part in parts.items() for k, v in part[i].row(name).items()} for i in range(len(layers))]
    choose = allocate_equal if opt.layer_widths == "measured-equal" else allocate
    return choose(costs, len(layers) * sum(uniform), full), rows


def build_report(spec, s, r3s, rt3s, opt, dtype, texts, tokens, window, rows, seconds) -> dict:
    layout = cl.MemoryLayout(tuple(cl.tucker_kv_width(a, b) for a, b in zip(r3s, rt3s)), s.kv_width, dtype)
    return {
        "source": spec,
        "key_rank": one_or_list(r3s), "value_rank": one_or_list(rt3s),
        "bytes_per_token_per_layer": {"source": s.kv_width * cl.dtype_bytes(dtype),
                                      "converted": layout.bytes_per_token_per_layer},
        "bytes_per_token": {"source": layout.source_bytes_per_token, "converted": layout.bytes_per_token},
        "compression_ratio": round(layout.compression_ratio, 6),
        "dtype": dtype,
        "calibration": {"text": texts, "tokens": tokens, "window": window,
                        "key_metric": opt.key_metric, "value_stat": opt.value_stat,
                        "layer_widths": opt.layer_widths,
                        **({"copy_window": opt.copy_window} if opt.copy_window else {})},
        "seconds": round(seconds, 1),
        "options": options_record(opt),
        "layers": rows,
    }
