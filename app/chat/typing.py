"""Typing indicators: relayed live to the other parties, never stored, synced or pushed.

A `typing` frame goes to every online connection of the conversation's other
parties (all their devices, on every gateway) through the per-gateway delivery
channels, like live messages. One Redis script per frame answers both "is the
typist a party?" (the parties are cached in `typing:parties:{conversation}`) and
"may this frame be relayed now?" (`typing:last:{user}:{conversation}`): at most
one `start` per second per user and conversation; a `stop` right after a relayed
`start` still goes out, so an indicator does not linger. Dropped frames get no
answer. A `start` expires on the clients 6 s after it arrives (they repeat it
every 5 s while typing): no server timer.
"""
from __future__ import annotations

import logging
import time

from sqlalchemy import select

from app.accounts.blocks import BLOCKS_KEY, has_blocked
from app.chat.delivery import deliver_to_users
from app.errors import Forbidden, InvalidInput, NotFound
from app.storage import Storage
from app.wire import typing_frame
from models import ChatGroup, GroupMember, User

log = logging.getLogger(__name__)

TYPING_STATES = ("start", "stop")
PARTIES_KEY = "typing:parties:{}"  # conversation id -> its parties' ids, and "-" once loaded
THROTTLE_KEY = "typing:last:{}:{}"  # user, conversation -> the state relayed last, for RELAY_WINDOW_MS
LOADED = "-"
# Short: a membership change drops the entry (forget_parties), and a load that raced
# with that change is wrong for at most this long.
PARTIES_CACHE_SECONDS = 10
RELAY_WINDOW_MS = 1000

# KEYS: parties, throttle, and in a private chat the peer's block list (app.accounts.blocks).
# ARGV: user id, state, window ms. Returns {-1} (parties not cached), {0} (not a party),
# {2} (dropped) or {1, blocked by the peer (0/1), block list complete (0/1), parties...}.
_RELAY_SCRIPT = """
if redis.call('SISMEMBER', KEYS[1], '-') == 0 then return {-1} end
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 then return {0} end
local last = redis.call('GET', KEYS[2])
if last and not (last == 'start' and ARGV[2] == 'stop') then return {2} end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
local blocked, loaded = 0, 1
if #KEYS > 2 then
  blocked = redis.call('SISMEMBER', KEYS[3], ARGV[1])
  loaded = redis.call('SISMEMBER', KEYS[3], '-')
end
local answer = {1, blocked, loaded}
for _, party in ipairs(redis.call('SMEMBERS', KEYS[1])) do table.insert(answer, party) end
return answer
"""


def parse_conversation(conversation_id: str) -> tuple[str, tuple[int, ...]]:
    """("p", (low, high)) or ("g", (group id,)) from a conversation id; InvalidInput otherwise."""
    kind, _, rest = conversation_id.partition("_")
    parts = rest.split("_")
    # Ids as the server writes them (no leading zero, signed 64-bit): one conversation, one spelling.
    ids = tuple(int(p) for p in parts if p.isdigit() and p == str(int(p)) and 0 < int(p) < 2**63)
    if len(ids) != len(parts):
        ids = ()
    if kind == "p" and len(ids) == 2 and ids[0] < ids[1]:
        return "p", ids
    if kind == "g" and len(ids) == 1:
        return "g", ids
    raise InvalidInput("'conversation_id' must name a conversation: 'p_<low id>_<high id>' or 'g_<group id>'")


def relay_typing(storage: Storage, user_id: int, conversation_id: str, state: str) -> int:
    """Relay a typing state to the other parties' live connections; returns how many were reached
    (0 when the frame was dropped by the relay limit). NotFound / Forbidden as for a send."""
    kind, ids = parse_conversation(conversation_id)
    if kind == "p" and user_id not in ids:
        raise Forbidden(f"you are not a party of conversation {conversation_id!r}")
    keys = [PARTIES_KEY.format(conversation_id), THROTTLE_KEY.format(user_id, conversation_id)]
    peer = next((uid for uid in ids if uid != user_id), None) if kind == "p" else None
    if peer is not None:  # the block lookup rides along: one round trip decides the frame
        keys.append(BLOCKS_KEY.format(peer))
    args = [user_id, state, RELAY_WINDOW_MS]
    answer = storage.script(_RELAY_SCRIPT)(keys=keys, args=args)
    if int(answer[0]) == -1:
        _cache_parties(storage, conversation_id, _load_parties(storage, kind, ids))
        answer = storage.script(_RELAY_SCRIPT)(keys=keys, args=args)
    verdict = int(answer[0])
    if verdict == 0:
        raise Forbidden(f"you are not a member of conversation {conversation_id!r}")
    if verdict != 1:
        return 0
    others = [int(p) for p in answer[3:] if p not in (LOADED, LOADED.encode()) and int(p) != user_id]
    if peer is not None and has_blocked(storage, peer, user_id, [int(answer[1]), int(answer[2])]):
        return 0  # the peer blocked the typist: nothing shown, nothing said
    live = deliver_to_users(storage, typing_frame(conversation_id, user_id, state), others)
    return sum(len(conns) for conns in live.values())


class RecentTyping:
    """One connection's view of the relay limit, kept in the gateway's memory: a frame the Redis
    check would drop anyway is dropped here without a round trip (a flooding client costs its
    gateway a dict lookup per frame). Redis stays the judge for everything this lets through
    (several devices, several gateways)."""

    MAX_CONVERSATIONS = 64  # beyond this the memory is dropped: it only saves round trips

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self._last: dict[str, tuple[str, float]] = {}

    def may_relay(self, conversation_id: str, state: str) -> bool:
        """False for a frame the relay limit drops for sure (this connection relayed within the second)."""
        last = self._last.get(conversation_id)
        return last is None or self.clock() - last[1] >= RELAY_WINDOW_MS / 1000 or (
            last[0] == "start" and state == "stop")

    def relayed(self, conversation_id: str, state: str) -> None:
        """After a frame went to Redis without an error (a refused one is checked again next time)."""
        if len(self._last) >= self.MAX_CONVERSATIONS:
            self._last.clear()
        self._last[conversation_id] = (state, self.clock())


def forget_parties(storage: Storage, conversation_ids) -> None:
    """Drop cached parties after a membership change (the next typing frame reloads them)."""
    keys = [PARTIES_KEY.format(cid) for cid in conversation_ids]
    if keys:
        try:
            storage.redis.delete(*keys)
        except Exception as exc:  # the entry expires within PARTIES_CACHE_SECONDS anyway
            log.warning("typing parties of %s not dropped: %s", keys[0], exc.__class__.__name__)


def _load_parties(storage: Storage, kind: str, ids: tuple[int, ...]) -> list[int]:
    with storage.sessions() as session:
        if kind == "g":
            group_id = ids[0]
            if session.get(ChatGroup, group_id) is None:
                raise NotFound(f"group {group_id} does not exist")
            return list(session.scalars(select(GroupMember.user_id).where(
                GroupMember.group_id == group_id, GroupMember.left_seq.is_(None))))
        found = set(session.scalars(select(User.id).where(User.id.in_(ids), User.deleted_at.is_(None))))
    missing = [uid for uid in ids if uid not in found]
    if missing:
        raise NotFound(f"user {missing[0]} does not exist")
    return list(ids)


def _cache_parties(storage: Storage, conversation_id: str, parties: list[int]) -> None:
    key = PARTIES_KEY.format(conversation_id)
    pipe = storage.redis.pipeline(transaction=True)
    pipe.delete(key)
    pipe.sadd(key, LOADED, *parties)
    pipe.expire(key, PARTIES_CACHE_SECONDS)
    pipe.execute()
