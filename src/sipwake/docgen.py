"""Generates docs/configuration.md from the configuration schema in :mod:`sipwake.config`.

The reference is data derived from the dataclasses (key, type, default, ``doc``), so it
cannot say something the loader does not do; ``tests/docs/test_configuration_doc.py``
regenerates it and fails when the committed file differs. Run
``python3 -m sipwake.docgen`` to rewrite the file, ``--check`` to only compare.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any

from sipwake.config import SECTIONS, AppSection, Config, section_keys

#: The generated file, relative to the repository root.
OUTPUT = Path("docs") / "configuration.md"

#: Flexisip keys and the sipwake key that does the same job ("" when sipwake has none),
#: with a note. Only sipwake keys that exist in the schema may appear (a test checks).
FLEXISIP_KEYS: list[tuple[str, str, str, str]] = [
    ("module::PushNotification", "enabled", "", "always on when a provider is configured"),
    ("module::PushNotification", "timeout", "[push] timeout", "sipwake's default is 5"),
    ("module::PushNotification", "message-time-to-live", "[push] message-time-to-live", ""),
    ("module::PushNotification", "max-queue-size", "[push] max-queue-size", ""),
    ("module::PushNotification", "retransmission-count", "[push] retransmission-count", ""),
    (
        "module::PushNotification",
        "retransmission-interval",
        "[push] retransmission-interval",
        "",
    ),
    (
        "module::PushNotification",
        "call-remote-push-interval",
        "[push] call-remote-push-interval",
        "",
    ),
    ("module::PushNotification", "display-from-uri", "[push] display-from-uri", ""),
    ("module::PushNotification", "add-to-tag-filter", "", "deprecated in Flexisip"),
    ("module::PushNotification", "apple", "[push.apple] enabled", ""),
    (
        "module::PushNotification",
        "apple-certificate-dir",
        "[push.apple] certificate-dir",
        "same file names; token auth (.p8) is [push.apple] key-file",
    ),
    ("module::PushNotification", "no-badge", "[push] no-badge", ""),
    ("module::PushNotification", "firebase", "[push.firebase] enabled", ""),
    (
        "module::PushNotification",
        "firebase-projects-api-keys",
        "[push.firebase] projects-api-keys",
        "a TOML table instead of number:key pairs",
    ),
    (
        "module::PushNotification",
        "firebase-service-accounts",
        "[push.firebase] service-accounts",
        "a TOML table instead of project:path pairs",
    ),
    (
        "module::PushNotification",
        "firebase-token-expiration-anticipation-time",
        "[push.firebase] token-expiration-anticipation-time",
        "",
    ),
    (
        "module::PushNotification",
        "firebase-default-refresh-interval",
        "[push.firebase] default-refresh-interval",
        "",
    ),
    ("module::PushNotification", "external-push-uri", "[push.external] uri", ""),
    ("module::PushNotification", "external-push-method", "[push.external] method", ""),
    ("module::PushNotification", "external-push-protocol", "[push.external] protocol", ""),
    (
        "module::PushNotification",
        "register-wakeup-interval",
        "[push] register-wakeup-interval",
        "minutes, as in Flexisip",
    ),
    (
        "module::PushNotification",
        "register-wakeup-threshold",
        "[push] register-wakeup-threshold",
        "",
    ),
    ("module::PushNotification", "time-to-live", "", "deprecated in Flexisip"),
    ("module::PushNotification", "google, google-projects-api-keys", "", "removed in Flexisip"),
    ("module::PushNotification", "windowsphone*", "", "Windows push is gone"),
    ("module::Router", "fork-late", "[router] fork-late", "sipwake's default is true"),
    ("module::Router", "message-fork-late", "[router] fork-late", "one key for calls and messages"),
    ("module::Router", "call-fork-timeout", "[router] call-fork-timeout", ""),
    ("module::Router", "message-delivery-timeout", "[router] message-delivery-timeout", ""),
    ("module::Router", "message-accept-timeout", "[router] message-accept-timeout", ""),
    (
        "module::Router",
        "permit-self-generated-provisional-response",
        "[push] push-sent-response",
        'Flexisip\'s false is push-sent-response = ""',
    ),
    ("module::Router", "fallback-route, static-targets", "", ""),
    ("module::Router", "fork-no-global-decline, treat-*-as-urgent", "", ""),
    ("module::Router", "call-fork-urgent-timeout, call-fork-current-branches-timeout", "", ""),
    ("module::Router", "message-database-*", "", "held messages live in [storage] instead"),
    ("module::Router", "use-global-domain, resolve-routes, parent-domain-fallback", "", ""),
    ("module::Router", "allow-target-factorization, max-request-retention-time", "", ""),
    ("module::Registrar", "reg-domains", "[sip] domains", ""),
    ("module::Registrar", "max-expires", "[registrar] max-expires", "sipwake's default is 7 days"),
    ("module::Registrar", "min-expires", "[registrar] min-expires", ""),
    ("module::Registrar", "max-contacts-by-aor", "", "see [registrar] max-push-devices"),
    ("module::Registrar", "db-implementation, redis-*", "[storage] url", "redis://host:port/db"),
    ("module::Registrar", "reg-on-response, unique-id-parameters", "", ""),
    ("module::Registrar", "static-records-file, static-records-timeout", "", ""),
    ("module::Registrar", "service-route, message-expires-param-name", "", ""),
]


def _toml_value(value: Any) -> str:
    """A default as it would be written in the TOML file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        inner = ", ".join(f"{_toml_value(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + inner + " }" if inner else "{}"
    raise TypeError(f"no TOML form for {value!r}")  # pragma: no cover - schema types only


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is list:
        return "list of strings"
    if origin is dict:
        return "table of strings"
    names = {bool: "boolean", int: "integer", str: "string"}
    return names[hint]


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    assert f.default_factory is not dataclasses.MISSING
    return f.default_factory()


def _section_rows(section_cls: type[Any]) -> list[str]:
    hints = typing.get_type_hints(section_cls)
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, f in section_keys(section_cls):
        doc = str(f.metadata["doc"]).replace("|", "\\|")
        default = _toml_value(_default(f)).replace("|", "\\|")
        rows.append(f"| `{key}` | {_type_name(hints[f.name])} | `{default}` | {doc} |")
    return rows


def _section_classes() -> list[tuple[str, type[Any]]]:
    config = Config()
    return [(name, type(getattr(config, attr))) for name, attr in SECTIONS.items()]


def schema_keys() -> set[str]:
    """Every documented key as ``[section] key`` (apps as ``[apps."<app-id>"] key``)."""
    keys = {f"[{name}] {key}" for name, cls in _section_classes() for key, _ in section_keys(cls)}
    keys |= {f'[apps."<app-id>"] {key}' for key, _ in section_keys(AppSection)}
    return keys


def _defaults_toml() -> list[str]:
    lines: list[str] = []
    for name, cls in _section_classes():
        lines.append(f"[{name}]")
        for key, f in section_keys(cls):
            lines.append(f"{key} = {_toml_value(_default(f))}")
        lines.append("")
    return lines[:-1]


def render() -> str:
    """The whole of docs/configuration.md."""
    out = [
        "<!-- Generated by `python3 -m sipwake.docgen` from src/sipwake/config.py: "
        "do not edit by hand. -->",
        "",
        "# Configuration reference",
        "",
        "sipwake reads one TOML file, given with `sipwake serve --config FILE` (and",
        "`sipwake push --config FILE`). Without a file every key has the default below.",
        "Unknown sections and keys are errors that name the key, and so are values of the",
        "wrong type or outside their range: the server refuses to start rather than guess.",
        "Relative paths (`data-dir`, key and certificate files, `ca-file`) are relative to",
        "the folder of the configuration file.",
        "",
        "Key names follow Flexisip's where it has them; the table at the end maps Flexisip's",
        "`module::PushNotification`, `module::Router` and `module::Registrar` keys to",
        "sipwake's.",
        "",
    ]
    for name, cls in _section_classes():
        out += [f"## [{name}]", ""]
        doc = (cls.__doc__ or "").strip()
        if doc and not doc.startswith(cls.__name__ + "("):
            out += [doc, ""]
        out += [*_section_rows(cls), ""]
    out += [
        '## [apps."&lt;app-id&gt;"]',
        "",
        "One table per app, named by the AppId its devices report (the bundle id on iOS,",
        "the Firebase project on Android). The HTTP API uses it to find an app's provider",
        "and credentials; see [http-api.md](http-api.md) and [providers.md](providers.md).",
        "",
        *_section_rows(AppSection),
        "",
        "## Every key with its default",
        "",
        "This file is the same as running with no configuration at all:",
        "",
        "```toml",
        *_defaults_toml(),
        "```",
        "",
        "## Flexisip keys",
        "",
        "A Flexisip key without a sipwake key has no equivalent: sipwake does not do that.",
        "",
        "| Flexisip section | Flexisip key | sipwake key | note |",
        "|---|---|---|---|",
    ]
    for module, fkey, skey, note in FLEXISIP_KEYS:
        target = f"`{skey}`" if skey else "none"
        out.append(f"| `{module}` | `{fkey}` | {target} | {note} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m sipwake.docgen", description=__doc__)
    parser.add_argument(
        "--output", type=Path, default=OUTPUT, help="file to write (docs/configuration.md)"
    )
    parser.add_argument(
        "--check", action="store_true", help="only compare; exit 1 when the file differs"
    )
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        try:
            current = args.output.read_text(encoding="utf-8")
        except OSError as exc:
            sys.stderr.write(f"{args.output}: cannot read: {exc.strerror}\n")
            return 1
        if current != text:
            sys.stderr.write(f"{args.output} is out of date: run python3 -m sipwake.docgen\n")
            return 1
        return 0
    args.output.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
