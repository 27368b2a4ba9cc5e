"""The offline lm-evaluation-harness tasks that ship with qat: documents built deterministically from the corpora
`qat-assets` installs (and the fixture corpus), on the held-out split that training never sees.

    qat_wiki_lambada / qat_wiki_ppl                 held-out Wikipedia summaries (the `wiki` corpus, test split)
    qat_shakespeare_lambada / qat_shakespeare_ppl   held-out plays (the `shakespeare` corpus, test split)
    qat_tiny_lambada / qat_tiny_ppl                 configs/data/tiny_corpus.txt's test split (tests, no cache)

`*_lambada` follows lm-eval's LAMBADA protocol (context -> last word; accuracy and perplexity of the word);
`*_ppl` follows its wikitext protocol (rolling windows over whole documents; word / byte perplexity, bits per
byte). The task YAMLs live in configs/harness_tasks/ (shipped in the wheel); their `custom_dataset` hook
(configs/harness_tasks/qat_tasks.py) calls `load_task_dataset`, which writes the documents as JSON lines under
`<qat cache>/harness_tasks/` (atomically) and reads them back.

The split is qat.data's: the same corpus options, fractions and seed (0, the jobs' default) as the `data`
config group (configs/data/<corpus>.yaml; tests/jobs/test_harness.py keeps the two equal), so a model trained
on the `train` split has never seen these documents.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from qat.assets import cache_dir
from qat.data import load_documents, split_documents
from qat.io import atomic_write_bytes, sha256_file
from qat.recipes import CONFIG_DIR

TASK_DIR = CONFIG_DIR / "harness_tasks"  # lm-eval's include_path
SPLIT = "test"
# per corpus: load_documents' arguments and split_documents' fractions, as configs/data/<name>.yaml sets them
CORPORA: dict[str, dict[str, Any]] = {
    "wiki": {"path": "wiki", "text_field": "extract", "sample_by": None, "val_fraction": 0.02,
             "test_fraction": 0.02, "seed": 0},
    "shakespeare": {"path": "shakespeare", "text_field": None, "sample_by": "document", "val_fraction": 0.1,
                    "test_fraction": 0.1, "seed": 0},
    "tiny": {"path": str(CONFIG_DIR / "data" / "tiny_corpus.txt"), "text_field": None, "sample_by": "paragraph",
             "val_fraction": 0.1, "test_fraction": 0.1, "seed": 0},
}
KINDS = ("lambada", "ppl")
TASKS = {f"qat_{c}_{k}": (c, k) for c in CORPORA for k in KINDS}
OFFLINE = [t for t in TASKS if not t.startswith("qat_tiny")]  # the tag `qat_offline`
LAMBADA_MIN_WORDS = 16     # a passage shorter than this leaves too little context for its last word
LAMBADA_MAX_ITEMS = 500    # evenly spaced over the candidates (Shakespeare's 4 held-out plays give ~1,700)
PPL_CHUNK_WORDS = 500      # a play is cut into documents of at least this many words (paragraph boundaries)
LAST_WORD = re.compile(r"[A-Za-z][A-Za-z'\-]*")
TRAILING = ".,;:!?\"')]}-_ \n\t"


def held_out(corpus: str) -> list[str]:
    """The held-out (test split) documents of `corpus` ("wiki", "shakespeare", "tiny"), in corpus order.

    Raises:
        KeyError: an unknown corpus, naming the known ones. FileNotFoundError: the asset is not fetched.
    """
    if corpus not in CORPORA:
        raise KeyError(f"corpus {corpus!r}; choose from {sorted(CORPORA)}")
    c = CORPORA[corpus]
    docs = load_documents(c["path"], c["text_field"], c["sample_by"])
    return split_documents(docs, c["val_fraction"], c["test_fraction"], c["seed"])[SPLIT]


def paragraphs(doc: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", doc) if p.strip()]


def lambada_docs(docs: list[str]) -> list[dict]:
    """LAMBADA-style items: every paragraph of at least LAMBADA_MIN_WORDS words, whitespace collapsed and the
    trailing punctuation dropped, whose last word is alphabetic; {"text"} (the target is its last word). Beyond
    LAMBADA_MAX_ITEMS candidates, that many evenly spaced ones (a 2-core CPU evaluates ~1 item a second)."""
    out = []
    for doc in docs:
        for para in paragraphs(doc):
            text = " ".join(para.split()).rstrip(TRAILING)
            words = text.split(" ")
            if len(words) >= LAMBADA_MIN_WORDS and LAST_WORD.fullmatch(words[-1]):
                out.append({"text": text})
    if len(out) > LAMBADA_MAX_ITEMS:
        out = [out[i * len(out) // LAMBADA_MAX_ITEMS] for i in range(LAMBADA_MAX_ITEMS)]
    return out


def ppl_docs(docs: list[str], chunk_words: int | None) -> list[dict]:
    """Whole documents for the rolling-window perplexity ({"page"}); with `chunk_words`, each document is cut at
    paragraph boundaries into pieces of at least that many words (the last piece joins the one before when
    shorter), so a handful of long plays still gives a per-document spread for the standard error."""
    if not chunk_words:
        return [{"page": d.strip()} for d in docs if d.strip()]
    out = []
    for doc in docs:
        pieces, cur, n = [], [], 0
        for para in paragraphs(doc):
            cur.append(para)
            n += len(para.split())
            if n >= chunk_words:
                pieces.append(cur)
                cur, n = [], 0
        if cur:
            pieces[-1:] = [pieces[-1] + cur] if pieces else [cur]
        out += [{"page": "\n\n".join(p)} for p in pieces]
    return out


def task_docs(task: str) -> list[dict]:
    """The documents of one qat task (see the module docstring), deterministic: same corpus, same list.

    Raises:
        KeyError: an unknown task, naming the known ones.
    """
    if task not in TASKS:
        raise KeyError(f"task {task!r}; qat's offline tasks: {sorted(TASKS)}")
    corpus, kind = TASKS[task]
    docs = held_out(corpus)
    if kind == "lambada":
        return lambada_docs(docs)
    return ppl_docs(docs, PPL_CHUNK_WORDS if corpus == "shakespeare" else None)


def write_task_file(task: str, root: str | Path | None = None) -> Path:
    """`<qat cache>/harness_tasks/<task>.jsonl` (rewritten atomically only when its content changed)."""
    data = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in task_docs(task)).encode()
    path = cache_dir(root) / "harness_tasks" / f"{task}.jsonl"
    if not path.is_file() or path.read_bytes() != data:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)
    return path


def file_sha256(path: str | Path) -> str:
    """The SHA-256 hex digest of a task file (`qat.io.sha256_file`)."""
    return sha256_file(path)


def load_task_dataset(task: str, **_: Any):
    """lm-eval's `custom_dataset` hook: {"test": datasets.Dataset} read from the task's JSON-lines file.
    Extra keyword arguments (lm-eval passes the task's metadata) are ignored."""
    import datasets

    path = write_task_file(task)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line]
    return datasets.DatasetDict({SPLIT: datasets.Dataset.from_list(rows)})


def wikitext_results(doc: dict, results: list) -> dict:
    """lm-eval's wikitext `process_results`: the document's log-likelihood with its word and byte counts."""
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["page"]))
    nbytes = len(doc["page"].encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, nbytes),
            "bits_per_byte": (loglikelihood, nbytes)}
