"""DATABASE_REPLICA_URL: history and sync pages read from the replica; without
one, every read goes to the writer and sees what it just wrote."""
from sqlalchemy import event

from app.config import Settings
from app.chat.conversations import history
from app.wire import message_frame
from app.storage import Storage
from app.chat.sync import read_stream
from tests.harness import wait_until


def test_without_a_replica_reads_see_the_writers_data(cluster, make_user, connect, storage):
    assert storage.read_engine is storage.engine
    alice, bob = make_user(), make_user()
    ack = connect(alice).send_message(bob.user_id, "fresh")
    wait_until(lambda: read_stream(storage, int(bob.user_id), 0, 10, message_frame).entries, what="bob's stream")
    page = read_stream(storage, int(bob.user_id), 0, 10, message_frame)
    assert [e["msg_id"] for e in page.entries] == [ack["msg_id"]]
    assert [m["msg_id"] for m in history(storage, int(bob.user_id), ack["conversation_id"], None, 10,
                                         message_frame)["messages"]] == [ack["msg_id"]]


def test_history_and_sync_read_from_the_replica_when_one_is_set(cluster, make_user, connect, services):
    # The "replica" is the same database under a second URL: what matters is which engine is asked.
    replicated = Storage(Settings.from_env(database_replica_url=services.database_url))
    statements = {"primary": [], "replica": []}
    event.listen(replicated.engine, "before_cursor_execute",
                 lambda *a, **k: statements["primary"].append(a[2]))
    event.listen(replicated.read_engine, "before_cursor_execute",
                 lambda *a, **k: statements["replica"].append(a[2]))
    try:
        alice, bob = make_user(), make_user()
        ack = connect(alice).send_message(bob.user_id, "via the replica")
        wait_until(lambda: read_stream(replicated, int(bob.user_id), 0, 10, message_frame).entries,
                   what="bob's stream")
        history(replicated, int(bob.user_id), ack["conversation_id"], None, 10, message_frame)
        assert any("FROM sync_entry" in s for s in statements["replica"])
        assert any("FROM message" in s for s in statements["replica"])
        assert not any(s.lstrip().upper().startswith(("UPDATE", "INSERT", "DELETE")) for s in statements["replica"])
    finally:
        replicated.dispose()
