"""The provider-neutral push model: where a push goes, what it says, and how it ended.

The SIP side, the HTTP API and the CLI all build a :class:`PushRequest`; providers turn it
into their own wire format and answer with a :class:`PushResult`.
"""

from __future__ import annotations

import enum
import uuid as uuid_module
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class Provider(enum.StrEnum):
    """RFC 8599 push notification service identifiers that sipwake serves."""

    APNS = "apns"
    APNS_DEV = "apns.dev"
    FCM = "fcm"
    WEBPUSH = "webpush"


class Service(enum.StrEnum):
    """Which token of a device a push goes to (the iOS 13 ``voip&remote`` extension)."""

    VOIP = "voip"
    REMOTE = "remote"


class PushKind(enum.StrEnum):
    """What the push is for; the provider chooses type, priority and payload from it."""

    CALL = "call"  # an incoming call: PushKit on iOS, high-priority data on Android
    MESSAGE = "message"  # a chat message: a visible alert
    BACKGROUND = "background"  # silent wake-up (re-register, reprovision)
    RINGING = "ringing"  # alert for a call, for iOS devices without a VoIP token
    CALL_ENDED = "call-ended"  # final alert: missed / answered / declined elsewhere


class CallEndReason(enum.StrEnum):
    """Why a call that rang a remote-only iOS device ended (the final alert's text)."""

    MISSED = "missed"
    ANSWERED_ELSEWHERE = "answered-elsewhere"
    DECLINED_ELSEWHERE = "declined-elsewhere"


#: loc-key of the final alert when the device gave no text of its own (Flexisip's
#: ``pn-missing-call-str``, ``pn-call-accepted-elsewhere-str``, ``pn-call-declined-elsewhere-str``).
DEFAULT_END_LOC_KEYS: Mapping[CallEndReason, str] = {
    CallEndReason.MISSED: "IC_MISSED",
    CallEndReason.ANSWERED_ELSEWHERE: "IC_ANSWERED_ELSEWHERE",
    CallEndReason.DECLINED_ELSEWHERE: "IC_DECLINED_ELSEWHERE",
}


class Outcome(enum.StrEnum):
    """How a push ended, as callers need to act on it."""

    SENT = "sent"
    FAILED = "failed"
    TOKEN_REJECTED = "token-rejected"  # noqa: S105  # the token is dead: drop it


@dataclass(frozen=True, slots=True)
class Destination:
    """One push token of one device, with what is needed to address it.

    ``app_id`` is the APNs bundle id (without ``.voip``), the Firebase project (id or
    number) for FCM, or empty for Web Push, where ``token`` is the subscription URI.
    """

    provider: Provider
    app_id: str
    token: str
    service: Service = Service.REMOTE
    team_id: str | None = None

    @property
    def sandbox(self) -> bool:
        """True for the APNs development environment."""
        return self.provider is Provider.APNS_DEV

    @property
    def is_apple(self) -> bool:
        return self.provider in (Provider.APNS, Provider.APNS_DEV)

    @property
    def apns_topic(self) -> str:
        """The ``apns-topic``: the bundle id, with ``.voip`` for PushKit tokens."""
        return f"{self.app_id}.voip" if self.service is Service.VOIP else self.app_id

    def token_prefix(self) -> str:
        """The part of the token that may be logged (tokens are secrets)."""
        return token_prefix(self.token)


def token_prefix(token: str, keep: int = 8) -> str:
    """First characters of a token followed by an ellipsis; never the whole token."""
    if len(token) <= keep:
        return token[: max(1, len(token) // 2)] + "…"
    return token[:keep] + "…"


@dataclass(frozen=True, slots=True)
class AlertStrings:
    """Per-device overrides of alert keys and sounds (contact params ``pn-call-str`` …)."""

    call_loc_key: str = "IC_MSG"
    message_loc_key: str = "IM_MSG"
    groupchat_loc_key: str = "GC_MSG"
    call_sound: str = "default"
    message_sound: str = "default"


@dataclass(slots=True)
class PushRequest:
    """One push to one destination, in provider-neutral terms."""

    destination: Destination
    kind: PushKind
    call_id: str = ""
    from_uri: str = ""
    display_name: str = ""
    text: str = ""
    chat_room_addr: str = ""
    group_chat: bool = False
    ttl: int = 30
    end_reason: CallEndReason | None = None
    custom_payload: Mapping[str, Any] | None = None
    strings: AlertStrings = field(default_factory=AlertStrings)
    mutable_content: bool = False
    no_badge: bool = False
    display_from_uri: bool = False
    collapse_id: str | None = None
    uuid: str = field(default_factory=lambda: str(uuid_module.uuid4()))
    thread_id: str = ""  # groups a chat's alerts (APNs aps.thread-id)
    #: The final alert's text (loc-key) given by the device (``pn-missing-call-str`` ...);
    #: empty: :data:`DEFAULT_END_LOC_KEYS`.
    end_loc_key: str = ""
    #: This one push's id (the APNs ``apns-id``) when it must differ from ``uuid``: the
    #: repeats of a call's push keep the call's ``uuid`` but are distinct notifications.
    notification_id: str = ""

    def shown_caller(self) -> tuple[str, str]:
        """The caller's URI and display name as a push may show them: both empty unless
        ``display_from_uri`` (as on Flexisip, no identity leaves the server unless
        configured). Every provider takes them from here so none can leak them alone."""
        if self.display_from_uri:
            return self.from_uri, self.display_name
        return "", ""

    def final_loc_key(self) -> str:
        """The loc-key of a CALL_ENDED alert: the device's text, else the default key."""
        if self.end_loc_key:
            return self.end_loc_key
        return DEFAULT_END_LOC_KEYS[self.end_reason or CallEndReason.MISSED]


@dataclass(frozen=True, slots=True)
class PushResult:
    """The provider's answer to one :class:`PushRequest`.

    ``provider_id`` is what the provider calls the push (``apns-id``, the FCM message
    name); ``status`` the provider's HTTP status when there was one.
    """

    outcome: Outcome
    reason: str = ""
    provider_id: str = ""
    status: int | None = None

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.SENT


class PushError(Exception):
    """A push that cannot be built or sent, with a message that says why."""
