"""The built-in corpus: real text that needs no download.

``builtin`` has two parts, interleaved two documentation documents to one chat until the chats
run out:
  * ``docs``: the Python language reference shipped with CPython (``pydoc_data.topics``), split
    into sections of about 2,500 characters, plus the module docstrings of the standard library
    (one document per module whose docstrings add up to at least 600 characters);
  * ``chats``: transcripts that the embedded SmolLM2-135M-Instruct writes in answer to
    `CHAT_REQUESTS` (48 varied user requests), generated once (sampled, seed 0) and cached under
    the nlakit cache; rendered with the *target* model's chat template.

``builtin:wide`` is ``builtin`` followed by two more parts, alternating, for an NLA that must read
more than Python documentation (the shipped one was weakest on text unlike its training text):
  * ``writing``: plain documents (no chat template) that the embedded model writes in
    `WRITING_GENRES` x `WRITING_TOPICS` (news, letters, recipes, poems, markdown, HTML, ...),
    generated once and cached like the chats;
  * ``code``: about 2,500 characters of code of each standard-library module, from its first
    top-level ``def`` or ``class`` (licence headers and imports skipped), without docstrings and
    long strings (``docs`` holds that text, and a text must live in one split).
"""

from __future__ import annotations

import ast
import itertools
import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from nlakit.corpus.documents import Corpus, Document, render_chat
from nlakit.errors import NLAError
from nlakit.fileio import atomic_path, stable_hash

CHAT_REQUESTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how photosynthesis works to a ten-year-old.",
    "What are the main causes of the French Revolution?",
    "Give me a recipe for a simple vegetable soup.",
    "Write a Python function that checks whether a string is a palindrome.",
    "How do I change a flat tyre on a bicycle?",
    "Summarise the plot of Romeo and Juliet in a few sentences.",
    "What is the difference between weather and climate?",
    "Write a polite email asking my landlord to fix a leaking tap.",
    "Explain what a black hole is.",
    "List five tips for sleeping better.",
    "Translate 'Where is the train station?' into French and Spanish, and explain the grammar.",
    "Write a haiku about autumn leaves.",
    "How does a binary search work? Show an example.",
    "What should I pack for a three-day hiking trip?",
    "Explain the rules of chess for a beginner.",
    "Why is the sky blue?",
    "Write a limerick about a cat who loves to cook.",
    "What are some good habits for learning a new language?",
    "Describe the water cycle step by step.",
    "Write a SQL query that finds the ten customers with the most orders.",
    "What is inflation and why does it matter?",
    "Give me ideas for a birthday party for a seven-year-old.",
    "Explain the difference between a list and a tuple in Python.",
    "Write a short poem about the ocean at night.",
    "How do vaccines train the immune system?",
    "What were the main achievements of the Roman Empire?",
    "Help me plan a weekly budget on a small income.",
    "Explain recursion with a simple example.",
    "What is the capital of Australia, and why was it chosen?",
    "Write a motivational message for someone starting a new job.",
    "How do I make a good cup of tea?",
    "Describe how an electric motor works.",
    "Write a dialogue between a customer and a shopkeeper in a bakery.",
    "What are prime numbers? List the first ten.",
    "Give advice on how to prepare for a job interview.",
    "Explain how the internet sends a message from one computer to another.",
    "Write a bash command that counts the lines in every .txt file in a folder.",
    "What is the theory of evolution by natural selection?",
    "Suggest three books for someone who enjoyed The Hobbit, and say why.",
    "How can I reduce the amount of plastic I use at home?",
    "Explain what a mortgage is.",
    "Write a short fable with a moral about patience.",
    "What is the Pythagorean theorem? Give a worked example.",
    "Describe a typical day in the life of a medieval farmer.",
    "How do I apologise to a friend after an argument?",
    "Write a JavaScript function that removes duplicates from an array.",
    "What makes a good scientific experiment?",
]

CHAT_SETTINGS = {"max_new_tokens": 200, "temperature": 0.7, "top_p": 0.9, "seed": 0,
                 "batch_size": 16, "version": 1}
WRITING_GENRES = [
    "a news article about {}", "a short story about {}", "an encyclopedia entry about {}",
    "a step-by-step how-to guide about {}", "a formal letter about {}",
    "a customer review related to {}", "a blog post about {}", "a poem about {}",
    "a speech about {}", "meeting notes from a discussion of {}",
    "a FAQ with questions and answers about {}",
    "a markdown document with headings and bullet lists about {}",
    "a diary entry about {}", "an advertisement for {}",
    "a dialogue between two people about {}", "a short HTML web page about {}",
]
WRITING_TOPICS = [
    "a new bridge in a small town", "growing tomatoes at home", "the history of the bicycle",
    "a local football match", "saving money for a holiday", "learning to play the guitar",
    "a volcano eruption", "a new smartphone", "the opening of a science museum",
    "a healthy breakfast",
]
WRITING_SETTINGS = {"max_new_tokens": 300, "temperature": 0.7, "top_p": 0.9, "seed": 0,
                    "batch_size": 16, "version": 1}
SECTION_CHARS = 2500
MIN_DOC_CHARS = 600


def _split_sections(text: str, limit: int = SECTION_CHARS) -> list[str]:
    """Greedy paragraph packing into chunks of at most ~`limit` characters."""
    sections, current = [], ""
    for para in (p.strip() for p in text.split("\n\n")):
        if not para:
            continue
        if current and len(current) + len(para) + 2 > limit:
            sections.append(current)
            current = ""
        current = f"{current}\n\n{para}" if current else para
    if current:
        sections.append(current)
    return sections


def reference_docs() -> Iterator[Document]:
    """Sections of the Python language reference shipped with CPython."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        for i, section in enumerate(_split_sections(topics[name])):
            if len(section) >= MIN_DOC_CHARS:
                yield Document(f"pyref:{name}:{i}", section, "prose")


def stdlib_docstrings() -> Iterator[Document]:
    """Module docstrings (module, class and function docstrings joined) of the stdlib."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        parts = []
        for node in [tree, *ast.walk(tree)]:
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    parts.append(doc.strip())
        text = "\n\n".join(dict.fromkeys(parts))[: SECTION_CHARS * 2]
        if len(text) >= MIN_DOC_CHARS:
            yield Document(f"stdlib:{path.stem}", text, "docstring")


def doc_documents() -> Iterator[Document]:
    yield from reference_docs()
    yield from stdlib_docstrings()


def _text_block_lines(tree: ast.Module) -> set[int]:
    """Lines of docstrings and of other long strings (docstring templates, help texts):
    `stdlib_docstrings` may hold that text, in another split."""
    def is_text(n) -> bool:
        return isinstance(n, ast.Constant) and isinstance(n.value, str)

    blocks = []
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and is_text(
                body[0].value):
            blocks.append(body[0])  # a docstring, however short
        if is_text(node) and (node.end_lineno > node.lineno or len(node.value) > 60):
            blocks.append(node)
    return {line for n in blocks for line in range(n.lineno, n.end_lineno + 1)}


def stdlib_code() -> Iterator[Document]:
    """One ~2,500-character code excerpt per stdlib module, from its first top-level def/class,
    without docstrings or long strings: `stdlib_docstrings` holds them, and a text must live in
    one split."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.glob("*.py")):
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        defs = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
        first = next((n.lineno for n in tree.body if isinstance(n, defs)), None)
        if first is None:
            continue
        skip = _text_block_lines(tree)
        lines, size = [], 0
        for number, line in enumerate(source.splitlines(), start=1):
            if number < first or number in skip:
                continue
            if size + len(line) + 1 > SECTION_CHARS and size >= MIN_DOC_CHARS:
                break
            lines.append(line)  # whole lines keep the indentation intact
            size += len(line) + 1
        text = "\n".join(lines).rstrip()
        if len(text) >= MIN_DOC_CHARS:
            yield Document(f"code:{path.stem}", text, "code")


def writing_requests() -> list[str]:
    """Every genre with every topic: "Write a news article about a volcano eruption." ..."""
    return [f"Write {genre.format(topic)}." for genre in WRITING_GENRES for topic in WRITING_TOPICS]


def generated_cache_path(part: str, weights_id: str, requests: list[str], settings: dict) -> Path:
    from nlakit.model.load import cache_dir

    key = stable_hash(weights_id, requests, settings)[:16]
    return cache_dir() / "corpus" / f"builtin-{part}-{key}.jsonl"


def chat_cache_path(weights_id: str) -> Path:
    return generated_cache_path("chats", weights_id, CHAT_REQUESTS, CHAT_SETTINGS)


def generate_chats(model, tokenizer, requests=CHAT_REQUESTS, settings=CHAT_SETTINGS,
                   desc: str = "writing built-in chats") -> list[dict]:
    """Sample one assistant answer per request with `model`; return message lists."""
    import torch
    from tqdm.auto import tqdm

    torch.manual_seed(settings["seed"])
    out = []
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the real last token
    try:
        bs = settings["batch_size"]
        for start in tqdm(range(0, len(requests), bs), desc=desc, unit="batch"):
            batch = requests[start : start + bs]
            prompts = [
                tokenizer.apply_chat_template([{"role": "user", "content": r}], tokenize=False,
                                              add_generation_prompt=True)
                for r in batch
            ]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = enc.to(model.device)
            with torch.no_grad():
                gen = model.generate(
                    **enc, do_sample=True, temperature=settings["temperature"],
                    top_p=settings["top_p"], max_new_tokens=settings["max_new_tokens"],
                    pad_token_id=tokenizer.pad_token_id,
                )
            answers = tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:],
                                             skip_special_tokens=True)
            for request, answer in zip(batch, answers):
                out.append([{"role": "user", "content": request},
                            {"role": "assistant", "content": answer.strip()}])
    finally:
        tokenizer.padding_side = old_side
    return out


def _generated(part: str, requests: list[str], settings: dict, chat_model) -> list[list[dict]]:
    """Cached answers of the embedded model to `requests`, generated on first use."""
    from nlakit.model.load import load_model, resolve_model, weights_hash

    weights_id = weights_hash(resolve_model("smollm2-135m"))
    path = generated_cache_path(part, weights_id, requests, settings)
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    if chat_model is not None and getattr(chat_model[0], "nlakit_source", {}).get(
        "weights_hash") == weights_id:
        model, tok = chat_model
    else:
        model, tok = load_model("smollm2-135m")
    chats = generate_chats(model, tok, requests, settings, desc=f"writing built-in {part}")
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in chats),
                       encoding="utf-8")
    return chats


def builtin_chats(chat_model=None) -> list[list[dict]]:
    """The cached chat transcripts, generating them with the embedded model on first use."""
    return _generated("chats", CHAT_REQUESTS, CHAT_SETTINGS, chat_model)


def _chat_documents(tokenizer, chat_model) -> Iterator[Document]:
    for i, messages in enumerate(builtin_chats(chat_model)):
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            text = render_chat(messages, tokenizer)
        else:  # a target without a chat template still gets readable transcripts
            text = "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)
        yield Document(f"chat:{i:03d}", text, "chat")


def _writing_documents(chat_model) -> Iterator[Document]:
    """The answers alone, as plain text: documents, not transcripts."""
    for i, messages in enumerate(_generated("writing", writing_requests(), WRITING_SETTINGS,
                                            chat_model)):
        text = messages[-1]["content"]
        if len(text) >= MIN_DOC_CHARS:  # a short answer has too few positions past min_position
            yield Document(f"writing:{i:03d}", text, "writing")


def _interleave(docs: Iterator[Document], chats: Iterator[Document]) -> Iterator[Document]:
    """Two documentation documents, then one chat, until chats run out; then the rest."""
    docs = iter(docs)
    for chat in chats:
        for _ in range(2):
            doc = next(docs, None)
            if doc is not None:
                yield doc
        yield chat
    yield from docs


def _alternate(*parts: Iterator[Document]) -> Iterator[Document]:
    """One document of each part in turn; a part that runs out drops out."""
    iters = [iter(p) for p in parts]
    while iters:
        for it in list(iters):
            doc = next(it, None)
            if doc is None:
                iters.remove(it)
            else:
                yield doc


PARTS = {
    "docs": "Python language reference sections (pydoc_data.topics) and stdlib module docstrings",
    "chats": f"{len(CHAT_REQUESTS)} SmolLM2-135M-Instruct answers to built-in requests, "
             f"settings {CHAT_SETTINGS}",
    "all": "docs and chats interleaved 2:1 (see nlakit.corpus.builtin)",
    "writing": f"{len(WRITING_GENRES) * len(WRITING_TOPICS)} plain documents SmolLM2-135M-Instruct "
               f"writes in {len(WRITING_GENRES)} genres x {len(WRITING_TOPICS)} topics, settings "
               f"{WRITING_SETTINGS}",
    "code": "code excerpts of the stdlib modules (from the first top-level def/class)",
    "wide": "all, then writing and code alternating (see nlakit.corpus.builtin)",
}


def builtin_corpus(spec: str, *, tokenizer=None, max_docs=None, chat_model=None) -> Corpus:
    part = spec.partition(":")[2] or "all"
    if part not in PARTS:
        raise NLAError(f"unknown built-in corpus {spec!r}: use builtin or builtin:PART with PART "
                       f"one of {', '.join(p for p in PARTS if p != 'all')}")

    def all_():
        return _interleave(doc_documents(), _chat_documents(tokenizer, chat_model))

    factory = {
        "docs": doc_documents,
        "chats": lambda: _chat_documents(tokenizer, chat_model),
        "all": all_,
        "writing": lambda: _writing_documents(chat_model),
        "code": stdlib_code,
        "wide": lambda: itertools.chain(all_(), _alternate(_writing_documents(chat_model),
                                                           stdlib_code())),
    }[part]
    desc = {"source": spec, "format": "builtin", "contents": PARTS[part], "max_docs": max_docs}
    return Corpus(desc, factory, max_docs)
