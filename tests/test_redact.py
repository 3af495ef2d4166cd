"""Secret redaction (SPEC §14): every kind is caught, ordinary text and code are left alone."""

from __future__ import annotations

import pytest

from memd.extract.redact import REDACTED, redact, redact_many
from tests.builders import PLANTED


@pytest.mark.parametrize(("label", "text", "secret"), PLANTED, ids=[p[0] for p in PLANTED])
def test_each_kind_is_redacted(label: str, text: str, secret: str) -> None:
    out, count = redact(text)
    assert secret not in out, label
    assert REDACTED in out
    assert count >= 1


def test_all_kinds_in_one_text_none_survive_and_prose_stays() -> None:
    text = "\n".join(f"[{label}] {t} [/{label}]" for label, t, _ in PLANTED)
    out, count = redact(text)
    for label, _, secret in PLANTED:
        assert secret not in out, label
        assert f"[{label}]" in out and f"[/{label}]" in out
    assert count >= len(PLANTED)
    # Surrounding words of a few lines survive untouched.
    for kept in (
        "DATABASE_URL postgres://",
        "@db.example.com:5432/app",
        "curl -H 'Authorization: Bearer ",
        "mysql --password ",
        " -h db",
        "DB_HOST=localhost",
        '"user": "bob"',
        "createEnv({",
    ):
        assert kept in out


def test_scheme_and_host_of_url_are_kept() -> None:
    out, _ = redact("git clone https://x-access-token:abc123@github.com/org/repo.git")
    assert out == f"git clone https://{REDACTED}@github.com/org/repo.git"


def test_bearer_keeps_scheme_word() -> None:
    out, _ = redact("Authorization: Bearer a1b2c3d4e5f6g7h8i9j0")
    assert out == f"Authorization: Bearer {REDACTED}"


FALSE_POSITIVES = [
    "commit 02942347cadda24d3080fbfbc2d13295bb3a496d\nAuthor: A <a@example.com>\n",
    "a1b2c3d (HEAD -> main) fix tokenizer; merge 9fceb02d0ae598e95dc970b74767f19372d61af8",
    "thread 019b7f95-0000-7000-0000-000000000001 and 550e8400-e29b-41d4-a716-446655440000",
    "The tokenizer splits words; token_count = 5 and max_tokens = 4096, input_tokens: 5000",
    "def password_hash(password: str) -> str:\n    return hashlib.sha256(password.encode()).hexdigest()",
    "password = getpass()\ntoken = os.environ['GITHUB_TOKEN']\napi_key=settings.api_key",
    "class Config:\n    password: str\n    token: Optional[str] = None\n    secret: SecretStr",
    "sanitizeValue('REDACTED_API_KEY', 'apiKey'); apiKey: 'REDACTED_API_KEY',",
    "OPENAI_API_KEY=$OPENAI_API_KEY ./run.sh; TOKEN=${TOKEN}; key: <your-key-here>",
    "Bearer authentication is used by the API; see the bearer token docs.",
    "PWD=/Users/me/src OLDPWD=/Users/me",
    "cache_key = 'user:1'; sort(key=lambda x: x.name); primary_key=True",
    "The password reset flow sends a link. Use a secret manager for keys.",
    "ssh git@github.com:org/repo.git && ls -la ~/.ssh",
    "password: changeme",
    "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA\n-----END PUBLIC KEY-----",
    "if (!token) throw new Error('missing token'); const key = `${prefix}:${id}`;",
    "Ran 12 tests in 0.3s\nOK\n  sha256: 3a7bd3e2360a3d29eea436fcfb7e44c735d117c42d1c1835420b6b9942dd4f1b",
]


@pytest.mark.parametrize("text", FALSE_POSITIVES)
def test_ordinary_text_and_code_stay(text: str) -> None:
    out, count = redact(text)
    assert out == text
    assert count == 0


def test_unchanged_text_is_returned_as_is() -> None:
    text = "nothing secret here " * 100
    out, count = redact(text)
    assert out is text and count == 0


def test_redaction_is_idempotent() -> None:
    text = "\n".join(t for _, t, _ in PLANTED)
    once, _ = redact(text)
    twice, count = redact(once)
    assert twice == once
    assert count == 0


def test_pem_without_end_line_is_redacted_to_the_end_of_its_body() -> None:
    text = "key:\n-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIBkg4LVWM9nuwNSk\nAwEHoUQDQgAE\n\nnext paragraph"
    out, _ = redact(text)
    assert "MHcCAQEEIBkg4LVWM9nuwNSk" not in out and "AwEHoUQDQgAE" not in out
    assert out.endswith("next paragraph")


def test_pem_tail_whose_begin_line_was_cut_off_is_redacted() -> None:
    text = "[... 900 bytes cut ...]\nQ29tcGxldGVseUZha2VLZXk\nMIIEowIBAAKCAQEA7bq98\n-----END RSA PRIVATE KEY-----\nafter"
    out, count = redact(text)
    assert "Q29tcGxldGVseUZha2VLZXk" not in out and "MIIEowIBAAKCAQEA7bq98" not in out
    assert out.startswith("[... 900 bytes cut ...]\n") and out.endswith("\nafter")
    assert count == 1


def test_non_ascii_text_keeps_positions() -> None:
    text = "naïve İstanbul → DB_PASSWORD=s3cr3t! and “quotes” token: 'abc' ✓"
    out, count = redact(text)
    assert out == f"naïve İstanbul → DB_PASSWORD={REDACTED} and “quotes” token: '{REDACTED}' ✓"
    assert count == 2


def test_redact_many_matches_redact_per_text() -> None:
    texts = [t for _, t, _ in PLANTED] + FALSE_POSITIVES + ["", "a\x00b", "\n\n"]
    joined, count = redact_many(texts)
    singles = [redact(t.replace("\x00", "\ufffd"))[0] for t in texts]
    assert joined == singles
    assert count == sum(redact(t)[1] for t in texts)


def test_redact_many_does_not_let_a_pem_block_swallow_the_next_text() -> None:
    texts = [
        "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA",
        "QUJDREVGR0hJSktMTU5PUA==",
        "-----END RSA PRIVATE KEY-----",
    ]
    out, _ = redact_many(texts)
    assert out[1] == texts[1]


def test_real_rollout_literal_assignment_is_redacted() -> None:
    from tests.conftest import codex_rollout

    path = codex_rollout("rollout-2026-05-11T11-26-55-019e1625-789d-76c0-80ab-3724b5ddb799.jsonl")
    raw = path.read_text(encoding="utf-8")
    # Read off the file: a test fixture assigns the literal 'sk-secret' to CODEMIE_API_KEY, and
    # the source repo's own placeholders are spelled REDACTED_API_KEY.
    assert "CODEMIE_API_KEY: 'sk-secret'" in raw
    out, count = redact(raw)
    assert "CODEMIE_API_KEY: 'sk-secret'" not in out
    assert f"CODEMIE_API_KEY: '{REDACTED}'" in out
    assert "apiKey: 'REDACTED_API_KEY'" in out
    assert count > 0


def test_every_kind_after_wide_characters_keeps_positions() -> None:
    # A text with one emoji is stored 4 bytes per character; the scan runs on an ASCII copy
    # (one byte per character), so positions must line up for each kind.
    for _, text, secret in PLANTED:
        wide = f"😀 é {text} ✓"
        out, count = redact(wide)
        assert secret not in out and count >= 1, (text, out)
        assert out.startswith("😀 é ") and out.endswith(" ✓")
    text = "😀 token = 'abc123xyz' secret: \"p4ssw0rd!\" Authorization: Basic dXNlcjpwYXNz"
    out, _ = redact(text)
    assert out == f"😀 token = '{REDACTED}' secret: \"{REDACTED}\" Authorization: Basic {REDACTED}"


def test_flags_after_a_rule_of_dashes() -> None:
    command = "$ deploy ---token ghx7Ab29Qw --password 'hunter2!' --verbose"
    text = "-" * 2000 + "\n" + command + "\n" + "-" * 80
    out, count = redact(text)
    assert "ghx7Ab29Qw" not in out and "hunter2!" not in out and count == 2
    assert out.startswith("-" * 2000) and "--verbose" in out
