"""Redaction recall on the generated corpus (SPEC §14, issue 13): every kind, every place, and
100 look-alikes that must stay untouched."""

from __future__ import annotations

import collections
import json

import pytest

from memd.bench import redaction
from memd.bench.redaction import Place, SecretKind, lookalike_samples, measure, secret_samples
from memd.extract.redact import REDACTED, redact, redact_many

SAMPLES = secret_samples()
LOOKALIKES = lookalike_samples()


def test_corpus_shape_at_least_ten_per_kind_in_every_place() -> None:
    by_kind = collections.Counter(s.kind for s in SAMPLES)
    assert set(by_kind) == set(SecretKind)
    assert min(by_kind.values()) >= 10
    places = {(s.kind, s.place) for s in SAMPLES}
    assert places == {(k, p) for k in SecretKind for p in Place}
    assert len(LOOKALIKES) == 100


def test_corpus_is_deterministic_and_seeded() -> None:
    assert secret_samples() == SAMPLES and lookalike_samples() == LOOKALIKES
    assert secret_samples(seed=1) != SAMPLES


def test_tool_outputs_are_json_escaped_documents() -> None:
    outputs = [s for s in SAMPLES if s.place is Place.TOOL_OUTPUT]
    for sample in outputs:
        doc = json.loads(sample.text)
        assert set(doc) == {"output", "metadata"}
    # A multi-line secret (PEM) really is escaped: its newlines are "\\n" in the text.
    pem = [s for s in outputs if s.kind is SecretKind.PEM_PRIVATE_KEY]
    assert pem and all("-----BEGIN" in s.text and "\n" not in s.text for s in pem)


@pytest.mark.parametrize("kind", list(SecretKind), ids=[k.value for k in SecretKind])
def test_every_kind_is_caught_in_every_place(kind: SecretKind) -> None:
    samples = [s for s in SAMPLES if s.kind is kind]
    report = measure(redact, samples, [])
    assert report.recall_by_kind[kind] == 1.0, [(s.place.value, s.text[:160]) for s in report.missed]


def test_no_look_alike_is_changed() -> None:
    report = measure(redact, [], LOOKALIKES)
    assert report.false_positive_rate == 0.0, [t[:160] for t in report.false_positives]


def test_measure_counts_a_half_redacted_secret_as_missed() -> None:
    # A redactor that stops half-way through a token must not score.
    sample = next(s for s in SAMPLES if s.kind is SecretKind.OPENAI)

    def leaves_tail(text: str) -> tuple[str, int]:
        return text.replace(sample.parts[0], REDACTED), 1

    assert measure(redact, [sample], []).recall == 1.0
    assert measure(leaves_tail, [sample], []).recall == 0.0


def test_batch_redaction_catches_the_same() -> None:
    texts = [s.text for s in SAMPLES] + LOOKALIKES
    batch, _ = redact_many(texts)
    for sample, out in zip(SAMPLES, batch, strict=False):
        assert not any(part in out for part in sample.parts), sample.text[:120]
    assert batch[len(SAMPLES) :] == LOOKALIKES


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("curl -sS -u deploy:Kettle42x https://ci.example.com/x", "Kettle42x"),
        ("curl --proxy-user bob:Orion77a -x proxy:3128 https://x", "Orion77a"),
        ("echo 'Hunter2024' | docker login -u ci --password-stdin ghcr.io", "Hunter2024"),
        ("docker login -u ci --password-stdin ghcr.io <<< 'Hunter2024'", "Hunter2024"),
        ("helm registry login -u ci -p Zebra9911 registry.example.com", "Zebra9911"),
        ("mysqldump -uroot -pSecretPw9 shop > shop.sql", "SecretPw9"),
        ('{\\"auths\\": {\\"ghcr.io\\": {\\"auth\\": \\"Y2k6SHVudGVyMjAyNA==\\"}}}', "Y2k6SHVudGVyMjAyNA=="),
        ("aws configure set aws_secret_access_key wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "FEMI/K7MDENG"),
        ("redis-cli -u redis://:S3cretRedis@cache:6379", "S3cretRedis"),
        ("the token is Qx81mZp0Lw4", "Qx81mZp0Lw4"),
    ],
)
def test_command_and_prose_forms(text: str, secret: str) -> None:
    out, count = redact(text)
    assert secret not in out and count >= 1, out


@pytest.mark.parametrize(
    "text",
    [
        "mysql -u root -p shop",  # -p alone prompts for the password; "shop" is the database
        "mysql -h db -P3306 -u app shop",  # -P is the port
        "docker run -p 8080:80 -v data:/data nginx",
        "git push -u origin main && sort -u names.txt",
        "curl -u admin: https://localhost:9200/",  # empty password: curl prompts
        'curl -u "$USER:$TOKEN" https://api.example.net',
        "echo $PASSWORD | docker login --password-stdin",
        "the token is expired; the password is wrong; the secret is None",
        '    if not self.token:\\n        raise ValueError(\\"no token\\")',
    ],
)
def test_command_and_prose_look_alikes_stay(text: str) -> None:
    assert redact(text) == (text, 0)


def test_bench_figures() -> None:
    recall, fp_rate = redaction.bench_redaction()
    assert (recall.key, fp_rate.key) == ("redaction_recall", "redaction_false_positive_rate")
    assert recall.value == 1.0 and fp_rate.value == 0.0
    assert "252 samples, 21 kinds" in recall.note
