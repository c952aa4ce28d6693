"""Build the plain-text corpus of the continual pre-training study from CPython's own documentation.

`pydoc_data.topics` ships with every CPython: the Python Language Reference text behind `help("if")`,
79 topics, ~465k characters of English technical prose. License: Python Software Foundation License
(PSF-2.0, permissive; the documentation is © Python Software Foundation). No network needed.

    python studies/data/make_pydoc_corpus.py        # writes studies/data/pydoc-{train,val}.jsonl

Whole topics are held out (every 8th topic by sorted name), so the eval perplexity is measured on text the
model never trained on. One JSONL record per topic ({"text", "topic"}); the `text` loader joins records with
EOS and packs them into full blocks. The committed files were made with Python 3.11.7; another Python version
has slightly different text, so the committed files are the reference.
"""
import json
import sys
from pathlib import Path

import pydoc_data.topics


def main(out: Path) -> None:
    topics = pydoc_data.topics.topics
    names = sorted(topics)
    held = {n for i, n in enumerate(names) if i % 8 == 4}
    out.mkdir(parents=True, exist_ok=True)
    for split, keep in (("train", lambda n: n not in held), ("val", lambda n: n in held)):
        recs = [{"topic": n, "text": topics[n].strip()} for n in names if keep(n)]
        path = out / f"pydoc-{split}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
        print(f"{path}: {len(recs)} topics, {sum(len(r['text']) for r in recs)} characters")
    print(f"Python {sys.version.split()[0]}")


if __name__ == "__main__":
    main(Path(__file__).resolve().parent)
