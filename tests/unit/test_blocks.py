"""Blocks (app.accounts.blocks) in the send path: MySQL is the truth, Redis a copy that may forget or race."""
import pytest

from app.accounts.blocks import BLOCKS_KEY, LOADED, _STORE_LOADED, block_user, has_blocked, unblock_user
from app.errors import Forbidden
from models import UserBlock
from tests.harness import flush_redis_keeping_claim


def test_a_blocked_sender_is_refused_for_every_client_msg_id_and_nothing_is_published(chat, make_user, storage):
    alice, mallory = make_user(), make_user()
    block_user(storage, alice, mallory)
    for cmid in ("first", "first", "second"):
        with pytest.raises(Forbidden, match="you cannot message this user"):
            chat.send(mallory, alice, "let me in", client_msg_id=cmid)
    assert chat.published == []
    unblock_user(storage, alice, mallory)
    assert chat.send(mallory, alice, "sorry", client_msg_id="first").msg_id  # the refused id is free again


def test_a_block_list_redis_forgot_or_holds_only_in_part_is_read_from_mysql(storage, make_user):
    alice, mallory, eve = make_user(), make_user(), make_user()
    block_user(storage, alice, mallory)
    flush_redis_keeping_claim(storage.redis)
    assert has_blocked(storage, alice, mallory)  # loaded from MySQL
    assert storage.redis.sismember(BLOCKS_KEY.format(alice), LOADED)
    # A block whose Redis copy was lost after its first write: MySQL has it, Redis a partial set.
    with storage.session() as session:
        session.add(UserBlock(blocker_id=alice, blocked_id=eve, created_at_ms=1))
    storage.redis.delete(BLOCKS_KEY.format(alice))
    storage.redis.sadd(BLOCKS_KEY.format(alice), str(mallory))  # no "-": not the whole list
    assert has_blocked(storage, alice, eve)


def test_a_load_that_started_before_an_unblock_does_not_bring_the_block_back(storage, make_user):
    alice, mallory = make_user(), make_user()
    block_user(storage, alice, mallory)
    storage.redis.delete(BLOCKS_KEY.format(alice))
    generation_seen = storage.redis.get(f"blocks:{alice}:gen") or "0"  # a loader read MySQL here (blocked)...
    unblock_user(storage, alice, mallory)  # ...then the unblock committed and told Redis
    stored = storage.script(_STORE_LOADED)(keys=[BLOCKS_KEY.format(alice), f"blocks:{alice}:gen"],
                                           args=[generation_seen, 3600, str(mallory)])
    assert stored == 0 and not has_blocked(storage, alice, mallory)

