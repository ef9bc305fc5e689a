"""Batching on the private path (gateway group commit, persist worker buffers, one
transaction per batch) keeps the guarantees: durable acks, idempotent sends,
gap-free sync, exactly-once delivery.

Domain tests call persist_private_messages against MariaDB; the others go
through the real gateways and workers.
"""
import random
import signal
import time
import uuid

import psutil
import pytest
from sqlalchemy import func, select

from app.chat.conversations import message_preview, private_conversation_id
from app.chat.persist import persist_private_message, persist_private_messages
from app.wire import message_frame
from app.ids import LeasedIds, NodeLease
from app.chat.sync import read_stream
from app.chat.unread import unread_counts
from models import ENTRY_MESSAGE, Conversation, Message, OfflineMessageIndex, SyncEntry, User
from tests.harness import wait_until
from tests.test_crash_recovery import _admin_connection, _blocked_persist_queries


# --- helpers -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ids(storage):
    """Real snowflake ids from a leased node, as a gateway makes them."""
    gen = LeasedIds(NodeLease(storage.redis))
    yield gen
    gen.lease.release()


def _payload(ids, sender, to, content, client_msg_id=None, msg_id=None):
    sender, to = int(sender), int(to)
    return {"msg_id": str(msg_id or ids.next_id()), "conversation_id": private_conversation_id(sender, to),
            "sender_id": sender, "to": to, "group_id": None, "client_msg_id": client_msg_id or uuid.uuid4().hex,
            "message_type": "text", "content": content, "extra": {}, "timestamp": int(time.time() * 1000),
            "origin_conn": None}


def _stream(storage, user_id):
    """(seq, message id, kind) of one user's sync stream, in stream order."""
    with storage.sessions() as session:
        return [tuple(r) for r in session.execute(
            select(SyncEntry.seq, SyncEntry.message_id, SyncEntry.kind)
            .where(SyncEntry.user_id == int(user_id)).order_by(SyncEntry.seq)).all()]


def _assert_gap_free(storage, user_id):
    """The stream is numbered 1..N with no hole, holds each message once, and the
    user's counter stands at N (so the next message gets N+1). Returns the message ids in order."""
    entries = _stream(storage, user_id)
    assert [seq for seq, _, _ in entries] == list(range(1, len(entries) + 1)), f"gap in {user_id}'s stream"
    messages = [mid for _, mid, kind in entries if kind == ENTRY_MESSAGE]
    assert len(messages) == len(set(messages)), f"a message twice in {user_id}'s stream"
    with storage.sessions() as session:
        assert session.get(User, int(user_id)).inbox_seq == len(entries)
    return messages


def _rows(storage, msg_ids):
    with storage.sessions() as session:
        return {m.id: m for m in session.scalars(select(Message).where(Message.id.in_([int(i) for i in msg_ids])))}


def _conversation_row(storage, user_id, conversation_id):
    with storage.sessions() as session:
        return session.scalar(select(Conversation).where(Conversation.user_id == int(user_id),
                                                         Conversation.conversation_id == conversation_id))


def _offline_index(storage, user_id):
    with storage.sessions() as session:
        return session.scalars(select(OfflineMessageIndex.message_id).where(
            OfflineMessageIndex.user_id == int(user_id))).all()


def _stored_count(storage, sender_ids):
    with storage.sessions() as session:
        return session.scalar(select(func.count()).select_from(Message).where(
            Message.sender_id.in_([int(s) for s in sender_ids])))


def _sync_all(client, limit=100):
    entries, cursor = [], None
    while True:
        client.send_json({"type": "sync", "cursor": cursor, "limit": limit})
        batch = client.next_frame(lambda f: f["type"] == "sync_batch")
        entries += batch["messages"]
        cursor = batch["cursor"]
        if not batch["has_more"]:
            return entries


def _send_pipelined(client, to, contents):
    """Send every frame before reading any answer; returns their client_msg_ids in send order."""
    cmids = [uuid.uuid4().hex for _ in contents]
    for cmid, content in zip(cmids, contents):
        client.send_json({"type": "send", "client_msg_id": cmid, "to": to, "content": content})
    return cmids


def _answers(client, cmids, timeout=30.0):
    return [client.next_frame(lambda f, c=cmid: f.get("client_msg_id") == c and f["type"] in ("ack", "error"),
                              timeout=timeout) for cmid in cmids]


def _live_counts(client, msg_ids, timeout=30.0):
    """How often each message arrived live on this connection, once all of them did."""
    wanted, deadline = set(msg_ids), time.monotonic() + timeout
    while missing := wanted - {f["msg_id"] for f in client.messages()}:
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(missing)} of {len(wanted)} messages not delivered live within {timeout:.0f}s")
        try:
            client.next_frame(lambda f: f["type"] == "message", timeout=max(0.1, deadline - time.monotonic()))
        except AssertionError:
            pass  # nothing more came: the deadline check above reports it
    client.drain(quiet=0.5)  # a second copy, if any, comes now
    counts = {}
    for frame in client.messages():
        counts[frame["msg_id"]] = counts.get(frame["msg_id"], 0) + 1
    return counts


# --- domain: persist_private_messages against MariaDB -----------------------------------------------------

def test_a_batch_stores_every_message_once_with_gap_free_streams_in_batch_order(cluster, make_user, storage, ids):
    users = [int(make_user().user_id) for _ in range(4)]
    pairs = [(0, 1), (1, 0), (0, 2), (2, 1), (3, 2), (2, 3)]  # four conversations, both directions
    payloads = [_payload(ids, users[s], users[t], f"batch message {i}")
                for i, (s, t) in ((i, pairs[i % len(pairs)]) for i in range(50))]
    # Batch order is arrival order, not id order (two gateways, commits in any order).
    random.Random(7).shuffle(payloads)

    outcomes = persist_private_messages(storage, payloads)

    assert [(str(o.msg_id), o.stored, o.dispatch, o.collided) for o in outcomes] == \
        [(p["msg_id"], True, True, False) for p in payloads]
    rows = _rows(storage, [p["msg_id"] for p in payloads])
    assert {str(i) for i in rows} == {p["msg_id"] for p in payloads}
    assert all(rows[int(p["msg_id"])].content == p["content"] for p in payloads)
    for user in users:
        mine = [int(p["msg_id"]) for p in payloads if user in (p["sender_id"], p["to"])]
        assert _assert_gap_free(storage, user) == mine  # every message of theirs, once, in batch order
        # What the user's device gets from `sync`: the same, as message frames.
        page = read_stream(storage, user, 0, 500, message_frame)
        assert [e["msg_id"] for e in page.entries] == [str(m) for m in mine] and not page.has_more
    # Each party's conversation list shows the newest message (by msg_id) of the conversation.
    for conversation in {p["conversation_id"] for p in payloads}:
        newest = max((p for p in payloads if p["conversation_id"] == conversation), key=lambda p: int(p["msg_id"]))
        for user in (newest["sender_id"], newest["to"]):
            row = _conversation_row(storage, user, conversation)
            assert (row.last_msg_id, row.last_message, row.last_message_time) == \
                (int(newest["msg_id"]), message_preview("text", newest["content"]), newest["timestamp"])

    # The next message, stored alone, continues each stream without a hole.
    after = _payload(ids, users[3], users[0], "after the batch")
    assert persist_private_message(storage, after).stored
    for user in (users[3], users[0]):
        assert _assert_gap_free(storage, user)[-1] == int(after["msg_id"])


def test_a_redelivered_batch_duplicates_nothing_and_stores_the_rest(cluster, make_user, storage, ids):
    alice, bob, carol = (int(make_user().user_id) for _ in range(3))
    payloads = [_payload(ids, alice if i % 2 else bob, carol if i % 3 else (bob if i % 2 else alice), f"m{i}")
                for i in range(12)]
    early = payloads[4]
    assert persist_private_message(storage, early).stored  # its first delivery died before the ack

    # The redelivery comes back in a batch with new messages, one of which the gateway published twice
    # (a publish retried after a lost confirm): the two copies land in one batch.
    batch = payloads + [dict(payloads[7])]
    outcomes = persist_private_messages(storage, batch)

    verdict = [(str(o.msg_id), o.stored, o.dispatch) for o in outcomes]
    assert verdict[4] == (early["msg_id"], False, True)  # already stored: dispatch again, store nothing
    assert verdict[7] == (payloads[7]["msg_id"], True, True)
    assert verdict[12] == (payloads[7]["msg_id"], False, True)
    assert [v for i, v in enumerate(verdict) if i not in (4, 7, 12)] == \
        [(p["msg_id"], True, True) for i, p in enumerate(payloads) if i not in (4, 7)]
    assert set(map(str, _rows(storage, [p["msg_id"] for p in payloads]))) == {p["msg_id"] for p in payloads}
    for user in (alice, bob, carol):
        mine = [int(p["msg_id"]) for p in payloads if user in (p["sender_id"], p["to"])]
        assert sorted(_assert_gap_free(storage, user)) == sorted(mine)  # one entry per message, no hole


def test_a_second_copy_of_a_send_in_a_batch_is_dropped_and_the_rest_stored(cluster, make_user, storage, ids):
    alice, bob = (int(make_user().user_id) for _ in range(2))
    # Copies of one send (same sender and client_msg_id) under other ids: possible only after Redis
    # lost the dedupe key. One was stored before the batch; two copies of another are in the batch.
    stored_before = _payload(ids, alice, bob, "sent once", client_msg_id="copy-1")
    assert persist_private_message(storage, stored_before).stored
    late_copy = _payload(ids, alice, bob, "sent once", client_msg_id="copy-1")
    first, second = (_payload(ids, bob, alice, "also once", client_msg_id="copy-2") for _ in range(2))
    others = [_payload(ids, alice, bob, f"other {i}") for i in range(5)]
    batch = [others[0], late_copy, others[1], first, others[2], second, others[3], others[4]]

    outcomes = persist_private_messages(storage, batch)

    by_position = [(o.msg_id, o.stored, o.dispatch, o.collided) for o in outcomes]
    assert by_position[1] == (int(stored_before["msg_id"]), False, False, False)  # names the copy that stays
    assert by_position[3] == (int(first["msg_id"]), True, True, False)
    assert by_position[5] == (int(first["msg_id"]), False, False, False)
    assert [by_position[i] for i in (0, 2, 4, 6, 7)] == [(int(p["msg_id"]), True, True, False) for p in others]
    kept = [stored_before, first] + others
    rows = _rows(storage, [p["msg_id"] for p in batch + [stored_before]])
    assert sorted(rows) == sorted(int(p["msg_id"]) for p in kept)
    for user in (alice, bob):
        assert sorted(_assert_gap_free(storage, user)) == sorted(int(p["msg_id"]) for p in kept)


def test_a_message_whose_id_another_message_holds_comes_back_collided_and_the_rest_are_stored(
        cluster, make_user, storage, ids):
    alice, bob, carol, dave = (int(make_user().user_id) for _ in range(4))
    holder = _payload(ids, carol, dave, "I hold this id")
    assert persist_private_message(storage, holder).stored
    # A gateway on a node used twice made the same id for another message.
    intruder = _payload(ids, alice, bob, "same id, other message", msg_id=holder["msg_id"])
    others = [_payload(ids, alice if i % 2 else bob, bob if i % 2 else alice, f"fine {i}") for i in range(6)]
    batch = others[:3] + [intruder] + others[3:]

    outcomes = persist_private_messages(storage, batch)

    assert (outcomes[3].msg_id, outcomes[3].stored, outcomes[3].dispatch, outcomes[3].collided) == \
        (int(holder["msg_id"]), False, False, True)
    assert [(o.stored, o.dispatch, o.collided) for i, o in enumerate(outcomes) if i != 3] == [(True, True, False)] * 6
    row = _rows(storage, [holder["msg_id"]])[int(holder["msg_id"])]
    assert (row.sender_id, row.receiver_id, row.content) == (carol, dave, "I hold this id")  # never merged
    for user in (alice, bob):
        assert sorted(_assert_gap_free(storage, user)) == sorted(int(p["msg_id"]) for p in others)
    assert _assert_gap_free(storage, carol) == [int(holder["msg_id"])]


# --- through the real persist and dispatch workers ---------------------------------------------------------

def test_a_poison_message_in_a_gateway_batch_does_not_take_the_good_ones_with_it(
        real_services, cluster, make_user, connect, storage, ids):
    # A gateway's batch is ONE task message: a payload that fails for good is quarantined as a task of its
    # own and dead-lettered alone; the acked messages published with it are stored and delivered.
    from tasks.dead_letters import dead_letter_count
    from tasks.messages import persist_message

    alice, bob = make_user(), make_user()
    b = connect(bob, cluster.gw2)
    good = [_payload(ids, alice.user_id, bob.user_id, f"good {i}") for i in range(2)]
    poison = {"msg_id": str(ids.next_id()), "note": "a payload persist cannot handle"}
    before = dead_letter_count()
    persist_message.apply_async(args=[[good[0], poison, good[1]]], argsrepr="[3 msgs]")

    wait_until(lambda: dead_letter_count() == before + 1, timeout=20, what="the poison message in dead_letters")
    wait_until(lambda: len(_rows(storage, [p["msg_id"] for p in good])) == 2, timeout=5,
               what="the good messages of the batch to be stored (they were acked to their sender)")
    for payload in good:
        assert b.wait_message(payload["msg_id"])["content"] == payload["content"]
    assert _assert_gap_free(storage, bob.user_id) == [int(p["msg_id"]) for p in good]


def test_an_id_collision_in_a_worker_batch_is_dead_lettered_alone(real_services, cluster, make_user, connect, storage,
                                                                   ids):
    from tasks.dead_letters import dead_letter_count
    from tasks.messages import persist_message

    alice, bob, carol, dave = make_user(), make_user(), make_user(), make_user()
    holder = _payload(ids, carol.user_id, dave.user_id, "I hold this id")
    assert persist_private_message(storage, holder).stored
    b = connect(bob, cluster.gw2)
    good = [_payload(ids, alice.user_id, bob.user_id, f"good {i}") for i in range(3)]
    intruder = _payload(ids, alice.user_id, bob.user_id, "same id, other message", msg_id=holder["msg_id"])
    before = dead_letter_count()
    persist_message.apply_async(args=[[good[0], intruder, good[1], good[2]]], argsrepr="[4 msgs]")

    for payload in good:
        assert b.wait_message(payload["msg_id"], timeout=20)["content"] == payload["content"]
    wait_until(lambda: dead_letter_count() == before + 1, timeout=20, what="the colliding message in dead_letters")
    row = _rows(storage, [holder["msg_id"]])[int(holder["msg_id"])]
    assert (row.sender_id, row.content) == (int(carol.user_id), "I hold this id")
    assert _assert_gap_free(storage, bob.user_id) == [int(p["msg_id"]) for p in good]
    b.drain(quiet=0.5)
    assert sorted(m["msg_id"] for m in b.messages()) == sorted(p["msg_id"] for p in good)  # each once, no intruder


def test_many_pipelined_senders_every_message_stored_delivered_and_synced_once(
        real_services, out_of_risk_window, cluster, make_user, connect, storage):
    senders = [make_user() for _ in range(10)]
    recipients = [make_user() for _ in range(4)]  # the last one is offline until it syncs
    for r in recipients:
        unread_counts(storage, int(r.user_id))  # counters built: dispatch does the counting
    live = [connect(r, cluster.gw2 if i % 2 else cluster.gw1) for i, r in enumerate(recipients[:3])]
    clients = [connect(s, cluster.gw1 if i % 2 else cluster.gw2) for i, s in enumerate(senders)]
    tablet = connect(senders[0], cluster.gw1)  # sender 0's other device sees what the phone sends
    per_sender = 30
    # sender i -> [(recipient index, content)] in send order
    plan = {i: [((i + j) % 4, f"s{i} m{j}") for j in range(per_sender)] for i in range(len(senders))}
    log_mark = len(cluster.persist.log_text())

    # Persist stopped: the tasks pile up, and on SIGCONT the worker's buffer fills with many at once.
    cluster.persist.signal(signal.SIGSTOP)
    try:
        cmids = {i: [] for i in plan}
        for j in range(per_sender):  # interleaved, so the gateways see the senders at the same time
            for i, client in enumerate(clients):
                r, content = plan[i][j]
                cmids[i] += _send_pipelined(client, recipients[r].user_id, [content])
        acks = {i: _answers(client, cmids[i]) for i, client in enumerate(clients)}
    finally:
        cluster.persist.signal(signal.SIGCONT)
    assert {a["type"] for answers in acks.values() for a in answers} == {"ack"}
    all_ids = [a["msg_id"] for answers in acks.values() for a in answers]
    assert len(set(all_ids)) == len(senders) * per_sender

    wait_until(lambda: _stored_count(storage, [s.user_id for s in senders]) == len(all_ids), timeout=40,
               what="every acked message stored")
    rows = _rows(storage, all_ids)
    expected = {r: [] for r in range(4)}  # recipient index -> msg ids
    for i, answers in acks.items():
        for (r, content), ack in zip(plan[i], answers):
            row = rows[int(ack["msg_id"])]
            assert (row.sender_id, row.receiver_id, row.content) == \
                (int(senders[i].user_id), int(recipients[r].user_id), content)
            expected[r].append(ack["msg_id"])
        for r in range(4):  # a conversation shown by msg_id (the documented display order) is in send order
            sent = [a["msg_id"] for (rr, _), a in zip(plan[i], answers) if rr == r]
            assert sorted(sent, key=int) == sent

    for r, client in enumerate(live):
        assert _live_counts(client, expected[r]) == dict.fromkeys(expected[r], 1), \
            f"recipient {r}: not every message exactly once live"
    assert _live_counts(tablet, [a["msg_id"] for a in acks[0]]) == {a["msg_id"]: 1 for a in acks[0]}
    for client in clients:  # the sending connection gets its ack, not its own message back
        client.drain(quiet=0.1)
        assert client.messages() == []
    offline = recipients[3]
    wait_until(lambda: sorted(_offline_index(storage, offline.user_id)) == sorted(map(int, expected[3])),
               timeout=20, what="the offline recipient's messages indexed")
    for r, recipient in enumerate(recipients):
        want = {}
        for msg_id in expected[r]:
            want[rows[int(msg_id)].conversation_id] = want.get(rows[int(msg_id)].conversation_id, 0) + 1
        wait_until(lambda: unread_counts(storage, int(recipient.user_id)) == want, timeout=15,
                   what=f"recipient {r}'s unread counts")
        assert sorted(_assert_gap_free(storage, recipient.user_id)) == sorted(map(int, expected[r]))
        synced = _sync_all(connect(recipient, cluster.gw1), limit=37)
        assert sorted(e["msg_id"] for e in synced) == sorted(expected[r])  # each once, nothing else
    for i, sender in enumerate(senders):  # their own sent messages, for their other devices
        assert sorted(_assert_gap_free(storage, sender.user_id)) == sorted(int(a["msg_id"]) for a in acks[i])
        for r in range(4):  # both conversation lists show the newest message of the conversation
            conversation = private_conversation_id(int(sender.user_id), int(recipients[r].user_id))
            newest = max((a["msg_id"] for (rr, _), a in zip(plan[i], acks[i]) if rr == r), key=int)
            for user in (sender, recipients[r]):
                row = _conversation_row(storage, user.user_id, conversation)
                assert (str(row.last_msg_id), row.last_message) == (newest, rows[int(newest)].content)
    # What the test is for: the worker did store many tasks in one run.
    runs = [line for line in cluster.persist.log_text()[log_mark:].splitlines() if " task(s)" in line]
    assert any(int(line.split(" from ")[1].split()[0]) > 1 for line in runs), runs[-5:]


def test_a_pool_process_killed_with_a_batch_in_hand_gives_it_back(
        real_services, out_of_risk_window, cluster, make_user, connect, storage):
    senders = [make_user() for _ in range(3)]
    bob, carol = make_user(), make_user()
    b, c = connect(bob, cluster.gw2), connect(carol, cluster.gw1)
    clients = [connect(s, cluster.gw1 if i % 2 else cluster.gw2) for i, s in enumerate(senders)]
    main = psutil.Process(cluster.persist.proc.pid)
    locker = _admin_connection(real_services.database_url)
    try:
        with locker.cursor() as cur:
            cur.execute("LOCK TABLES conversation WRITE")
        cmids = [_send_pipelined(client, (bob if i % 2 else carol).user_id, [f"s{i} m{j}" for j in range(6)])
                 for i, client in enumerate(clients)]
        acks = [_answers(client, ids_) for client, ids_ in zip(clients, cmids)]
        assert {a["type"] for answers in acks for a in answers} == {"ack"}  # from here on never lost
        # The batch is in a pool process, its messages inserted, waiting on the conversation table.
        wait_until(lambda: _blocked_persist_queries(locker), timeout=15, what="persist to block mid-transaction")
        pool = main.children()
        assert pool
        for child in pool:  # an OOM kill of the pool processes; the worker's main process lives on
            child.send_signal(signal.SIGKILL)
        psutil.wait_procs(pool, timeout=10)
    finally:
        with locker.cursor() as cur:
            cur.execute("UNLOCK TABLES")
        locker.close()
    try:
        expected = {bob.user_id: [], carol.user_id: []}
        for i, answers in enumerate(acks):
            expected[(bob if i % 2 else carol).user_id] += [a["msg_id"] for a in answers]
        for client, user in ((b, bob), (c, carol)):
            counts = _live_counts(client, expected[user.user_id])
            assert counts == dict.fromkeys(expected[user.user_id], 1)
            assert sorted(_assert_gap_free(storage, user.user_id)) == sorted(map(int, expected[user.user_id]))
        all_ids = [a["msg_id"] for answers in acks for a in answers]
        assert sorted(map(str, _rows(storage, all_ids))) == sorted(all_ids)
        assert cluster.persist.alive()  # the batch came back without restarting the worker
    finally:
        cluster.ensure_persist_worker()


def test_the_persist_worker_killed_with_a_batch_in_hand_loses_and_duplicates_nothing(
        real_services, cluster, make_user, connect, storage):
    senders = [make_user() for _ in range(4)]
    bob = make_user()
    b = connect(bob, cluster.gw2)
    clients = [connect(s, cluster.gw1 if i % 2 else cluster.gw2) for i, s in enumerate(senders)]
    locker = _admin_connection(real_services.database_url)
    try:
        try:
            with locker.cursor() as cur:
                cur.execute("LOCK TABLES conversation WRITE")
            cmids = [_send_pipelined(client, bob.user_id, [f"s{i} m{j}" for j in range(5)])
                     for i, client in enumerate(clients)]
            acks = [_answers(client, ids_) for client, ids_ in zip(clients, cmids)]
            assert {a["type"] for answers in acks for a in answers} == {"ack"}
            wait_until(lambda: _blocked_persist_queries(locker), timeout=15, what="persist to block mid-transaction")
            cluster.persist.kill()  # SIGKILL: the main process with its buffer and the pool with its batch
        finally:
            with locker.cursor() as cur:
                cur.execute("UNLOCK TABLES")
            locker.close()
        all_ids = [a["msg_id"] for answers in acks for a in answers]
        assert len(_rows(storage, all_ids)) == 0  # nothing committed: the whole batch is the broker's again
    finally:
        cluster.ensure_persist_worker()  # RabbitMQ redelivers the unacknowledged tasks to the new worker
    assert _live_counts(b, all_ids) == dict.fromkeys(all_ids, 1)
    assert sorted(map(str, _rows(storage, all_ids))) == sorted(all_ids)
    assert sorted(_assert_gap_free(storage, bob.user_id)) == sorted(map(int, all_ids))
    for i, sender in enumerate(senders):
        assert sorted(_assert_gap_free(storage, sender.user_id)) == sorted(int(a["msg_id"]) for a in acks[i])


def test_a_database_failure_mid_batch_retries_the_batch_without_loss_or_duplicates(
        real_services, cluster, make_user, connect, storage):
    senders = [make_user() for _ in range(3)]
    bob = make_user()
    b = connect(bob, cluster.gw1)
    clients = [connect(s, cluster.gw1 if i % 2 else cluster.gw2) for i, s in enumerate(senders)]
    log_mark = len(cluster.persist.log_text())
    locker = _admin_connection(real_services.database_url)
    try:
        with locker.cursor() as cur:
            cur.execute("LOCK TABLES conversation WRITE")
        cmids = [_send_pipelined(client, bob.user_id, [f"s{i} m{j}" for j in range(6)])
                 for i, client in enumerate(clients)]
        acks = [_answers(client, ids_) for client, ids_ in zip(clients, cmids)]
        assert {a["type"] for answers in acks for a in answers} == {"ack"}
        wait_until(lambda: _blocked_persist_queries(locker), timeout=15, what="persist to block mid-transaction")
        # The database drops the worker's connection in the middle of the batch's transaction.
        with locker.cursor() as cur:
            cur.execute("SELECT ID FROM information_schema.PROCESSLIST WHERE DB = DATABASE() "
                        "AND INFO LIKE 'INSERT INTO conversation%' AND ID <> CONNECTION_ID()")
            for (connection_id,) in cur.fetchall():
                cur.execute(f"KILL CONNECTION {int(connection_id)}")
    finally:
        with locker.cursor() as cur:
            cur.execute("UNLOCK TABLES")
        locker.close()
    all_ids = [a["msg_id"] for answers in acks for a in answers]
    assert _live_counts(b, all_ids) == dict.fromkeys(all_ids, 1)
    assert sorted(map(str, _rows(storage, all_ids))) == sorted(all_ids)
    assert sorted(_assert_gap_free(storage, bob.user_id)) == sorted(map(int, all_ids))
    for i, sender in enumerate(senders):
        assert sorted(_assert_gap_free(storage, sender.user_id)) == sorted(int(a["msg_id"]) for a in acks[i])
    # The failed batch is queued again after a backoff (tasks/messages.py _retry_later, logged
    # "retry N in X s"), not given straight back to the queue (a hot loop while the outage lasts).
    log = cluster.persist.log_text()[log_mark:]
    assert " retry 1 in " in log, "the batch was not retried with a backoff: " + log[-1500:]
