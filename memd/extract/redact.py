"""Secret redaction for model input and every output (SPEC §14).

:func:`redact` replaces secrets with :data:`REDACTED` and returns how many it replaced. It runs
on all session text before it leaves the machine (the input builder) and again on the
extractor's output (:func:`memd.extract.contract.normalise`).

What is detected (the shapes of the provider tokens follow gitleaks' rule list,
``config/gitleaks.toml``):

* provider keys by their prefix: OpenAI ``sk-`` / ``sk-proj-`` / ``sk-svcacct-``, Anthropic
  ``sk-ant-``, AWS access key ids ``AKIA`` / ``ASIA`` (and a 40-character secret key that follows
  one within 300 characters, or follows the words "secret access key" in any spelling within 120:
  ``aws configure set aws_secret_access_key <key>``), GitHub ``ghp_`` / ``gho_`` / ``ghs_`` /
  ``ghu_`` / ``ghr_`` / ``github_pat_``, GitLab ``glpat-``, Slack ``xox?-`` (``xoxe-`` refresh
  tokens and ``xoxe.xoxp-`` configuration tokens included) and ``xapp-``, Stripe ``sk_live_`` /
  ``rk_live_`` (and ``_test_``), Google ``AIza``, npm ``npm_``, Hugging Face ``hf_``, SendGrid
  ``SG.``, Azure AD client secrets (``...Q~...``);
* JWTs (three base64url segments, the first starting ``eyJ``);
* PEM private key blocks (``-----BEGIN ... PRIVATE KEY-----`` to its END line, or to the end of
  the base64 body when the END line is missing);
* ``Bearer <token>`` and ``Authorization: <scheme> <credential>`` (the scheme word is kept);
* credentials in URLs: ``scheme://user:pass@host`` becomes ``scheme://[REDACTED_SECRET]@host``
  (an empty user too: ``redis://:pass@host``);
* credentials given to commands: ``curl -u user:pass`` / ``--user`` / ``--proxy-user`` (the
  password goes), ``<tool> login ... -p pass`` (docker, podman, helm, az, ...), the value piped
  into ``--password-stdin`` (``echo 'pass' | docker login ...``, ``<<< 'pass'``), ``mysql`` /
  ``mariadb`` / ``mysqldump`` ``-pPASS``, and Docker ``config.json`` ``"auth": "<base64>"``;
* assignments ``name = value`` / ``name: value`` / ``--name value`` where the name ends in a
  secret word (see below), in env files, shell, JSON, YAML, TOML and source code, and the prose
  form ``the password is <value>`` when the value looks like a secret.

Why not a library: ``detect-secrets`` 1.5 scored 0.86 recall with 88 of 100 look-alikes flagged
(its entropy plugins take hashes for secrets) at 0.01 MB/s on the corpus of
:mod:`memd.bench.redaction`; gitleaks is a Go program, and its ~200 rules as Python patterns
would each cost a pass over the text. The prefixes and lengths above are taken from its rules.

The assignment rule (documented decision, SPEC §14 "key/token/secret/password = value"):

* *Strong* names end in ``password``, ``passwd``, ``pwd``, ``passphrase``, ``secret``, ``token``,
  ``credential(s)``, or ``key`` qualified by ``api``/``secret``/``access``/``private``/``auth``/
  ``client``/``signing``/``encryption``/``master``/``session``/``license``/``app``/``account``/
  ``service`` (``OPENAI_API_KEY``, ``apiKey``, ``aws_secret_access_key``, ``client_secret``,
  ``GITHUB_TOKEN``, ``db_password``). The name must end at the keyword, so ``tokenizer``,
  ``token_count``, ``max_tokens`` and ``password_hash`` never match.
* A *quoted literal* value of a strong name is redacted (``CODEMIE_API_KEY: 'sk-secret'``,
  ``"password": "hunter2"``), unless it is empty, a placeholder (``REDACTED_API_KEY``, ``$VAR``,
  ``${VAR}``, ``<your-key>``, ``{{ var }}``, ``****``, ``xxxx``) or prose (five words or more).
* An *unquoted* value in env/CLI style (``NAME=value`` without spaces where ``NAME`` is upper
  case or a ``--flag``, or a URL query ``?token=value``) is redacted unless it is a placeholder.
* Any other unquoted value (source code, YAML) is redacted only when it looks like a secret:
  six characters or more with a digit or a symbol, or sixteen characters or more. Identifiers,
  calls and attribute paths (``password = getpass()``, ``token = os.environ["T"]``,
  ``api_key=settings.api_key``, ``password: str``) are left alone: they name a value, they are
  not one. File paths (``PWD=/home/me``) are left alone too.
* *Weak* names (bare ``key`` or another ``*_key`` such as ``cache_key``) are redacted only when
  the value looks like a key: sixteen characters or more, letters and digits, no spaces.

Speed: the patterns run on an ASCII copy of the text as bytes (non-ASCII characters become
``?``, one byte each, so indices match; a ``str`` with one emoji is stored with 4 bytes per
character and scans slower) and on its lower-cased copy. Every pattern starts with a literal,
which ``re`` finds with a tight C loop (from a rare letter of the keyword where that helps);
families with the same first literal share one pattern, so a text costs 16 such passes. Secret
spans found by different families are merged before the single rebuild of the string, so the
cost is linear in the text size. A non-ASCII space inside a URL's ``user:password`` does not end
the match as it would in a ``str`` pattern: that only widens a redaction.
"""

from __future__ import annotations

import re
from collections.abc import Callable

#: The replacement for every secret.
REDACTED = "[REDACTED_SECRET]"

#: Collects one secret span ``(start, end)`` (character offsets into the text).
_Add = Callable[[tuple[int, int]], None]

# The PEM patterns run on the text itself (only when "PRIVATE KEY" occurs).
_PEM = re.compile(
    r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----"
    r"(?:[^\x00]*?-----END [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----"
    # no END line (cut off): the following lines that are pure base64 (also "\\n"-escaped)
    r"|(?:(?:\r?\n|\\n)[A-Za-z0-9+/=]+(?=\r?\n|\\n|[\"']|$))*)"
)
_PEM_END = re.compile(r"-----END [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----")
_PEM_BODY_LINE = re.compile(r"[A-Za-z0-9+/=]+")
# The other patterns run on an ASCII copy of the text (bytes, every non-ASCII character
# replaced by "?", so indices are the text's): one byte per character is the cheapest scan.
# Every pattern starts with a literal so that ``re`` scans for it at C speed; the "not preceded
# by a word character" checks are lookbehinds placed after the literal for the same reason.
# Families that share a first literal are one pattern (one pass over the text).
# Some patterns start at a rarer letter inside their keyword (the scan stops less often) and
# check the rest with a lookbehind: the match then starts that many characters late.
_OPENAI = re.compile(  # "sk-", matched from its "k" (1 late)
    rb"k-(?<=sk-)(?<![A-Za-z0-9_-]sk-)(?:ant-|proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}"
)
_STRIPE = re.compile(rb"k_(?:live|test)_[A-Za-z0-9]{10,}")  # preceded by s/r: checked in code
_AWS_ID = re.compile(rb"A[KS]IA(?<![A-Z0-9]A[KS]IA)[A-Z0-9]{16}(?![A-Z0-9])")  # AKIA, ASIA
_AWS_SECRET_AFTER = re.compile(rb"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")
_PREFIXED = (
    re.compile(  # GitHub ghp_/gho_/ghs_/ghu_/ghr_ and github_pat_, GitLab glpat-
        rb"g(?<![A-Za-z0-9_]g)"
        rb"(?:h[pousr]_[A-Za-z0-9]{30,}|ithub_pat_[A-Za-z0-9_]{30,}|lpat-[A-Za-z0-9_-]{20,})"
    ),
    # Slack xoxb-/xoxp-/xoxa-/xoxe-/... and configuration tokens "xoxe.xoxp-1-..."; app tokens xapp-
    re.compile(rb"x(?<![A-Za-z0-9_]x)(?:ox[a-z](?:\.xox[a-z])?|app)-[A-Za-z0-9-]{10,}"),
    re.compile(rb"AIza(?<![A-Za-z0-9_]AIza)[0-9A-Za-z_-]{35}"),
    re.compile(rb"SG\.(?<![A-Za-z0-9_]SG\.)[A-Za-z0-9_-]{16,32}\.[A-Za-z0-9_-]{16,64}"),  # SendGrid
)
# npm access tokens (npm_ + 36) and Hugging Face tokens (hf_ + 30-40, mixed case: checked in code),
# matched from the "_" (one pass for both; the match starts 3 or 2 late).
_NPM_HF = re.compile(
    rb"_(?:(?<=npm_)(?<![A-Za-z0-9_]npm_)[A-Za-z0-9]{36}|(?<=hf_)(?<![A-Za-z0-9_]hf_)[A-Za-z0-9]{30,40})"
    rb"(?![A-Za-z0-9_])"
)
# Azure AD client secrets: 3 characters, a digit, "Q~", 31-34 more (gitleaks azure-ad-client-secret);
# matched from the "Q~" (4 late).
_AZURE = re.compile(rb"Q~(?<=[A-Za-z0-9_~.]{3}[0-9]Q~)[A-Za-z0-9_~.-]{31,34}(?![A-Za-z0-9_~.-])")
# Docker's config.json "auths": {"host": {"auth": "<base64 user:password>"}} (also JSON-escaped).
_DOCKER_AUTH = re.compile(rb"auth(?<![A-Za-z0-9_]auth)\\?\"[ \t]*:[ \t]*\\?\"([A-Za-z0-9+/]{8,}=*)")
_JWT = re.compile(  # "eyJ", matched from its "J" (2 late)
    rb"J(?<=eyJ)(?<![A-Za-z0-9_-]eyJ)[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"
)
_URL_CREDS = re.compile(rb"://([^\s/@:\"'<>]*:[^\s/@\"'<>]+)@")  # the user may be empty
# The following run on the lower-cased ASCII copy (same indices as the original).
_BEARER = re.compile(rb"bearer(?<![a-z0-9_]bearer)[ \t]+([a-z0-9._~+/-]{8,}=*)")
_AUTHORIZATION = re.compile(  # only group 1 is used: matched from the "z" of "authorization"
    rb"zation(?<=authorization)[\"']?[ \t]*[:=][ \t]*[\"']?"
    rb"(?:(?:basic|token|digest|negotiate)[ \t]+)?([^\s\"',;]{6,})"
)
# Not started inside a run of dashes (a "-----" rule line would cost quadratic time; the match
# starting at the run's first two dashes is the same one).
_FLAG = re.compile(
    rb"--(?<!---)[a-z0-9_-]*?(?:password|passwd|passphrase|token|secret|api-key|api_key|apikey)"
    rb"[ \t]+(?!-)([^\s\"']+|\"[^\"\n]*\"|'[^'\n]*')"
)
# Credentials given to a command on its line, one pass from the flag's dash (original case):
# ``curl -u user:password`` / ``--user`` / ``--proxy-user`` (group 1); ``-p`` (group 2, its separator
# group 3): ``<tool> login ... -p password`` (docker, podman, helm registry, az, ...) and ``mysql`` /
# ``mariadb`` / ``mysqldump`` ``-pPASSWORD`` (attached). The command word is checked in code.
_CMD_FLAG = re.compile(
    rb"-(?<=[ \t]-)(?:(-user|-proxy-user|[A-Za-z]*[uU])(?:[ \t]+|=)|(p)([ \t]+|=)?)(\\?[\"']?)([^\s\"'\\]+)"
)
_CURL_WORD = re.compile(rb"(?<![a-z0-9_])curl(?![a-z0-9_])")
_LOGIN_WORD = re.compile(rb"(?<![a-z0-9_])login(?![a-z0-9_-])")
_MYSQL_WORD = re.compile(rb"(?<![A-Za-z0-9_])(?:mysql|mariadb)[a-z]*(?![A-Za-z0-9_])")
_COMMAND_BREAKS = (b"\n", b"\\n", b"|", b";", b"&")
# ``echo 'password' | docker login ... --password-stdin``: the echoed value before the pipe.
_STDIN_ECHO = re.compile(
    rb"(?:echo|printf(?:[ \t]+\\?[\"']%s(?:\\n)?\\?[\"'])?)(?:[ \t]+-[a-z]+)*[ \t]+(\\?[\"']?)([^\s\"'\\|]+)\1[ \t]*\|"
)
# The AWS secret access key named in words or as a key, then the 40-character key within 120
# characters: ``aws configure set aws_secret_access_key <key>``, ``AWS Secret Access Key [None]: <key>``.
_AWS_SECRET_NAME = re.compile(  # from the rare "k": cheaper to scan for than "secret"
    rb"key(?:(?<=secret[_ -]access[_ -]key)|(?<=secretaccesskey)|(?<=secret[_ -]accesskey)|(?<=secretaccess[_ -]key))"
)
_HERE_STRING = re.compile(rb"[^\n\r|;&]{0,200}?<<<[ \t]*(\\?[\"']?)([^\s\"'\\]+)")
# Assignment candidates: a secret keyword, an optional closing quote of a JSON/dict key, then
# ``:`` or ``=`` (not ``==``, ``=>``, ``::``). ``(pattern, characters the match starts late)``.
_ASSIGNS = tuple(
    (re.compile(kw + rb"(\\?[\"']?)(?:[ \t]*([:=])(?![=>:])|[ \t]+(is)[ \t])"), late)
    for kw, late in (
        (rb"key", 0),
        (rb"ken(?<=token)", 2),
        (rb"cret(?<=secret)", 2),
        (rb"p(?:ass(?:word|wd|phrase)|wd)", 0),
        (rb"credentials?", 0),
    )
)
_SEPARATOR = "\n\x00\n"
_KEY_QUALIFIERS = (
    "api",
    "apikey",
    "secret",
    "access",
    "private",
    "auth",
    "client",
    "signing",
    "encryption",
    "master",
    "session",
    "license",
    "app",
    "account",
    "service",
)
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
_UNQUOTED_VALUE = re.compile(r"[^\s\"',;)}\]>&<`]*")
_PROSE_VALUE = re.compile(r"[^\s\"',;)}\]>&<`\\]*")  # "... is <value>": ends at a backslash (an escape)
_PLACEHOLDER_WORDS = frozenset(
    {
        "null",
        "none",
        "nil",
        "true",
        "false",
        "undefined",
        "redacted",
        "str",
        "string",
        "int",
        "bool",
        "bytes",
        "float",
        "number",
        "boolean",
        "any",
        "object",
        "dict",
        "list",
        "optional",
        "secretstr",
        "required",
        "optional[str]",
    }
)
_ATTRIBUTE_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+")
_KEY_LIKE = re.compile(r"(?=[^\s]*[A-Za-z])(?=[^\s]*[0-9])[^\s]{16,}")
_SYMBOLS = frozenset("!@#%^&*+/=~?|\\")


def redact(text: str) -> tuple[str, int]:
    """Replace every secret in ``text`` with :data:`REDACTED`.

    Args:
        text: any text (model input, tool output, model output).

    Returns:
        ``(redacted_text, count)``: the text with each secret span replaced, and the number of
        spans replaced. Text without secrets is returned unchanged (the same object) with 0.
        Applying :func:`redact` to its own output replaces nothing more.
    """
    if not text:
        return text, 0
    spans: list[tuple[int, int]] = []
    add = spans.append
    # One byte per character, non-ASCII ones as "?": indices match ``text``.
    raw = text.encode("ascii") if text.isascii() else text.encode("ascii", "replace")
    _token_spans(text, raw, add)
    _aws_id_spans(text, raw, add)
    _credential_spans(text, raw, add)
    _named_spans(text, raw, raw.lower(), add)  # ASCII letters only lowered: indices still match
    if not spans:
        return text, 0
    return _replace_spans(text, spans)


def _token_spans(text: str, raw: bytes, add: _Add) -> None:
    """Provider tokens recognised by their shape (OpenAI, Anthropic, Stripe, GitHub, GitLab, Slack,
    Google, npm, Hugging Face, SendGrid, Azure, JWTs, PEM blocks)."""
    if b"PRIVATE KEY" in raw:
        _find_pem(text, add)
    for m in _OPENAI.finditer(raw):
        if _has_digit_and_letter(text[m.start() + 2 : m.end()]):
            add((m.start() - 1, m.end()))
    for m in _STRIPE.finditer(raw):
        start = m.start() - 1
        if start >= 0 and text[start] in "sr" and (start == 0 or not _is_word(text[start - 1])):
            add((start, m.end()))
    for pattern in _PREFIXED:
        for m in pattern.finditer(raw):
            add(m.span())
    for m in _NPM_HF.finditer(raw):
        if raw[m.start() - 3 : m.start()] == b"npm":
            add((m.start() - 3, m.end()))
        elif _has_upper_and_lower(text[m.start() + 1 : m.end()]):
            add((m.start() - 2, m.end()))
    for m in _AZURE.finditer(raw):
        add((m.start() - 4, m.end()))
    for m in _JWT.finditer(raw):
        add((m.start() - 2, m.end()))


def _aws_id_spans(text: str, raw: bytes, add: _Add) -> None:
    """AWS access key ids, and the secret access key that follows one within 300 characters."""
    for m in _AWS_ID.finditer(raw):
        add(m.span())
        window_end = min(len(raw), m.end() + 300)
        nul = raw.find(b"\x00", m.end(), window_end)
        if nul != -1:
            window_end = nul
        _first_aws_secret(text, raw, m.end(), window_end, add)


def _first_aws_secret(text: str, raw: bytes, start: int, end: int, add: _Add) -> None:
    """Add the first AWS-secret-looking value in ``raw[start:end]``."""
    for s in _AWS_SECRET_AFTER.finditer(raw, start, end):
        if _looks_like_aws_secret(text[s.start() : s.end()]):
            add(s.span())
            return


def _credential_spans(text: str, raw: bytes, add: _Add) -> None:
    """Credentials inside commands and URLs: docker auths, ``user:pass@``, ``-p`` style flags."""
    for m in _DOCKER_AUTH.finditer(raw):
        add(m.span(1))
    for m in _URL_CREDS.finditer(raw):
        add(m.span(1))
    for m in _CMD_FLAG.finditer(raw):
        _check_command_flag(text, raw, m, add)


def _named_spans(text: str, raw: bytes, lowered: bytes, add: _Add) -> None:
    """Values named as secrets (case-insensitive): bearer tokens, Authorization headers,
    ``--password``-like flags, ``--password-stdin`` inputs, AWS secret names, assignments."""
    for m in _BEARER.finditer(lowered):
        token = text[m.start(1) : m.end(1)]
        if len(token) >= 24 or any(c.isdigit() for c in token):
            add(m.span(1))
    for m in _AUTHORIZATION.finditer(lowered):
        value = m.group(1).decode("ascii")
        if not _is_placeholder(value) and value != "bearer" and "(" not in value:
            add(m.span(1))
    for m in _FLAG.finditer(lowered):
        value = m.group(1).decode("ascii").strip("\"'")
        if value and not _is_placeholder(value):
            add(m.span(1))
    if b"password-stdin" in lowered:
        _find_stdin_passwords(text, lowered, add)
    for m in _AWS_SECRET_NAME.finditer(lowered):
        _first_aws_secret(text, raw, m.end(), min(len(raw), m.end() + 120), add)
    for pattern, late in _ASSIGNS:
        for m in pattern.finditer(lowered):
            _check_assignment(text, m, m.start() - late, add)


def _replace_spans(text: str, spans: list[tuple[int, int]]) -> tuple[str, int]:
    """``text`` with every span (overlapping ones merged) replaced by :data:`REDACTED`."""
    spans.sort()
    parts: list[str] = []
    count = 0
    pos = 0
    cur_start, cur_end = spans[0]
    for start, end in spans[1:]:
        if start < cur_end:
            cur_end = max(cur_end, end)
            continue
        parts.append(text[pos:cur_start])
        parts.append(REDACTED)
        count += 1
        pos = cur_end
        cur_start, cur_end = start, end
    parts.append(text[pos:cur_start])
    parts.append(REDACTED)
    parts.append(text[cur_end:])
    count += 1
    return "".join(parts), count


def redact_many(texts: list[str]) -> tuple[list[str], int]:
    """Redact many texts in one pass (cheaper than one :func:`redact` call per short text).

    The texts are joined with a NUL separator that no pattern crosses, redacted once and split
    again. NUL characters inside the texts become U+FFFD.

    Args:
        texts: the texts, in any order.

    Returns:
        ``(redacted_texts, count)``: one redacted text per input text, same order, and the total
        number of secrets replaced.
    """
    if not texts:
        return [], 0
    if len(texts) == 1:
        single, count = redact(texts[0])
        return [single], count
    cleaned = [t.replace("\x00", "\ufffd") if "\x00" in t else t for t in texts]
    joined, count = redact(_SEPARATOR.join(cleaned))
    if count == 0:
        return cleaned, 0
    pieces = joined.split("\x00")
    last = len(pieces) - 1
    out: list[str] = []
    for i, piece in enumerate(pieces):
        if i > 0 and piece.startswith("\n"):
            piece = piece[1:]
        if i < last and piece.endswith("\n"):
            piece = piece[:-1]
        out.append(piece)
    return out, count


def _find_pem(text: str, add: _Add) -> None:
    """PEM private key blocks, and orphan block tails (an END line whose BEGIN was cut off)."""
    covered_to = -1
    for m in _PEM.finditer(text):
        add(m.span())
        covered_to = m.end()
    if covered_to == -1 or "-----END" in text[covered_to:]:
        for m in _PEM_END.finditer(text):
            if m.end() <= covered_to:
                continue
            # Walk back over whole lines of base64 (the body of the block).
            start = m.start()
            floor = max(0, start - 16384)
            while start > floor:
                line_start = text.rfind("\n", floor, start - 1) + 1
                line = text[line_start:start].strip()
                if not line or not _PEM_BODY_LINE.fullmatch(line):
                    break
                start = line_start
            add((start, m.end()))


def _check_command_flag(text: str, raw: bytes, m: re.Match[bytes], add: _Add) -> None:
    """One :data:`_CMD_FLAG` match: add the credential when the command on the line is the one
    that flag belongs to (``curl`` for ``-u``; ``login`` for ``-p value``; mysql for ``-pvalue``)."""
    flag_at = m.start() - 1
    line_start = max(flag_at - 400, 0)
    for brk in _COMMAND_BREAKS:
        at = raw.rfind(brk, line_start, flag_at)
        if at != -1:
            line_start = at + len(brk)
    head = raw[line_start:flag_at]
    value_start, value_end = m.span(5)
    value = text[value_start:value_end]
    if m.start(1) != -1:  # -u / --user: "user:password", the password goes
        if not _CURL_WORD.search(head.lower()):
            return
        user, colon, password = value.partition(":")
        if colon and password and not _is_placeholder(password):
            add((value_start + len(user) + 1, value_end))
        return
    attached = m.start(3) == -1
    if attached and not _MYSQL_WORD.search(head):
        return
    if not attached and not _LOGIN_WORD.search(head.lower()):
        return
    if not _is_placeholder(value):
        add((value_start, value_end))


def _add_command_value(text: str, m: re.Match[bytes], add: _Add) -> None:
    """Add group 2 of a command-flag match (the value after ``-p``), unless it is a placeholder."""
    value = text[m.start(2) : m.end(2)]
    if value and not _is_placeholder(value):
        add(m.span(2))


def _find_stdin_passwords(text: str, lowered: bytes, add: _Add) -> None:
    """``echo 'pw' | docker login --password-stdin`` (and ``printf '%s' 'pw' |``, ``<<< 'pw'``): the
    value piped into a ``--password-stdin`` on the same line."""
    pos = 0
    while (at := lowered.find(b"password-stdin", pos)) != -1:
        pos = at + 14
        line_start = max(lowered.rfind(b"\n", 0, at), lowered.rfind(b"\\n", 0, at) + 1, at - 400, 0)
        for m in _STDIN_ECHO.finditer(lowered, line_start, at):
            _add_command_value(text, m, add)
        here = _HERE_STRING.match(lowered, pos)
        if here:
            _add_command_value(text, here, add)


def _check_assignment(text: str, m: re.Match[bytes], kw_start: int, add: _Add) -> None:
    """Add the value span of one ``name = value`` / ``name: value`` candidate (see module doc).

    ``m`` matched the lower-cased ASCII copy of ``text`` (same indices); the secret keyword
    starts at ``kw_start``; group 1 is an optional closing quote of the name, group 2 the
    separator.
    """
    kw_end = m.start(1)
    name_start = kw_start
    while name_start > 0 and text[name_start - 1] in _NAME_CHARS:
        name_start -= 1
    name = text[name_start:kw_end]
    strength = _name_strength(name.lower(), text[kw_start:kw_end].lower())
    if strength == 0:
        return
    if m.start(2) == -1:  # "the password is <value>": only a value that looks like a secret
        _check_prose_value(text, m.end(), strength, add)
        return
    sep = text[m.start(2)]
    i = m.end()
    while i < len(text) and text[i] in " \t":
        i += 1
    if i >= len(text):
        return
    if sep == ":" and i == m.end() and not (text[i] in "\"'" or text.startswith(('\\"', "\\'"), i)):
        return  # "name:value" without a blank is a URL user, a time, a path, "if x.token:\n"; not YAML/JSON
    v_start, v_end, quoted = _value_span(text, i)
    value = text[v_start:v_end]
    if not value or _is_placeholder(value):
        return
    env_style = (
        sep == "="
        and m.start(2) == m.end(1)  # no blank before "="
        and m.end(1) == m.start(1)  # the name is not quoted
        and (name.lstrip("-").isupper() or name.startswith("-") or (name_start > 0 and text[name_start - 1] in "?&"))
    )
    if _secret_value(value, strength=strength, quoted=quoted, env_style=env_style):
        add((v_start, v_end))


def _check_prose_value(text: str, i: int, strength: int, add: _Add) -> None:
    """``the password is <value>``: add the value when it looks like a secret."""
    prose = _PROSE_VALUE.match(text, i)
    value = prose.group().rstrip(".") if prose else ""
    if value and not _is_placeholder(value) and "(" not in value and _looks_secret(value):
        if strength == 2 or _KEY_LIKE.fullmatch(value):
            add((i, i + len(value)))


def _value_span(text: str, i: int) -> tuple[int, int, bool]:
    """Where the value starting at ``i`` lies: ``(start, end, quoted)`` (a quote ends it on its line;
    a JSON-escaped ``\\"value\\"`` counts as quoted)."""
    n = len(text)
    if not (text[i] in "\"'" or (text[i] == "\\" and i + 1 < n and text[i + 1] in "\"'")):
        return i, _unquoted_end(text, i), False
    if text[i] == "\\":
        i += 1
    quote = text[i]
    end = text.find(quote, i + 1)
    newline = text.find("\n", i + 1)
    if end != -1 and (newline == -1 or end < newline):
        if text[end - 1] == "\\":  # \"value\" inside JSON-escaped text
            end -= 1
        return i + 1, end, True
    return i + 1, _unquoted_end(text, i + 1), False


def _secret_value(value: str, *, strength: int, quoted: bool, env_style: bool) -> bool:
    """Whether an assigned value is a secret, given how strongly its name says so (1: key-like
    names such as ``*_key``, only key-like values; 2: ``password``, ``secret``, ``token``...)."""
    if strength == 1:
        return _KEY_LIKE.fullmatch(value) is not None
    if quoted:
        return len(value.split()) < 5  # five words or more is prose, not a secret
    if value[0] in "/~" or value.startswith("./"):
        return False  # a path (PWD=/home/me, secret_file: ~/x)
    if "(" in value or _ATTRIBUTE_PATH.fullmatch(value):
        return False  # a call or an attribute path names a value, it is not one
    return env_style or _looks_secret(value)


def _unquoted_end(text: str, start: int) -> int:
    m = _UNQUOTED_VALUE.match(text, start)
    return m.end() if m else start


def _name_strength(name: str, keyword: str) -> int:
    """2 = strong secret name, 1 = weak (a generic ``*key``), 0 = not a secret name."""
    if keyword != "key":
        if keyword == "pwd" and name.endswith("oldpwd"):
            return 0
        return 2
    stem = name[:-3].rstrip("_-.")
    if not stem:
        return 1
    for q in _KEY_QUALIFIERS:
        if stem.endswith(q):
            return 2
    return 1


def _is_placeholder(value: str) -> bool:
    """True for values that stand for a secret without being one (``$VAR``, ``<key>``, ...)."""
    v = value.strip()
    if not v:
        return True
    lowered = v.lower()
    if "redacted" in lowered or lowered in _PLACEHOLDER_WORDS:
        return True
    first = v[0]
    if first in "$%<{[" or v.startswith("process.env") or v.startswith("os.environ"):
        return True
    if len(set(v)) <= 2 and len(v) >= 3:  # ****, xxxx, ....
        return True
    return v in ("...", "…")


def _looks_secret(value: str) -> bool:
    """An unquoted value that looks like a password or token rather than a word or a name."""
    if len(value) >= 20 and any(c.isupper() for c in value) and any(c.islower() for c in value):
        return True
    if len(value) >= 6:
        has_digit = any(c.isdigit() for c in value)
        has_alpha = any(c.isalpha() for c in value)
        if has_digit and has_alpha:
            return True
        if any(c in _SYMBOLS for c in value):
            return True
    return False


def _is_word(c: str) -> bool:
    return c.isalnum() or c == "_"


def _has_upper_and_lower(s: str) -> bool:
    return any(c.isupper() for c in s) and any(c.islower() for c in s)


def _has_digit_and_letter(s: str) -> bool:
    return any(c.isdigit() for c in s) and any(c.isalpha() for c in s)


def _looks_like_aws_secret(s: str) -> bool:
    return any(c.isupper() for c in s) and any(c.islower() for c in s) and any(c.isdigit() or c in "/+" for c in s)
