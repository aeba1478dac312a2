"""Which push a sleeping device gets, and when: the push policy of the push-aware proxy.

Sans-IO: the router asks :meth:`PushStrategy.plan` for a :class:`DevicePush` per device
a call or message may wake, then polls it with the clock (:meth:`DevicePush.due`) and
sends what it returns. The choices follow Flexisip, because Linphone-style apps expect
them:

* a call to an iOS device with a VoIP token: one PushKit push (``PushKind.CALL``);
* a call to an Android (FCM) or Web Push device: one high-priority data push;
* a call to an iOS device with only a remote token: an alert (``RINGING``) repeated every
  ``call-remote-push-interval`` with the Call-ID as collapse id, and when the call ends a
  final alert (``CALL_ENDED``) that replaces it: missed, answered or declined elsewhere;
* a message: an alert (iOS remote token) or a data push (Android, Web Push). iOS alerts
  carry ``mutable-content: 1`` (the app's notification service extension fetches the
  message by Call-ID) and an empty ``chat-room-addr``;
* a group-chat invitation (an INVITE whose body is a ``resource-lists+xml`` list of
  participants, Flexisip's ``isGroupChatInvite``): a message push, not a call, with the
  ``pn-groupchat-str`` key (``GC_MSG``) and the chat room (the user part of the From, the
  conference address) in ``chat-room-addr``, which is what tells Linphone's extension that
  it is an invitation.

Every push of one call or message to one device has the same ``uuid`` (an app may key its
CallKit call by it), and ringing alerts and their final alert the same collapse id; each
repeat is still its own notification (its own ``apns-id``). The final alert's text is the
device's (``pn-missing-call-str``, ``pn-call-accepted-elsewhere-str``,
``pn-call-declined-elsewhere-str``), else ``IC_MISSED`` and its siblings. A device that
registered ``pn-silent=0`` asks for pushes that ring: the caller then hears ``180 Ringing``
once its call push went out (what older Flexisip releases did); ``pn-silent=1``, what
Linphone sends by default, keeps the push silent towards the caller.

The first push waits ``[push] timeout`` (or the contact's ``pn-timeout``) so that a device
whose app is awake answers without being woken. Call and message pushes are sent again
``retransmission-count`` times every ``retransmission-interval`` until the device wakes.
One Call-ID gets at most one push plan per destination token, however many times the
request is forwarded to it.
"""

from __future__ import annotations

import enum
import re
import uuid as uuid_module
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

from sipwake.clock import Clock
from sipwake.config import Config
from sipwake.push.params import PushParams
from sipwake.push.request import (
    CallEndReason,
    Destination,
    Provider,
    PushKind,
    PushRequest,
    Service,
)
from sipwake.sip.message import Request
from sipwake.sip.uri import SipUri

#: Content types of MESSAGEs that never wake a device (RFC 3994 isComposing, RFC 5438 IMDN).
SILENT_MESSAGE_TYPES = frozenset({"application/im-iscomposing+xml", "message/imdn+xml"})
_CPIM_IMDN = re.compile(rb"(?im)^content-type:\s*message/imdn\+xml")
#: Remembered (Call-ID, token) pairs, so a request forwarded twice pushes once.
MAX_REMEMBERED = 20_000


class RequestKind(enum.StrEnum):
    """What the held request is, for the push policy."""

    CALL = "call"
    MESSAGE = "message"


def no_push_reason(request: Request) -> str | None:
    """Why ``request`` must not wake anyone, or None when it may (Flexisip's exclusions)."""
    to = request.to
    if to is not None and to.tag is not None:
        return "in-dialog request"
    priority = request.headers.get("priority")
    if priority is not None and priority.strip().lower() == "non-urgent":
        return "Priority: non-urgent"
    method = request.method
    if method == "INVITE" and "replaces" in request.headers:
        return "INVITE with Replaces"
    if method == "MESSAGE":
        ctype = (request.headers.get("content-type") or "").split(";", 1)[0].strip().lower()
        if ctype in SILENT_MESSAGE_TYPES:
            return f"MESSAGE of type {ctype}"
        if ctype == "message/cpim" and _CPIM_IMDN.search(request.body):
            return "MESSAGE carrying an IMDN"
    return None


def is_group_chat_invite(request: Request) -> bool:
    """True for the INVITE that invites a device into a group chat (Flexisip's rule).

    A conference server invites each participant's device with an INVITE whose body is
    the participant list: ``Content-Type: application/resource-lists+xml``, whose
    parameters, when it has any, include ``text``. Unlike Flexisip, an INVITE without a
    Content-Type (a call with a late offer) is a call.
    """
    if request.method != "INVITE":
        return False
    ctype = request.headers.get("content-type")
    if ctype is None:
        return False
    media, *params = ctype.split(";")
    if media.strip().lower().rpartition("/")[2] != "resource-lists+xml":
        return False
    names = {p.split("=", 1)[0].strip().lower() for p in params if p.strip()}
    return not names or "text" in names


def chat_room_of(request: Request) -> str:
    """The chat room of a group-chat invitation: the user part of its From (the
    conference address), which Linphone's extension looks the chat room up with."""
    frm = request.from_
    if frm is None or not isinstance(frm.uri, SipUri):
        return ""
    return frm.uri.user or ""


def end_reason_of(cancel: Request | None) -> CallEndReason:
    """The final alert's reason from a CANCEL's Reason header (RFC 3326)."""
    if cancel is None:
        return CallEndReason.MISSED
    for value in cancel.headers.get_all("reason"):
        protocol, _, params = value.partition(";")
        if protocol.strip().upper() != "SIP":
            continue
        match = re.search(r"cause\s*=\s*(\d+)", params)
        if match is None:
            continue
        cause = int(match.group(1))
        if 200 <= cause < 300:
            return CallEndReason.ANSWERED_ELSEWHERE
        if cause in (600, 603):
            return CallEndReason.DECLINED_ELSEWHERE
    return CallEndReason.MISSED


@dataclass(frozen=True, slots=True)
class Caller:
    """Who the push is about (the request's From) and which call or conversation."""

    call_id: str
    from_uri: str = ""
    display_name: str = ""
    text: str = ""
    #: A group-chat invitation (:func:`is_group_chat_invite`) and its chat room.
    group_chat: bool = False
    chat_room_addr: str = ""


class DevicePush:
    """The pushes one device gets for one request, as a clock-driven schedule.

    :meth:`due` returns what must be sent now; :meth:`stop` ends the schedule when the
    device wakes (it answered or registered); :meth:`finish` ends it when the call is over
    and returns the final alert a remote-only iOS device needs.
    """

    __slots__ = (
        "_at",
        "_left",
        "destination",
        "end_strings",
        "finished",
        "interval",
        "kind",
        "rings",
        "sent",
        "stopped",
        "template",
    )

    def __init__(
        self,
        template: PushRequest,
        first_at: float,
        interval: float,
        repeats: int | None,
        end_strings: Mapping[CallEndReason, str] | None = None,
        rings: bool = False,
    ) -> None:
        self.template = template
        self.destination = template.destination
        self.kind = template.kind
        self.interval = interval
        self._at: float | None = first_at
        self._left = repeats  # None: until stopped (ringing alerts)
        self.sent = 0
        self.stopped = False
        self.finished = False
        #: The device's final-alert texts (pn-missing-call-str ...), by reason.
        self.end_strings: Mapping[CallEndReason, str] = end_strings or {}
        #: The push rings the phone (pn-silent=0): the caller may be told 180 Ringing.
        self.rings = rings

    @property
    def is_voip(self) -> bool:
        """A PushKit push: iOS then requires the app to report a call (CallKit)."""
        return self.kind is PushKind.CALL and self.destination.service is Service.VOIP

    def next_deadline(self) -> float | None:
        return None if self.stopped else self._at

    def due(self, now: float) -> list[PushRequest]:
        """The pushes to send at ``now`` (at most one; missed repeats are not piled up)."""
        at = self._at
        if self.stopped or at is None or now < at:
            return []
        self.sent += 1
        out = [self._copy(self.kind)]
        if self._left is None and self.interval > 0:
            self._at = max(at + self.interval, now)
        elif self._left is not None and self._left > 0 and self.interval > 0:
            self._left -= 1
            self._at = max(at + self.interval, now)
        else:
            self._at = None
        return out

    def stop(self) -> None:
        self.stopped = True
        self._at = None

    def finish(self, reason: CallEndReason) -> PushRequest | None:
        """Stop; for a device that got ringing alerts, the alert that ends them (once).

        A device that woke meanwhile still gets it: the ringing alert on its lock screen
        is replaced rather than left behind.
        """
        was_ringing = self.kind is PushKind.RINGING and self.sent > 0 and not self.finished
        self.finished = True
        self.stop()
        if not was_ringing:
            return None
        final = self._copy(PushKind.CALL_ENDED)
        final.end_reason = reason
        final.end_loc_key = self.end_strings.get(reason, "")
        return final

    def _copy(self, kind: PushKind) -> PushRequest:
        """The next push: the template's fields, the same ``uuid`` and collapse id (one
        call, one device), and past the first push a notification id of its own."""
        t = self.template
        return PushRequest(
            destination=t.destination,
            kind=kind,
            call_id=t.call_id,
            from_uri=t.from_uri,
            display_name=t.display_name,
            text=t.text,
            chat_room_addr=t.chat_room_addr,
            group_chat=t.group_chat,
            ttl=t.ttl,
            custom_payload=t.custom_payload,
            strings=t.strings,
            mutable_content=t.mutable_content and kind is PushKind.MESSAGE,
            no_badge=t.no_badge,
            display_from_uri=t.display_from_uri,
            collapse_id=t.collapse_id,
            uuid=t.uuid,
            thread_id=t.thread_id,
            notification_id="" if self.sent <= 1 and kind is t.kind else _new_id(),
        )


def _new_id() -> str:
    return str(uuid_module.uuid4())


class PushStrategy:
    """Turns a device's push parameters and a request into a :class:`DevicePush`."""

    def __init__(self, config: Config, clock: Clock) -> None:
        self.config = config
        self.clock = clock
        # (call-id, token) -> monotonic time after which it may be forgotten.
        self._claimed: OrderedDict[tuple[str, str], float] = OrderedDict()

    def call_ttl(self) -> int:
        return self.config.router.call_fork_timeout

    def message_ttl(self) -> int:
        ttl = self.config.push.message_time_to_live
        return ttl or self.config.router.message_delivery_timeout

    def plan(self, kind: RequestKind, params: PushParams, caller: Caller) -> DevicePush | None:
        """The push schedule for one device, or None (no usable token, or already claimed)."""
        push = self.config.push
        if kind is RequestKind.CALL and caller.group_chat:
            kind = RequestKind.MESSAGE  # a group-chat invitation is pushed as a message
        dest, push_kind = self._choose(kind, params)
        if dest is None:
            return None
        if not self._claim(caller.call_id, dest.token):
            return None
        now = self.clock.monotonic()
        delay = params.timeout if params.timeout is not None else push.timeout
        ttl = self.call_ttl() if kind is RequestKind.CALL else self.message_ttl()
        message = push_kind is PushKind.MESSAGE
        template = PushRequest(
            destination=dest,
            kind=push_kind,
            call_id=caller.call_id,
            from_uri=caller.from_uri,
            display_name=caller.display_name,
            text=caller.text,
            chat_room_addr=caller.chat_room_addr if message else "",
            group_chat=message and caller.group_chat,
            ttl=ttl,
            strings=params.strings,
            # iOS runs the notification service extension only for mutable alerts.
            mutable_content=message and dest.is_apple,
            no_badge=push.no_badge,
            display_from_uri=push.display_from_uri,
        )
        rings = kind is RequestKind.CALL and params.silent is False
        if push_kind is PushKind.RINGING:
            template.collapse_id = caller.call_id
            interval = params.call_remote_push_interval
            if interval is None:
                interval = push.call_remote_push_interval
            return DevicePush(
                template,
                now + delay,
                float(interval),
                None if interval else 0,
                params.end_strings,
                rings,
            )
        return DevicePush(
            template,
            now + delay,
            float(push.retransmission_interval),
            push.retransmission_count,
            params.end_strings,
            rings,
        )

    @staticmethod
    def _choose(kind: RequestKind, params: PushParams) -> tuple[Destination | None, PushKind]:
        voip = params.for_service(Service.VOIP)
        remote = params.for_service(Service.REMOTE)
        if kind is RequestKind.CALL:
            if voip is not None:
                return voip, PushKind.CALL
            if remote is not None and remote.provider in (Provider.APNS, Provider.APNS_DEV):
                return remote, PushKind.RINGING
            return remote, PushKind.CALL
        # iOS forbids PushKit for anything but calls: messages go to the remote token.
        return remote, PushKind.MESSAGE

    def _claim(self, call_id: str, token: str) -> bool:
        now = self.clock.monotonic()
        claimed = self._claimed
        while claimed:
            until = next(iter(claimed.values()))
            if until > now and len(claimed) < MAX_REMEMBERED:
                break
            claimed.popitem(last=False)
        mark = (call_id, token)
        if not call_id:
            return True
        if mark in claimed:
            return False
        ttl = max(self.call_ttl(), self.config.router.message_accept_timeout) + 60
        claimed[mark] = now + ttl
        return True


__all__ = [
    "Caller",
    "DevicePush",
    "PushStrategy",
    "RequestKind",
    "chat_room_of",
    "end_reason_of",
    "is_group_chat_invite",
    "no_push_reason",
]
