"""The Tucker model for a source, conversion options and minutes of healing: built once, then reused.

The one place that names and builds cached conversions, for `tucker-serve serve`, the benchmarks, the
quality script and the tests. A folder's name says what it holds: '<source folder>-tucker-<ratio>x'
(or '-full', '-k<R3>-v<RT3>'), a hash of any conversion option that differs from the defaults, and
'-healed<N>m'. Ranks and options are recorded in the folder's config.json and tucker_report.json.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import shutil
from dataclasses import fields, replace
from pathlib import Path

from tucker_serve.convert import ConvertOptions, convert
from tucker_serve.options import options_record
from tucker_serve.paths import cache_dir
from tucker_serve.sources import resolve


def tucker_name(source_name: str, opt: ConvertOptions, heal_minutes: float = 0.0) -> str:
    """The cached folder's name for a source folder name, conversion options and healing minutes."""
    if opt.full_rank:
        kind = "full"
    elif opt.kv_ratio is not None:
        kind = f"{opt.kv_ratio:g}x"
    else:
        kind = f"k{opt.key_rank}-v{opt.value_rank}"
    defaults = ConvertOptions(kv_ratio=opt.kv_ratio, key_rank=opt.key_rank, value_rank=opt.value_rank,
                              full_rank=opt.full_rank)
    changed = {f.name: getattr(opt, f.name) for f in fields(opt) if getattr(opt, f.name) != getattr(defaults, f.name)}
    name = f"{source_name}-tucker-{kind}"
    if changed:
        name += "-" + hashlib.sha256(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:8]
    return name + (f"-healed{heal_minutes:g}m" if heal_minutes else "")


def tucker_model(spec: str, opt: ConvertOptions, heal_minutes: float = 0.0, root: Path | None = None,
                 progress: bool = True, apart: bool = False) -> Path:
    """The folder of `spec` converted with `opt` and healed for `heal_minutes` minutes (0: not healed),
    under `root` (default: the user cache's models/); built on the first call, reused after. `apart`
    builds it in a spawned process: the CUDA context and GPU memory of the build end with that
    process, so that vLLM, started after it by `tucker-serve serve`, finds the GPU as it was."""
    from tucker_serve.heal import HealOptions, heal

    source = resolve(spec)
    folder = Path(root or cache_dir() / "models") / tucker_name(source.folder.name, opt, heal_minutes)
    healing = HealOptions(minutes=heal_minutes, eval_tokens=0) if heal_minutes else None
    stale = built_with_other_options(folder, opt, healing)
    if stale is None:
        return folder
    if apart:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            return pool.apply(tucker_model, (spec, opt, heal_minutes, root, progress))
    converted = folder.with_name(f"{folder.name}.converted") if heal_minutes else folder
    if stale:
        print(f"rebuilding {folder.name}: it was built with other options ({stale})", flush=True)
    elif progress:
        print(f"building {folder.name}: {spec} converted to Tucker attention"
              + (f", then healed for {heal_minutes:g} CPU-minutes" if heal_minutes else "") + " (once)", flush=True)
    if built_with_other_options(converted, opt) is not None:
        convert(spec, converted, opt, progress=progress)
    if heal_minutes:
        heal(converted, folder, healing, progress=progress)
        shutil.rmtree(converted, ignore_errors=True)
    return folder


def built_with_other_options(folder: Path, opt: ConvertOptions, healing=None) -> str | None:
    """None when `folder` holds a model converted with exactly `opt` (its report records every
    option) and, given `healing` (HealOptions), healed with exactly those; otherwise "" for no model,
    or which options differ. Names carry only the options that differ from the defaults (and the
    healing minutes), so a folder built before a default changed has the same name."""
    if not (folder / "model.safetensors").is_file():
        return ""
    report = folder / "tucker_report.json"
    written = json.loads(report.read_text()) if report.is_file() else {}
    recorded = written.get("options")
    if recorded is None:
        return "its report does not record them"
    wanted = options_record(opt)
    differ = [(k, recorded.get(k), wanted.get(k)) for k in sorted(wanted.keys() | recorded.keys())
              if wanted.get(k) != recorded.get(k)]
    if healing is not None:
        from tucker_serve.heal import healing_record

        healed, wanted = written.get("healing", {}), healing_record(healing)
        differ += [(f"healing {k}", healed.get(k), v) for k, v in sorted(wanted.items()) if healed.get(k) != v]
    return ", ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in differ) or None


def at_ratio(ratio: float) -> ConvertOptions:
    """Default conversion options at a KV compression ratio; 1 means the exact full-rank conversion."""
    return ConvertOptions(full_rank=True) if ratio == 1 else ConvertOptions(kv_ratio=ratio)


def at_spec(spec: str) -> ConvertOptions:
    """Conversion options of a benchmark row's RATIO[@WIDTHS][+OPTION=VALUE...]: `full` (exact), `1.5`,
    `2@measured` (`--layer-widths measured`), `2@measured+copy_window=0` (any declared convert option)."""
    head, *overrides = spec.split("+")
    ratio, _, widths = head.partition("@")
    opt = at_ratio(1 if ratio == "full" else float(ratio))
    changes = {"layer_widths": widths} if widths else {}
    declared = {f.name: f for f in fields(ConvertOptions) if "kind" in f.metadata}
    for item in overrides:
        name, _, value = item.partition("=")
        if name not in declared or not value:
            raise ValueError(f"{spec!r}: {item!r} is not OPTION=VALUE of a convert option ({', '.join(declared)})")
        changes[name] = declared[name].metadata["kind"](value)
    return replace(opt, **changes)


def row_spec(spec: str) -> tuple[str, str]:
    """MODEL and CACHE of a benchmark row's MODEL[/CACHE] (CACHE: auto when left out); MODEL may be a
    folder path, which has slashes of its own, so a folder row names its CACHE (`runs/x1.5/auto`)."""
    from tucker_serve.cache_dtypes import served_names

    model, _, cache = spec.rpartition("/") if "/" in spec else (spec, "", "auto")
    if not model or cache not in served_names():
        raise ValueError(f"row {spec!r}: expected MODEL[/CACHE] with CACHE one of {', '.join(served_names())} "
                         f"(a model folder needs its CACHE, e.g. {spec.rstrip('/')}/auto)")
    return model, cache


def row_folder(source: str, model: str, progress: bool = False) -> Path:
    """The folder of a benchmark row's model: `source` itself, a model folder (a healed conversion),
    or `source` converted by at_spec(model) (cached as `tucker-serve serve` caches conversions)."""
    if model == "source":
        return resolve(source).folder
    if Path(model).is_dir():
        return Path(model)
    return tucker_model(source, at_spec(model), progress=progress)
