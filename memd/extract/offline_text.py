"""Text rules of the offline extractor (SPEC §19): pure functions over strings, no memd imports.

* :func:`unwrap_request` — the user's own words out of a Codex Desktop / IDE wrapper, with the
  files it mentions kept as pointers.
* :func:`strip_placeholders` / :func:`is_absent` — redacted or trimmed text (``[REDACTED_TEXT
  len=86 sha=2239bcba]``, ``[trimmed for fixture]``) counts as absent, never as a task.
* :func:`reaction_kind` — short replies that are feedback on the task before them (approval,
  rejection, acknowledgement, "continue"), not new tasks.
* :func:`preferences` — imperative sentences of the user (always / never / don't / prefer ...).
* small helpers: :func:`one_line`, :func:`first_sentence`, :func:`command_words`.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from enum import StrEnum

#: Most user preferences kept per session.
MAX_PREFERENCES = 10

# Placeholders of sanitised sources (``[REDACTED_TEXT len=86 sha=2239bcba]``, ``[REDACTED_NAME ...]``,
# bare ``[REDACTED_API_KEY]``) and trimmed fixtures. memd's own ``[REDACTED_SECRET]`` marks a
# secret inside real text: it is kept by :func:`strip_placeholders` but is no content either.
_SOURCE_PLACEHOLDER = re.compile(
    r"\[(?:REDACTED_(?!SECRET\])[A-Z_]+(?:\s+len=\d+)?(?:\s+sha=[0-9a-fA-F]+)?|trimmed for fixture)\]"
)
_ANY_PLACEHOLDER = re.compile(r"\[(?:REDACTED_[A-Z_]+[^\]]*|trimmed for fixture)\]")
_REDACTED_PATH = re.compile(r"(?:/redacted/path/[0-9a-f]+|redacted://url/[0-9a-f]+)")

_WRAPPER_HEADS = ("# files mentioned by the user:", "# context from my ide setup:")
_REQUEST_HEADING = re.compile(r"^##\s*My request for Codex:\s*$", re.MULTILINE | re.IGNORECASE)
_MENTION = re.compile(r"^##\s+(?P<name>[^:\n]{1,200}):\s*(?P<path>\S[^\n]*)$")
_TAB = re.compile(r"^[-*]\s+(?P<name>[^:\n]{1,200}):\s*(?P<path>\S[^\n]*)$")
_SECTION_LABELS = ("active file", "open tabs", "active selection", "my request for codex")

_APPROVAL = re.compile(
    r"^\W*(?:thanks?|thank you|thx|ty|great|perfect|awesome|excellent|nice|cool|lgtm|"
    r"looks good|looks great|works|it works|that works|works now|working now|all good|good job|"
    r"well done|amazing|brilliant|exactly|love it|ship it)\b",
    re.IGNORECASE,
)
_ACK = re.compile(r"^\W*(?:ok|okay|k|yes|yep|yeah|sure|got it|alright|fine|done|noted)\b\W*$", re.IGNORECASE)
_CONTINUE = re.compile(
    r"^\W*(?:continue|go on|carry on|keep going|proceed|go ahead|next|do it|yes,? (?:please|do it|go ahead)|"
    r"what else|anything else|and\?|more)\W*$",
    re.IGNORECASE,
)
# "great, but ...", "it's good, however ...": a correction of the current task, not approval.
_REFINE_BUT = re.compile(
    r"^\W*(?:it'?s good|that'?s good|good|great|nice|fine|ok(?:ay)?|looks good|the main idea is fine|"
    r"the idea is fine|sounds good|correct)\W+(?:but|however|though)\b",
    re.IGNORECASE,
)
# Openings of a correction or added context for the current task.
_REFINE_START = re.compile(
    r"^\W*(?:no\b|not\b|nope\b|don'?t\b|do not\b|we don'?t\b|there is no need|no need|but\b|however\b|"
    r"more context|actually\b|instead\b|i think\b|it'?s not\b|ir'?s not\b|that'?s not\b|also\b|"
    r"keep in mind|remember\b|wait\b|it'?s (?:a )?bad|bad idea|that'?s (?:a )?bad)",
    re.IGNORECASE,
)
_REJECTION = re.compile(
    r"\b(?:doesn'?t work|does not work|didn'?t work|did not work|not working|isn'?t working|"
    r"still (?:fails|failing|broken|not working|wrong|the same|doesn'?t)|broken|wrong|incorrect|"
    r"that'?s not (?:it|right|what)|not what i|revert|undo (?:that|this|it)|you broke|"
    r"same error|fails again|failed again|nope)\b|^\W*no\b",
    re.IGNORECASE,
)
_TRIVIAL = re.compile(
    r"^\W*(?:hi|hello|hey|yo|hiya|good (?:morning|afternoon|evening)|greetings|bye|test|ping|"
    r"(?:show|list|what are) (?:the |your |all )?(?:tools|commands|skills)|help|what can you do|"
    r"who are you|what do you do)\b[\W\w]{0,40}$|"
    r"^\W*(?:what|which|how many|can|do|are)\b[^?]{0,40}"
    r"\b(?:can you|do you|are you|you (?:do|know|support))\b[^?]{0,30}\?\s*$",
    re.IGNORECASE,
)
# A preference marker anywhere in a sentence ...
_PREFERENCE = re.compile(
    r"\b(?:prefer|preferably|avoid|must not|mustn'?t|should not|shouldn'?t|no need to|"
    r"please use|use [^.;,]{1,40} instead|instead of|stop (?:using|doing|adding)|is crucial|"
    r"important not to|it'?s important to)\b",
    re.IGNORECASE,
)
# ... or an imperative at its start (or after a dash / colon): "Don't use frameworks — keep it pure JS".
_IMPERATIVE = re.compile(
    r"(?:^|[—:;,-]\s*|\bplease\s+|\byou should\s+)(?:always|never|don'?t|do not|doesn'?t need to|"
    r"make sure|keep it|please (?:don'?t|do not|keep|use))\b",
    re.IGNORECASE,
)
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+|\n+")
_FENCE = re.compile(r"```.*?(?:```|$)", re.DOTALL)
_WS = re.compile(r"\s+")


class Reaction(StrEnum):
    """A short user reply that reacts to the task before it instead of asking for a new one."""

    APPROVE = "approve"
    REJECT = "reject"
    ACK = "ack"
    CONTINUE = "continue"
    REFINE = "refine"


@dataclass(frozen=True, slots=True)
class Mention:
    """A file named by a wrapper (``## notes.md: /home/me/app/notes.md``, ``## Active file: x``).

    Attributes:
        name: the label (a file name, or ``active file`` / ``open tab``).
        path: the path as written.
    """

    name: str
    path: str


@dataclass(frozen=True, slots=True)
class Request:
    """A user message as a request: the user's words and the files a wrapper mentioned.

    Attributes:
        text: the request text (``""`` when the message is absent: redacted, trimmed, empty).
        mentioned: files a Codex Desktop / IDE wrapper listed, in order.
    """

    text: str
    mentioned: tuple[Mention, ...] = ()


def one_line(text: str, max_chars: int) -> str:
    """``text`` on one line (white space folded), cut to ``max_chars`` with ``…``."""
    line = _WS.sub(" ", text).strip()
    return line if len(line) <= max_chars else line[: max_chars - 1].rstrip() + "…"


def strip_placeholders(text: str) -> str:
    """``text`` without the placeholders of sanitised sources and trimmed fixtures (memd's own
    ``[REDACTED_SECRET]`` stays) and without redacted paths."""
    return _REDACTED_PATH.sub(" ", _SOURCE_PLACEHOLDER.sub(" ", text))


def is_absent(text: str) -> bool:
    """Whether ``text`` says nothing once every placeholder is removed (SPEC §19: redacted or
    trimmed text is absent, not a task)."""
    rest = _REDACTED_PATH.sub(" ", _ANY_PLACEHOLDER.sub(" ", text))
    return re.search(r"[A-Za-z0-9]", rest) is None


def unwrap_request(text: str) -> Request:
    """The user's request out of one user message (SPEC §19).

    Codex Desktop and the IDE extensions send ``# Files mentioned by the user:`` (``## <name>:
    <path>`` sections) or ``# Context from my IDE setup:`` (``## Active file: ...``, ``## Open
    tabs:`` with ``- <name>: <path>`` lines, ``## Active selection ...``) followed by ``## My
    request for Codex:`` and the request. The request is the text after that heading; the
    files become :class:`Mention` pointers. Any other text is the request itself. Placeholders
    are removed; an absent message gives ``Request("")``.
    """
    cleaned = strip_placeholders(text).strip()
    if is_absent(cleaned):
        return Request("")
    if not cleaned.lower().startswith(_WRAPPER_HEADS):
        return _at_mentions(cleaned)
    match = _REQUEST_HEADING.search(cleaned)
    head, request = (cleaned[: match.start()], cleaned[match.end() :].strip()) if match else (cleaned, "")
    return Request(request if not is_absent(request) else "", tuple(_mentions(head)))


_AT_FILE = re.compile(r"^@(?P<path>[\w./~-]*[/.][\w./~-]*)\s+")


def _at_mentions(text: str) -> Request:
    """Claude Code's leading ``@path`` file mentions become pointers; the rest is the request."""
    mentioned: list[Mention] = []
    while True:
        match = _AT_FILE.match(text)
        if match is None or not text[match.end() :].strip():
            return Request(text, tuple(mentioned))
        mentioned.append(Mention("file", match.group("path")))
        text = text[match.end() :].strip()


def _mentions(head: str) -> list[Mention]:
    out: list[Mention] = []
    in_tabs = False
    for raw in head.splitlines():
        line = raw.strip()
        if line.startswith("## "):
            label = line[3:].strip().rstrip(":").lower()
            in_tabs = label.startswith("open tabs")
            if label.startswith("active file"):
                out.append(Mention("active file", line.split(":", 1)[1].strip()))
                continue
            match = _MENTION.match(line)
            if match and not label.startswith(_SECTION_LABELS):
                out.append(Mention(match.group("name").strip(), match.group("path").strip()))
        elif in_tabs:
            tab = _TAB.match(line)
            if tab:
                out.append(Mention(tab.group("name").strip(), tab.group("path").strip()))
    return [m for m in out if m.path]


def reaction_kind(text: str) -> Reaction | None:
    """The :class:`Reaction` a short reply expresses, ``None`` for a new request."""
    words = len(text.split())
    if words == 0:
        return Reaction.ACK
    if _REFINE_BUT.match(text):
        return Reaction.REFINE
    if words <= 4 and _CONTINUE.match(text):
        return Reaction.CONTINUE
    if words <= 12 and _REJECTION.search(text):
        return Reaction.REJECT
    if words <= 8 and _APPROVAL.match(text):
        return Reaction.APPROVE
    if words <= 3 and _ACK.match(text):
        return Reaction.ACK
    if _REFINE_START.match(text):
        return Reaction.REFINE
    return None


def is_trivial_text(text: str) -> bool:
    """A greeting, a meta question ("show tools", "what can you do") or a one-word message."""
    words = text.split()
    return len(words) <= 1 or bool(_TRIVIAL.match(text))


def preferences(messages: list[str]) -> list[str]:
    """Imperative sentences of real user messages (outside code fences, not questions),
    de-duplicated, at most :data:`MAX_PREFERENCES`."""
    seen: dict[str, None] = {}
    for message in messages:
        text = _FENCE.sub(" ", message.replace("\u2019", "'").replace("\u2018", "'"))
        for sentence in _SENTENCE_SPLIT.split(text):
            s = sentence.strip().lstrip("-*•\t >").strip()
            if not s or s.endswith("?") or is_absent(s) or s.startswith(("//", "#", "$ ")):
                continue
            if len(s.split()) >= 3 and (_PREFERENCE.search(s) or _IMPERATIVE.search(s)):
                seen.setdefault(one_line(s, 200), None)
            if len(seen) >= MAX_PREFERENCES:
                return list(seen)
    return list(seen)


def first_sentence(text: str, max_chars: int) -> str:
    """The first sentence of ``text`` on one line: markdown emphasis, headings and list marks
    removed, heading-like lines (fewer than four words, no final punctuation) skipped."""
    text = re.sub(r"\*\*|__|^\s*#+\s*|^\s*(?:[-*]|\d{1,2}[.)])\s+", "", text, flags=re.MULTILINE).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("|")]
    line = next(
        (ln for ln in lines if len(ln.split()) >= 8 or (len(ln.split()) >= 4 and ln.endswith((".", "!", "?")))),
        lines[0] if lines else "",
    )
    first, *rest = re.split(r"(?<=[.!?])\s+(?=[A-Z])", line, maxsplit=1)
    if rest and len(first.split()) >= 4:
        line = first
    return one_line(line, max_chars)


_INTERJECTION = re.compile(
    r"^(?:(?:perfect|done|great|excellent|good|nice|brilliant|sure|ok(?:ay)?|got it|absolutely|"
    r"you'?re (?:absolutely )?right|excellent (?:point|catch|question)|good (?:catch|point|question))"
    r"\b[^.!?\n]{0,20}[.!?:]\s*)+",
    re.IGNORECASE,
)


_INTENT = re.compile(r"^(?:I'?ll|I will|I'?m going to|Let me|Now let me|Now I'?ll|Next,? I)\b", re.IGNORECASE)


def answer_gist(text: str, max_chars: int) -> str:
    """The first informative sentence of an answer: interjections ("Perfect!", "You're absolutely
    right!") and heading-like lines skipped; ``""`` when nothing is left."""
    body = _INTERJECTION.sub("", re.sub(r"\*\*|__", "", _FENCE.sub("\n", text)).strip())
    lines = [ln for ln in body.splitlines() if ln.strip() and not ln.rstrip().endswith(":")]
    gist = first_sentence("\n".join(lines), max_chars) if lines else ""
    return "" if _INTENT.match(gist) else gist


def command_words(command: str) -> list[str]:
    """Shell words of ``command`` (``cd X &&`` prefixes and ``VAR=value`` assignments dropped;
    falls back to white space splitting when the quoting is broken)."""
    text = command.strip()
    while text.startswith("cd ") and "&&" in text:
        text = text.split("&&", 1)[1].strip()
    try:
        words = shlex.split(text, comments=False)
    except ValueError:
        words = text.split()
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        words = words[1:]
    return words
