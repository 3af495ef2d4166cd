"""Secret-redaction recall corpus and its benchmark figures (SPEC §14, issue 13).

The corpus is generated in code, deterministically from a seed, and holds no real secret: every
token is random characters in the documented shape of its kind (prefix, alphabet, length), as
published by the providers and collected in gitleaks' rule list (``config/gitleaks.toml``:
``slack-config-access-token``, ``azure-ad-client-secret``, ``npm-access-token``,
``huggingface-access-token``, ``sendgrid-api-token``, ...).

* :func:`secret_samples` — for each :class:`SecretKind`, samples in four places a secret reaches
  memd (:class:`Place`): a user message, a tool output as it sits JSON-escaped in a rollout
  (``{"output": "...", "metadata": {...}}``, Codex ``function_call_output``), a shell command, and
  an ``apply_patch`` body. At least ``per_place`` samples per place (default 3, so 12 per kind).
* :func:`lookalike_samples` — 100 ordinary texts that look like secrets and are not: git SHAs,
  UUIDs, base64 images, integrity hashes (npm ``sha512-``, pip ``--hash``, image digests), and
  commands whose flags resemble credentials (``mkdir -p``, ``docker run -p 8080:80``,
  ``mysql -p`` without a value, ``curl -u "$USER:$TOKEN"``).
* :func:`measure` — recall per kind (a sample is caught when no part of its secret survives
  redaction) and the false-positive rate (a look-alike is a false positive when redaction
  changes it at all).
* :func:`bench_redaction` — the ``memd bench`` figures ``redaction_recall`` and
  ``redaction_false_positive_rate``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import string
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

_ALNUM = string.ascii_letters + string.digits
_UPPER_DIGITS = string.ascii_uppercase + string.digits
_B64URL = _ALNUM + "_-"
_AWS_SECRET_CHARS = _ALNUM + "/+"
_PASSWORD_SYMBOLS = "!#%^*_-+=.@"


#: ``memd bench`` targets of this module's figures: key -> (comparison, threshold).
REDACTION_TARGETS: dict[str, tuple[str, float]] = {
    "redaction_recall": (">=", 0.99),
    "redaction_false_positive_rate": ("<=", 0.01),
}


class SecretKind(StrEnum):
    """The kinds of secret the redactor must catch (SPEC §14 plus the kinds issue 13 found missed)."""

    OPENAI = "openai"
    ANTHROPIC = "anthropic"
    AWS_ACCESS_KEY_ID = "aws_access_key_id"
    AWS_SECRET_ACCESS_KEY = "aws_secret_access_key"
    GITHUB = "github"
    GITLAB = "gitlab"
    SLACK = "slack"
    STRIPE = "stripe"
    GOOGLE = "google"
    JWT = "jwt"
    PEM_PRIVATE_KEY = "pem_private_key"
    BEARER = "bearer"
    URL_CREDENTIALS = "url_credentials"
    ASSIGNMENT = "assignment"
    CURL_USER = "curl_user"
    DOCKER_LOGIN = "docker_login"
    AZURE_CLIENT_SECRET = "azure_client_secret"
    NPM = "npm"
    HUGGINGFACE = "huggingface"
    SENDGRID = "sendgrid"
    MYSQL_PASSWORD = "mysql_password"


class Place(StrEnum):
    """Where a sample's secret sits: the four shapes of session text memd redacts."""

    USER = "user_message"
    TOOL_OUTPUT = "tool_output_json"
    COMMAND = "command"
    PATCH = "patch"


@dataclass(frozen=True, slots=True)
class SecretSample:
    """One planted secret in its surrounding text.

    Attributes:
        kind: the secret's kind.
        place: where it sits.
        text: the whole text handed to the redactor.
        parts: substrings that must all be gone after redaction (the secret, or for long secrets
            its two halves so a redaction that stops half-way counts as a miss; for a PEM block its
            body lines).
    """

    kind: SecretKind
    place: Place
    text: str
    parts: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RedactionReport:
    """What :func:`measure` found.

    Attributes:
        recall_by_kind: kind -> caught samples / samples (0.0 to 1.0).
        recall: caught samples / samples over the whole corpus.
        false_positive_rate: changed look-alikes / look-alikes.
        missed: the samples that were not caught, for diagnosis.
        false_positives: the look-alikes that were changed.
    """

    recall_by_kind: dict[SecretKind, float]
    recall: float
    false_positive_rate: float
    missed: tuple[SecretSample, ...]
    false_positives: tuple[str, ...]


# --- random pieces -----------------------------------------------------------------------------


def _rand(rng: random.Random, alphabet: str, n: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def _mixed(rng: random.Random, alphabet: str, n: int) -> str:
    """Random characters with at least one upper-case letter, one lower-case letter and one digit
    where the alphabet has them (real tokens do; a run of one class would be a different thing)."""
    while True:
        s = _rand(rng, alphabet, n)
        classes = [any(c.isupper() for c in s), any(c.islower() for c in s), any(c.isdigit() for c in s)]
        wanted = [
            any(c.isupper() for c in alphabet),
            any(c.islower() for c in alphabet),
            any(c.isdigit() for c in alphabet),
        ]
        if all(have or not want for have, want in zip(classes, wanted, strict=True)):
            return s


def _password(rng: random.Random) -> str:
    """A password as people pick them: a word, digits, sometimes a symbol."""
    word = rng.choice(["Summer", "hunter", "Dragon", "monkey", "Passw0rd", "Trust", "kettle", "Orion", "Zebra"])
    tail = _rand(rng, string.digits, rng.randint(2, 4))
    sym = rng.choice(["", "!", "#", "_", "*", "%"])
    mid = _rand(rng, _ALNUM, rng.randint(2, 6))
    return f"{word}{mid}{sym}{tail}"


def _user(rng: random.Random) -> str:
    return rng.choice(["admin", "deploy", "ci-bot", "alice", "bob.smith", "svc_backup", "root", "jenkins"])


def _host(rng: random.Random) -> str:
    return rng.choice(
        ["db.internal.example.com", "10.0.3.17", "registry.example.org", "api.example.net", "localhost", "pg-prod-2"]
    )


def _halves(secret: str) -> tuple[str, ...]:
    if len(secret) < 16:
        return (secret,)
    mid = len(secret) // 2
    return (secret[:mid], secret[mid:])


# --- secrets by kind: a token, and how it is written in each place -----------------------------
# A template is a format string over {s} (the secret), {u} (a user name), {h} (a host); the
# secret parts checked are those of {s}.


@dataclass(frozen=True, slots=True)
class _KindSpec:
    make: Callable[[random.Random], str]
    user: tuple[str, ...]  # how a person pastes it into a message
    command: tuple[str, ...]  # a shell command holding it
    output: tuple[str, ...]  # a tool output holding it (before JSON escaping)
    patch: tuple[str, ...]  # a line added by a patch
    parts: Callable[[str], tuple[str, ...]] = _halves


def _openai(rng: random.Random) -> str:
    style = rng.randrange(3)
    if style == 0:
        return "sk-" + _mixed(rng, _ALNUM, 48)
    if style == 1:
        return "sk-proj-" + _mixed(rng, _B64URL, 156)
    return "sk-svcacct-" + _mixed(rng, _B64URL, 100)


def _anthropic(rng: random.Random) -> str:
    return "sk-ant-api03-" + _mixed(rng, _B64URL, 93) + "AA"


def _aws_id(rng: random.Random) -> str:
    return rng.choice(["AKIA", "ASIA"]) + _mixed(rng, "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", 16)


def _aws_secret(rng: random.Random) -> str:
    return _mixed(rng, _AWS_SECRET_CHARS, 40)


def _github(rng: random.Random) -> str:
    style = rng.randrange(4)
    if style == 3:
        return "github_pat_" + _mixed(rng, _ALNUM, 22) + "_" + _mixed(rng, _ALNUM, 59)
    return rng.choice(["ghp_", "gho_", "ghs_"]) + _mixed(rng, _ALNUM, 36)


def _gitlab(rng: random.Random) -> str:
    return "glpat-" + _mixed(rng, _B64URL, 20)


def _slack(rng: random.Random) -> str:
    style = rng.randrange(4)
    n1 = _rand(rng, string.digits, 12)
    n2 = _rand(rng, string.digits, 13)
    if style == 0:
        return f"xoxb-{n1}-{n2}-{_mixed(rng, _ALNUM, 24)}"
    if style == 1:
        return f"xoxp-{n1}-{n2}-{_rand(rng, string.digits, 13)}-{_rand(rng, '0123456789abcdef', 32)}"
    if style == 2:
        return f"xoxe.xoxp-1-{_mixed(rng, _UPPER_DIGITS, 164)}"
    return f"xoxe-1-{_mixed(rng, _UPPER_DIGITS, 146)}"


def _stripe(rng: random.Random) -> str:
    return rng.choice(["sk_live_", "rk_live_", "sk_test_"]) + _mixed(rng, _ALNUM, rng.choice([24, 99]))


def _google(rng: random.Random) -> str:
    return "AIza" + _mixed(rng, _B64URL, 35)


def _b64url_json(obj: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj, separators=(",", ":")).encode()).decode().rstrip("=")


def _jwt(rng: random.Random) -> str:
    header = _b64url_json({"alg": rng.choice(["HS256", "RS256"]), "typ": "JWT"})
    payload = _b64url_json({"sub": _rand(rng, string.digits, 10), "iat": rng.randint(1_600_000_000, 1_800_000_000)})
    return f"{header}.{payload}.{_mixed(rng, _B64URL, 43)}"


def _pem(rng: random.Random) -> str:
    label = rng.choice(["RSA PRIVATE KEY", "PRIVATE KEY", "EC PRIVATE KEY", "OPENSSH PRIVATE KEY"])
    body = base64.b64encode(rng.randbytes(rng.choice([120, 240, 600]))).decode()
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return f"-----BEGIN {label}-----\n" + "\n".join(lines) + f"\n-----END {label}-----"


def _pem_parts(block: str) -> tuple[str, ...]:
    return tuple(line for line in block.splitlines()[1:-1] if len(line) >= 8)


def _opaque(rng: random.Random) -> str:
    return _mixed(rng, _ALNUM + "._-", rng.choice([32, 40, 64]))


def _azure(rng: random.Random) -> str:
    return _mixed(rng, _ALNUM, 3) + rng.choice(string.digits) + "Q~" + _mixed(rng, _ALNUM + "_~.-", 34)


def _npm(rng: random.Random) -> str:
    return "npm_" + _mixed(rng, _ALNUM, 36)


def _hf(rng: random.Random) -> str:
    return "hf_" + _mixed(rng, string.ascii_letters, 34)


def _sendgrid(rng: random.Random) -> str:
    return "SG." + _mixed(rng, _B64URL, 22) + "." + _mixed(rng, _B64URL, 43)


def _docker_auth(rng: random.Random) -> str:
    return base64.b64encode(f"{_user(rng)}:{_password(rng)}".encode()).decode()


_SPECS: dict[SecretKind, _KindSpec] = {
    SecretKind.OPENAI: _KindSpec(
        _openai,
        ("here's my key {s} - why does the client say 401?", "I rotated the key, new one is {s}"),
        ("export OPENAI_API_KEY={s} && python app.py", "OPENAI_API_KEY='{s}' uv run pytest -k llm"),
        ("OPENAI_API_KEY={s}\nOPENAI_BASE_URL=https://api.openai.com/v1", "client = OpenAI(api_key='{s}')"),
        ('client = OpenAI(api_key="{s}")', "llm:\n  key: {s}"),
    ),
    SecretKind.ANTHROPIC: _KindSpec(
        _anthropic,
        ("use this anthropic key: {s}", "the key {s} works in curl but not in the SDK"),
        ('curl https://api.anthropic.com/v1/messages -H "x-api-key: {s}"', "ANTHROPIC_API_KEY={s} claude -p hi"),
        ("ANTHROPIC_API_KEY={s}", 'Error: invalid x-api-key "{s}"'),
        ('anthropic.Anthropic(api_key="{s}")', "ANTHROPIC_API_KEY: {s}"),
    ),
    SecretKind.AWS_ACCESS_KEY_ID: _KindSpec(
        _aws_id,
        ("my access key id is {s}", "the IAM user {s} lacks s3:PutObject"),
        ("aws configure set aws_access_key_id {s}", "AWS_ACCESS_KEY_ID={s} aws s3 ls"),
        ('{{"AccessKeyId": "{s}", "Expiration": "2026-05-01T12:00:00Z"}}', "[default]\naws_access_key_id = {s}"),
        ("aws_access_key_id = {s}", 'const ACCESS = "{s}";'),
    ),
    SecretKind.AWS_SECRET_ACCESS_KEY: _KindSpec(
        _aws_secret,
        ("the secret access key is {s}", "aws_secret_access_key {s} - is this right?"),
        ("aws configure set aws_secret_access_key {s}", "export AWS_SECRET_ACCESS_KEY={s}"),
        (
            '{{"Credentials": {{"SecretAccessKey": "{s}", "SessionToken": "FwoGZXIvYXdzEBYaDH"}}}}',
            "[default]\naws_secret_access_key = {s}\nregion = eu-west-1",
            "AWS Secret Access Key [None]: {s}",
        ),
        ("aws_secret_access_key = {s}", "AWS_SECRET_ACCESS_KEY: {s}"),
    ),
    SecretKind.GITHUB: _KindSpec(
        _github,
        ("push with my token {s}", "gh auth login fails with {s}, can you check?"),
        ("git clone https://{s}@github.com/acme/api.git", "GH_TOKEN={s} gh pr list"),
        ("github.com:\n    oauth_token: {s}\n    user: acme", "remote: Invalid token {s}"),
        ("GITHUB_TOKEN={s}", 'token: "{s}"'),
    ),
    SecretKind.GITLAB: _KindSpec(
        _gitlab,
        ("gitlab token is {s}", "CI var CI_JOB_TOKEN? no, mine: {s}"),
        ('curl --header "PRIVATE-TOKEN: {s}" https://gitlab.example.com/api/v4/projects', "glab auth login -t {s}"),
        ("PRIVATE-TOKEN: {s}", "token={s}"),
        ("GITLAB_TOKEN={s}", "    private_token: {s}"),
    ),
    SecretKind.SLACK: _KindSpec(
        _slack,
        ("slack bot token: {s}", "the refresh token {s} expired?"),
        ("curl -d token={s} https://slack.com/api/auth.test", "SLACK_BOT_TOKEN={s} node bot.js"),
        ('{{"ok": true, "token": "{s}", "exp": 43200}}', "xoxb token loaded: {s}"),
        ("SLACK_TOKEN={s}", 'const slack = new WebClient("{s}");'),
    ),
    SecretKind.STRIPE: _KindSpec(
        _stripe,
        ("stripe key {s} gives 'No such customer'", "switch to {s} for prod"),
        ("stripe listen --api-key {s}", "curl https://api.stripe.com/v1/charges -u {s}:"),
        ("STRIPE_SECRET_KEY={s}", "Stripe.api_key = '{s}'"),
        ('Stripe.api_key = "{s}"', "STRIPE_KEY={s}"),
    ),
    SecretKind.GOOGLE: _KindSpec(
        _google,
        ("maps key {s} is restricted to our domain", "Gemini key: {s}"),
        (
            'curl "https://maps.googleapis.com/maps/api/geocode/json?address=Paris&key={s}"',
            "GOOGLE_API_KEY={s} npm start",
        ),
        ('{{"apiKey": "{s}", "authDomain": "acme.firebaseapp.com"}}', "  apiKey: {s}"),
        ('  apiKey: "{s}",', "GEMINI_API_KEY={s}"),
    ),
    SecretKind.JWT: _KindSpec(
        _jwt,
        ("decode this token please: {s}", "the session cookie is {s}"),
        ("curl -b 'session={s}' http://localhost:8000/me", "http :8000/api 'Cookie: jwt={s}'"),
        ('{{"access_token": "{s}", "token_type": "bearer"}}', "set-cookie: auth={s}; HttpOnly"),
        ('TEST_JWT = "{s}"', "    jwt: {s}"),
    ),
    SecretKind.PEM_PRIVATE_KEY: _KindSpec(
        _pem,
        ("this is the deploy key:\n{s}\nadd it to the server", "{s}\nwhy does ssh say invalid format?"),
        ("cat > ~/.ssh/id_deploy <<'EOF'\n{s}\nEOF", "printf '%s\\n' '{s}' > key.pem"),
        ("{s}", "$ cat certs/server.key\n{s}"),
        ("{s}",),
        _pem_parts,
    ),
    SecretKind.BEARER: _KindSpec(
        _opaque,
        ("call it with Bearer {s}", "got 403 with 'Authorization: Bearer {s}'"),
        (
            'curl -H "Authorization: Bearer {s}" https://api.example.net/v2/items',
            "http GET :8080/x 'Authorization:Bearer {s}'",
        ),
        ("> Authorization: Bearer {s}\n< HTTP/1.1 200 OK", '{{"headers": {{"Authorization": "Bearer {s}"}}}}'),
        ('headers = {{"Authorization": "Bearer {s}"}}', "Authorization: Bearer {s}"),
    ),
    SecretKind.URL_CREDENTIALS: _KindSpec(
        _password,
        ("connect to postgres://{u}:{s}@{h}:5432/app", "redis url is redis://:{s}@{h}:6379/0"),
        (
            "psql postgresql://{u}:{s}@{h}/orders -c 'select 1'",
            "git remote add origin https://{u}:{s}@git.example.com/acme/site.git",
        ),
        ("DATABASE_URL=mysql://{u}:{s}@{h}:3306/shop", "Cloning into 'x'... https://{u}:{s}@{h}/r.git"),
        (
            'SQLALCHEMY_DATABASE_URI = "postgresql+psycopg://{u}:{s}@{h}/app"',
            "  url: mongodb+srv://{u}:{s}@cluster0.example.net/db",
        ),
    ),
    SecretKind.ASSIGNMENT: _KindSpec(
        _password,
        ("the db password is {s}", "set password: {s} for the admin user"),
        ("DB_PASSWORD={s} ./manage.py migrate", "export API_TOKEN={s}"),
        (
            '{{"username": "{u}", "password": "{s}"}}',
            "SECRET_KEY={s}\nDEBUG=false",
            "db:\n  password: {s}\n  host: {h}",
        ),
        ('SECRET_KEY = "{s}"', "    client_secret: {s}", 'password = "{s}"'),
    ),
    SecretKind.CURL_USER: _KindSpec(
        _password,
        ("try curl -u {u}:{s} https://{h}/api", "it works with `curl --user {u}:{s} https://{h}/health`"),
        ("curl -u {u}:{s} https://{h}/api/v1/status", "curl -sSf --user '{u}:{s}' -X POST https://{h}/deploy"),
        (
            "+ curl -u {u}:{s} https://{h}/ping\ncurl: (7) Failed to connect",
            '$ curl -fsS -u "{u}:{s}" https://{h}/x\n{{"ok":true}}',
        ),
        (
            "curl -u {u}:{s} https://{h}/backup -o backup.tgz",
            "  - curl --user {u}:{s} -T build.zip https://{h}/upload/",
        ),
    ),
    SecretKind.DOCKER_LOGIN: _KindSpec(
        _password,
        (
            "I ran docker login -u {u} -p {s} {h} and it says denied",
            "echo '{s}' | docker login {h} -u {u} --password-stdin",
        ),
        ("docker login -u {u} -p {s} {h}", 'echo "{s}" | docker login --username {u} --password-stdin {h}'),
        (
            "WARNING! Using --password via the CLI is insecure.\n+ docker login -u {u} -p {s} {h}",
            "$ printf '%s' '{s}' | docker login -u {u} --password-stdin ghcr.io\nLogin Succeeded",
            '$ cat ~/.docker/config.json\n{{\n  "auths": {{\n    "{h}": {{\n      "auth": "{a}"\n    }}\n  }}\n}}',
        ),
        (
            "docker login -u {u} -p {s} {h}",
            "podman login -u {u} -p {s} quay.io",
            '{{"auths": {{"{h}": {{"auth": "{a}"}}}}}}',
        ),
    ),
    SecretKind.AZURE_CLIENT_SECRET: _KindSpec(
        _azure,
        ("the app registration secret is {s}", "use {s} for the service principal"),
        (
            "az login --service-principal -u 00000000-0000-0000-0000-000000000000 -p {s} --tenant acme.onmicrosoft.com",
            "AZURE_CLIENT_SECRET={s} terraform plan",
        ),
        ('{{"appId": "0f6d", "password": "{s}", "tenant": "72f9"}}', "secret created: {s}"),
        ("AZURE_CLIENT_SECRET={s}", '  "clientSecret": "{s}",'),
    ),
    SecretKind.NPM: _KindSpec(
        _npm,
        ("publish token {s}", "npm says E401 with {s}"),
        ("npm config set //registry.npmjs.org/:_authToken {s}", "NPM_TOKEN={s} npm publish"),
        ("//registry.npmjs.org/:_authToken={s}", "npm notice token {s} created"),
        ("//registry.npmjs.org/:_authToken={s}", "NODE_AUTH_TOKEN: {s}"),
    ),
    SecretKind.HUGGINGFACE: _KindSpec(
        _hf,
        ("my HF token {s}", "login works with {s} but push fails"),
        ("huggingface-cli login --token {s}", "HF_TOKEN={s} python train.py"),
        ("Token is valid (permission: write).\nYour token {s} has been saved", "HUGGING_FACE_HUB_TOKEN={s}"),
        ('login(token="{s}")', "HF_TOKEN={s}"),
    ),
    SecretKind.SENDGRID: _KindSpec(
        _sendgrid,
        ("sendgrid key {s} returns 403", "here: {s}"),
        (
            'curl -X POST https://api.sendgrid.com/v3/mail/send -H "Authorization: Bearer {s}"',
            "SENDGRID_API_KEY={s} node mail.js",
        ),
        ("SENDGRID_API_KEY={s}", "sg = SendGridAPIClient('{s}')"),
        ("sg = SendGridAPIClient('{s}')", "SENDGRID_API_KEY={s}"),
    ),
    SecretKind.MYSQL_PASSWORD: _KindSpec(
        _password,
        ("run mysql -u root -p{s} shop and show tables", "mysqldump -u{u} -p{s} shop > dump.sql fails"),
        (
            "mysql -h {h} -u {u} -p{s} shop -e 'show tables'",
            "mysqldump -u{u} -p'{s}' --single-transaction shop > shop.sql",
        ),
        (
            "$ mysqladmin -u root -p{s} status\nUptime: 3600  Threads: 2",
            "+ mysql -u{u} -p{s} -e 'select 1'\nmysql: [Warning] Using a password",
        ),
        ("mysql -u {u} -p{s} < schema.sql", "  command: mariadb -u{u} -p{s} -e 'select 1'"),
    ),
}

_PATCH_FILES = ("config/settings.py", ".env", "deploy/ci.yml", "scripts/release.sh", "src/client.ts", "infra/main.tf")
_USER_WRAPPERS = (
    "{t}",
    "Hi! {t}\n\nThanks",
    "{t}. Please also update the README afterwards.",
)
_OUTPUT_COMMANDS = (
    "cat .env",
    "bash -x deploy.sh",
    "./scripts/setup.sh",
    "docker compose logs api",
    "aws sts get-session-token",
)


def _fill(template: str, secret: str, rng: random.Random, extra: list[str]) -> str:
    """Fill a template; ``{a}`` is a Docker ``auths`` value, base64 of ``user:secret``, whose
    halves are appended to ``extra`` (it must be gone too)."""
    user = _user(rng)
    auth = base64.b64encode(f"{user}:{secret}".encode()).decode()
    if "{a}" in template:
        extra.extend(_halves(auth))
    return template.format(s=secret, u=user, h=_host(rng), a=auth)


def _place_text(place: Place, spec: _KindSpec, secret: str, i: int, rng: random.Random, extra: list[str]) -> str:
    if place is Place.USER:
        line = _fill(spec.user[i % len(spec.user)], secret, rng, extra)
        return _USER_WRAPPERS[i % len(_USER_WRAPPERS)].format(t=line)
    if place is Place.COMMAND:
        return _fill(spec.command[i % len(spec.command)], secret, rng, extra)
    if place is Place.TOOL_OUTPUT:
        body = _fill(spec.output[i % len(spec.output)], secret, rng, extra)
        cmd = _OUTPUT_COMMANDS[i % len(_OUTPUT_COMMANDS)]
        text = f"Ran `{cmd}`\n{body}\nPORT=8080\n"
        return json.dumps({"output": text, "metadata": {"exit_code": i % 2, "duration_seconds": 0.4}})
    path = _PATCH_FILES[i % len(_PATCH_FILES)]
    added = _fill(spec.patch[i % len(spec.patch)], secret, rng, extra)
    plus = "\n".join("+" + line for line in added.splitlines())
    return f"*** Begin Patch\n*** Update File: {path}\n@@\n-# placeholder\n{plus}\n context_line = 1\n*** End Patch"


def secret_samples(*, seed: int = 0, per_place: int = 3) -> list[SecretSample]:
    """Generate the recall corpus: ``per_place`` samples per (kind, place), deterministic.

    Args:
        seed: the random seed; the same seed gives the same samples.
        per_place: samples per kind and place (4 places, so ``4 * per_place`` per kind).

    Returns:
        The samples, grouped by kind then place.
    """
    rng = random.Random(seed)
    out: list[SecretSample] = []
    for kind, spec in _SPECS.items():
        for place in Place:
            for i in range(per_place):
                secret = spec.make(rng)
                extra: list[str] = []
                text = _place_text(place, spec, secret, i, rng, extra)
                parts = spec.parts(secret) + tuple(extra)
                if place is Place.TOOL_OUTPUT:
                    parts = tuple(json.dumps(p)[1:-1] for p in parts)
                out.append(SecretSample(kind, place, text, parts))
    return out


# --- look-alikes -------------------------------------------------------------------------------


def _sha1(rng: random.Random) -> str:
    return hashlib.sha1(rng.randbytes(16)).hexdigest()


def _lk_git_log(rng: random.Random) -> str:
    return f"commit {_sha1(rng)}\nAuthor: Dev <dev@example.com>\n\n    Fix flaky test"


def _lk_git_oneline(rng: random.Random) -> str:
    return "\n".join(f"{_sha1(rng)[:7]} {m}" for m in ("fix parser", "add tests", "bump deps"))


def _lk_git_rev(rng: random.Random) -> str:
    return f"$ git rev-parse HEAD\n{_sha1(rng)}\n$ git checkout {_sha1(rng)[:12]}"


def _lk_uuid_line(rng: random.Random) -> str:
    u = uuid.UUID(bytes=rng.randbytes(16), version=4)
    return f"request_id={u} session {uuid.UUID(bytes=rng.randbytes(16), version=4)} thread_id: {u}"


def _lk_uuid_json(rng: random.Random) -> str:
    u = uuid.UUID(bytes=rng.randbytes(16), version=4)
    return json.dumps({"output": f'{{"id": "{u}", "status": "ok"}}', "metadata": {"exit_code": 0}})


def _lk_image(rng: random.Random) -> str:
    data = base64.b64encode(b"\x89PNG\r\n\x1a\n" + rng.randbytes(rng.choice([300, 900, 2400]))).decode()
    return f'<img src="data:image/png;base64,{data}" alt="chart">'


def _lk_image_md(rng: random.Random) -> str:
    data = base64.b64encode(b"\xff\xd8\xff\xe0" + rng.randbytes(600)).decode()
    return f"![screenshot](data:image/jpeg;base64,{data})"


def _lk_npm_integrity(rng: random.Random) -> str:
    digest = base64.b64encode(hashlib.sha512(rng.randbytes(8)).digest()).decode()
    return f'    "node_modules/left-pad": {{\n      "version": "1.3.0",\n      "integrity": "sha512-{digest}"\n    }}'


def _lk_pip_hash(rng: random.Random) -> str:
    return f"requests==2.32.3 \\\n    --hash=sha256:{hashlib.sha256(rng.randbytes(8)).hexdigest()}"


def _lk_digest(rng: random.Random) -> str:
    return f"Digest: sha256:{hashlib.sha256(rng.randbytes(8)).hexdigest()}\nStatus: Downloaded newer image"


def _lk_sri(rng: random.Random) -> str:
    d = base64.b64encode(hashlib.sha384(rng.randbytes(8)).digest()).decode()
    return f'<script src="/app.js" integrity="sha384-{d}" crossorigin="anonymous"></script>'


def _lk_flags(rng: random.Random) -> str:
    return rng.choice(
        [
            "mkdir -p build/out && docker run -p 8080:80 nginx",
            "ssh -p 2222 deploy@host.example.com 'uptime'",
            "mysql -u root -p shop",
            'curl -u "$USER:$API_TOKEN" https://api.example.net/x',
            "echo $REGISTRY_PASSWORD | docker login -u ci --password-stdin ghcr.io",
            "docker login ghcr.io -u ci --password-stdin < ~/.ghcr",
            "git clone git@github.com:acme/api.git && cd api",
            "export OPENAI_API_KEY=$OPENAI_API_KEY",
            "tar -pxf release.tgz -C /opt/app",
            "curl -u admin: https://localhost:9200/_cat/indices",
        ]
    )


def _lk_prose(rng: random.Random) -> str:
    return rng.choice(
        [
            "The tokenizer splits words; max_tokens = 4096 and token_count: 5000.",
            "Use a secret manager for keys; the password must be 12 characters.",
            "Bearer authentication is described in RFC 6750.",
            "def check_password(password: str) -> bool:\n    return verify(password, stored_hash)",
            "password = getpass.getpass()\ntoken = os.environ['GITHUB_TOKEN']",
            "SKU-4821 ships with the AIza integration guide; see skills/QA.md",
            "The npm_config_cache variable and hf_hub_download() are documented.",
            "SG. stands for Singapore in this table. 4Q~ is not a secret.",
        ]
    )


def _lk_hexid(rng: random.Random) -> str:
    return f"trace {rng.randbytes(16).hex()} span {rng.randbytes(8).hex()} color #{rng.randbytes(3).hex()}"


def _lk_version(rng: random.Random) -> str:
    return f"Python 3.11.{rng.randint(0, 9)} (main, build {rng.randbytes(6).hex()})"


#: Each look-alike maker and how many of the 100 samples it makes.
_LOOKALIKE_MIX: tuple[tuple[Callable[[random.Random], str], int], ...] = (
    (_lk_git_log, 10),
    (_lk_git_oneline, 5),
    (_lk_git_rev, 5),
    (_lk_uuid_line, 10),
    (_lk_uuid_json, 5),
    (_lk_image, 10),
    (_lk_image_md, 5),
    (_lk_npm_integrity, 10),
    (_lk_pip_hash, 5),
    (_lk_digest, 5),
    (_lk_sri, 5),
    (_lk_flags, 10),
    (_lk_prose, 8),
    (_lk_hexid, 4),
    (_lk_version, 3),
)


def _lookalike_makers() -> list[Callable[[random.Random], str]]:
    return [maker for maker, n in _LOOKALIKE_MIX for _ in range(n)]


def lookalike_samples(*, seed: int = 0) -> list[str]:
    """Generate 100 ordinary texts that resemble secrets (see the module docstring), deterministic.

    Args:
        seed: the random seed.

    Returns:
        Exactly 100 texts.
    """
    rng = random.Random(seed + 1)
    return [maker(rng) for maker in _lookalike_makers()]


# --- measuring ---------------------------------------------------------------------------------


def measure(
    redact_fn: Callable[[str], tuple[str, int]],
    samples: Sequence[SecretSample] | None = None,
    lookalikes: Sequence[str] | None = None,
) -> RedactionReport:
    """Run ``redact_fn`` over the corpus and score it.

    Args:
        redact_fn: ``text -> (redacted_text, count)``, e.g. :func:`memd.extract.redact.redact`.
        samples: the secret samples; default :func:`secret_samples`.
        lookalikes: the ordinary texts; default :func:`lookalike_samples`.

    Returns:
        The :class:`RedactionReport`.
    """
    samples = secret_samples() if samples is None else samples
    lookalikes = lookalike_samples() if lookalikes is None else lookalikes
    total: dict[SecretKind, int] = {}
    caught: dict[SecretKind, int] = {}
    missed: list[SecretSample] = []
    for sample in samples:
        out, _ = redact_fn(sample.text)
        total[sample.kind] = total.get(sample.kind, 0) + 1
        if any(part in out for part in sample.parts):
            missed.append(sample)
        else:
            caught[sample.kind] = caught.get(sample.kind, 0) + 1
    fps = tuple(text for text in lookalikes if redact_fn(text)[0] != text)
    n = sum(total.values())
    return RedactionReport(
        recall_by_kind={k: caught.get(k, 0) / total[k] for k in total},
        recall=(n - len(missed)) / n if n else 0.0,
        false_positive_rate=len(fps) / len(lookalikes) if lookalikes else 0.0,
        missed=tuple(missed),
        false_positives=fps,
    )


def bench_redaction() -> list[Any]:
    """``redaction_recall`` and ``redaction_false_positive_rate`` of memd's redactor on the corpus.

    Returns:
        Two :class:`~memd.bench.harness.Figure` records; no baseline (the note lists the kinds
        below full recall).
    """
    from memd.bench.harness import Figure
    from memd.extract.redact import redact

    report = measure(redact)
    weak = ", ".join(f"{k.value} {v:.2f}" for k, v in report.recall_by_kind.items() if v < 1.0) or "none"
    n = len(secret_samples())
    return [
        Figure("redaction_recall", report.recall, None, f"{n} samples, {len(SecretKind)} kinds; below 1.0: {weak}"),
        Figure(
            "redaction_false_positive_rate",
            report.false_positive_rate,
            None,
            f"{len(report.false_positives)} of {len(lookalike_samples())} look-alikes changed",
        ),
    ]
