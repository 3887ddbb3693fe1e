"""Real English text for calibration and evaluation, extracted at set-up from the gensim wheel.

wiki: an English Wikipedia excerpt (CC BY-SA), markup stripped by mwparserfromhell.
news: ABC news articles (`lee_background.cor`).
Documents are split once and for all: the first quarter is the `eval` split, the rest `calib`,
so calibration never sees evaluation text. Extracted text is cached as plain files.
"""

from __future__ import annotations

import bz2
import importlib.util
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from tucker_serve.paths import cache_dir

CORPORA = ("wiki", "news")
SPLITS = ("eval", "calib")
_DATA = "test/test_data"
_WIKI = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_NEWS = "lee_background.cor"


def _gensim_file(name: str) -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the gensim==4.4.0 wheel is not installed: run `make setup` (deploy/setup.sh)")
    path = Path(spec.submodule_search_locations[0]) / _DATA / name
    if not path.is_file():
        raise ValueError(f"{path} is missing: reinstall gensim==4.4.0")
    return path


def _wiki_documents() -> list[str]:
    import mwparserfromhell

    root = ET.fromstring(bz2.open(_gensim_file(_WIKI)).read())
    ns = root.tag.split("}")[0] + "}"
    docs = []
    for page in root.iter(f"{ns}page"):
        text = page.find(f"{ns}revision/{ns}text").text or ""
        if text.lower().startswith("#redirect"):
            continue
        text = re.sub(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", "", text, flags=re.S)
        plain = mwparserfromhell.parse(text).strip_code(normalize=True, collapse=True)
        plain = re.sub(r"\n{3,}", "\n\n", plain).strip()
        if len(plain) > 500:
            docs.append(plain)
    return docs


def _news_documents() -> list[str]:
    lines = _gensim_file(_NEWS).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip()]


def _extract(corpus: str) -> list[str]:
    return _wiki_documents() if corpus == "wiki" else _news_documents()


def prepare_text(corpus: str) -> dict[str, Path]:
    """Extract a corpus into `<cache>/text/<corpus>.<split>.txt` once; return the split files."""
    if corpus not in CORPORA:
        raise ValueError(f"unknown text {corpus!r}: built-in texts are {', '.join(CORPORA)} (or give a file)")
    folder = cache_dir() / "text"
    files = {split: folder / f"{corpus}.{split}.txt" for split in SPLITS}
    if all(f.is_file() for f in files.values()):
        return files
    docs = _extract(corpus)
    cut = len(docs) // 4
    folder.mkdir(parents=True, exist_ok=True)
    for split, part in (("eval", docs[:cut]), ("calib", docs[cut:])):
        tmp = files[split].with_suffix(".tmp")
        tmp.write_text("\n\n".join(part), encoding="utf-8")
        tmp.replace(files[split])
    return files


def load_text(source: str, split: str = "eval") -> str:
    """Text of a built-in corpus split ('wiki', 'news') or of a UTF-8 file path."""
    if source in CORPORA:
        return prepare_text(source)[split].read_text(encoding="utf-8")
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"text {source!r} is neither a built-in text ({', '.join(CORPORA)}) nor a file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"text file {path} is not UTF-8: {exc}") from None


def text_tokens(tokenizer, source: str, count: int, split: str = "calib") -> list[int]:
    """The first `count` token ids of a text (`load_text`), tokenizing only the part they need."""
    return tokenizer(load_text(source, split)[: count * 12], add_special_tokens=False).input_ids[:count]
