"""Which programming language a real answer's code is in, by rules a reviewer can check.

The python_bias dev set is real answers to programming requests
(../shared/eval/prompts_code_alpaca_2k.jsonl: the dataset's own reference answers, and the
default model's answers to the same requests), labelled Python / another language. The labels
must be defensible without trusting a statistical guesser (pygments' `guess_lexer` calls most of
these snippets "Tera Term macro" or "scdoc"), so:

- **Python**: the code parses with Python's own parser (`ast`) and contains a statement no
  bare expression has (def, class, import, a loop, a branch, with, try) or a call spread over
  several lines;
- **another language**: the code does *not* parse as Python and carries an unambiguous marker
  of exactly one other language (`console.log`, `#include`, `System.out`, `SELECT … FROM`, …);
- everything else (prose, a bare value, two languages' markers, none) is dropped.

Code is taken from fenced blocks when the answer has them (the fence's own language tag, when it
names one, decides), else the answer is read as code.
"""

from __future__ import annotations

import ast
import re
import warnings

FENCE = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)(?:```|$)", re.DOTALL)

# Unambiguous markers of one language each (checked on code that does not parse as Python).
MARKERS: dict[str, tuple[str, ...]] = {
    "javascript": (
        r"\bconsole\.log\(",
        r"\bdocument\.\w+",
        r"=>\s*[{(\w]",
        r"\bfunction\s+\w+\s*\(.*\)\s*\{",
        r"^\s*(?:const|let|var)\s+\w+\s*=",
        r"\brequire\(['\"]",
    ),
    "java": (
        r"\bSystem\.out\.print",
        r"\bpublic\s+(?:static\s+)?(?:void|int|String|class|boolean|double)\b",
        r"\bString\[\]",
        r"\bnew\s+\w+<",
    ),
    "c/c++": (r"^\s*#include\s*[<\"]", r"\bstd::", r"\bcout\s*<<", r"\bprintf\s*\(", r"\bint\s+main\s*\("),
    "csharp": (r"\bConsole\.Write(?:Line)?\(", r"^\s*using\s+System"),
    "sql": (
        r"(?is)\bSELECT\b.+\bFROM\b",
        r"(?i)\bCREATE\s+TABLE\b",
        r"(?i)\bINSERT\s+INTO\b",
        r"(?i)\bUPDATE\s+\w+\s+SET\b",
        r"(?i)\bDELETE\s+FROM\b",
    ),
    "html/css": (
        r"(?i)<(?:html|div|body|table|form|p|h[1-6]|ul|li|span|head|button|input)\b",
        r"^[ \t]*[.#][\w-]+[ \t]*\{",
        r"^[ \t]*[\w-]+:[ \t]*[\w#-]+;[ \t]*$",
    ),
    "php": (r"<\?php", r"^\s*\$\w+\s*=.*;\s*$", r"\becho\s+[\"'$]"),
    "ruby": (r"^\s*puts\s", r"\.each\s+do\s*\|", r"^\s*end\s*$"),
    "bash": (r"^#!/bin/(?:ba)?sh", r"^\s*echo\s+\$", r"\bfi\s*$"),
    "go": (r"^\s*package\s+main", r"\bfmt\.\w+\(", r"\bfunc\s+\w+\s*\(.*\)\s*\w*\s*\{"),
    "r": (r"\w+\s*<-\s*", r"\bc\(\d"),
}
COMPILED = {lang: [re.compile(m, re.MULTILINE) for m in marks] for lang, marks in MARKERS.items()}
PYTHON_TAGS = {"python", "py", "python3", "py3"}
PYTHON_STATEMENTS = {
    "FunctionDef",
    "AsyncFunctionDef",
    "ClassDef",
    "Import",
    "ImportFrom",
    "For",
    "While",
    "If",
    "With",
    "Try",
}


def code_of(answer: str) -> tuple[str, str | None]:
    """(the answer's code, the first fence's language tag or None)."""
    blocks = FENCE.findall(answer)
    if not blocks:
        return answer, None
    tag = next((t.lower() for t, _ in blocks if t), None)
    return "\n".join(body for _, body in blocks), tag


def parses_as_python(code: str) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences in other languages' strings
        try:
            tree = ast.parse(code)
        except (SyntaxError, ValueError):
            return False
    kinds = {type(node).__name__ for node in ast.walk(tree)}
    return bool(kinds & PYTHON_STATEMENTS) or ("Call" in kinds and len(code.strip().splitlines()) > 1)


def other_languages(code: str) -> set[str]:
    return {lang for lang, marks in COMPILED.items() if any(m.search(code) for m in marks)}


def language(answer: str) -> str | None:
    """'python', another language's name, or None when the rules cannot tell."""
    code, tag = code_of(answer)
    if tag in PYTHON_TAGS:
        return "python" if parses_as_python(code) else None
    if tag:
        others = other_languages(code)
        return tag if not parses_as_python(code) and (not others or others == {_family(tag)}) else None
    if parses_as_python(code):
        return "python"
    others = other_languages(code)
    return others.pop() if len(others) == 1 else None


def _family(tag: str) -> str:
    return {
        "js": "javascript",
        "javascript": "javascript",
        "ts": "javascript",
        "typescript": "javascript",
        "c": "c/c++",
        "cpp": "c/c++",
        "c++": "c/c++",
        "cs": "csharp",
        "csharp": "csharp",
        "c#": "csharp",
        "html": "html/css",
        "css": "html/css",
        "sh": "bash",
        "shell": "bash",
        "bash": "bash",
        "golang": "go",
    }.get(tag, tag)
