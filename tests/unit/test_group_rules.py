"""Groups (app.chat.groups): membership rules, roles, what a member sees after leaving and rejoining."""
import pytest

from app.chat.conversations import history, list_conversations
from app.chat.groups import add_members, create_group, members_of, my_groups, remove_member, rename_group, set_role
from app.chat.sync import read_stream
from app.chat.unread import unread_counts
from app.errors import Conflict, Forbidden, InvalidInput, NotFound
from app.wire import message_frame


def _history(storage, user_id, conversation_id):
    return [m["content"] for m in history(storage, user_id, conversation_id, None, 50, message_frame)["messages"]]


def _synced(storage, user_id):
    return [e["content"] for e in read_stream(storage, user_id, 0, 100, message_frame).entries if e["type"] == "message"]


def test_the_creator_owns_the_group_and_everyone_sees_it_in_their_lists(make_user, storage):
    owner, bob, carol = make_user("owner1"), make_user("bob1"), make_user("carol1")
    group = create_group(storage, owner, "  Weekend  ", [bob, carol, owner, bob])

    assert group.members == [owner, *sorted([bob, carol])]
    mine, = my_groups(storage, bob)
    assert (mine["name"], mine["role"], mine["member_count"], mine["owner_id"]) == ("Weekend", "member", 3, str(owner))
    assert [(m["username"], m["role"]) for m in members_of(storage, carol, group.group_id)] == [
        ("owner1", "owner"), ("bob1", "member"), ("carol1", "member")]
    listed, = list_conversations(storage, carol)
    assert (listed["conversation_id"], listed["group"]) == (group.conversation_id, {"name": "Weekend", "member": True})


@pytest.mark.parametrize("name, why", [("", "1 to 100"), ("x" * 101, "1 to 100"), (7, "string"),
                                       ("bell\x07", "control")])
def test_a_bad_group_name_is_refused_saying_why(make_user, storage, name, why):
    with pytest.raises(InvalidInput, match=why):
        create_group(storage, make_user(), name, [])


def test_a_group_with_an_unknown_user_is_not_created(make_user, storage):
    owner = make_user()
    with pytest.raises(NotFound, match="999999999"):
        create_group(storage, owner, "ghosts", [999_999_999])
    assert my_groups(storage, owner) == []


def test_outsiders_cannot_see_members_and_plain_members_cannot_add_or_rename(make_user, storage):
    owner, bob, outsider = make_user(), make_user(), make_user()
    group = create_group(storage, owner, "club", [bob])
    with pytest.raises(Forbidden):
        members_of(storage, outsider, group.group_id)
    with pytest.raises(NotFound):
        members_of(storage, owner, group.group_id + 1000)
    with pytest.raises(Forbidden, match="owner or a group admin"):
        add_members(storage, bob, group.group_id, [outsider])
    with pytest.raises(Forbidden, match="owner or a group admin"):
        rename_group(storage, bob, group.group_id, "bob's club")
    assert [m["user_id"] for m in members_of(storage, owner, group.group_id)] == [str(owner), str(bob)]


def test_an_admin_adds_and_removes_plain_members_but_not_other_admins(make_user, storage):
    owner, admin, other_admin, carol, dave = (make_user() for _ in range(5))
    group = create_group(storage, owner, "staff", [admin, other_admin])
    set_role(storage, owner, group.group_id, admin, "admin")
    set_role(storage, owner, group.group_id, other_admin, "admin")

    assert add_members(storage, admin, group.group_id, [carol, dave, other_admin]) == sorted([carol, dave])
    remove_member(storage, admin, group.group_id, carol)
    with pytest.raises(Forbidden):
        remove_member(storage, admin, group.group_id, other_admin)
    with pytest.raises(Forbidden):
        remove_member(storage, admin, group.group_id, owner)
    with pytest.raises(Forbidden, match="only the group owner"):
        set_role(storage, admin, group.group_id, dave, "admin")
    with pytest.raises(InvalidInput, match="role"):
        set_role(storage, owner, group.group_id, dave, "king")
    roles = {int(m["user_id"]): m["role"] for m in members_of(storage, owner, group.group_id)}
    assert roles == {owner: "owner", admin: "admin", other_admin: "admin", dave: "member"}


def test_the_owner_hands_over_before_leaving(make_user, storage):
    owner, bob = make_user(), make_user()
    group = create_group(storage, owner, "handover", [bob])
    with pytest.raises(Conflict, match="make another member owner"):
        remove_member(storage, owner, group.group_id, owner)
    with pytest.raises(Conflict, match="cannot demote themselves"):
        set_role(storage, owner, group.group_id, owner, "member")

    set_role(storage, owner, group.group_id, bob, "owner")
    roles = {int(m["user_id"]): m["role"] for m in members_of(storage, bob, group.group_id)}
    assert roles == {owner: "admin", bob: "owner"}
    remove_member(storage, owner, group.group_id, owner)  # now the former owner may leave
    assert my_groups(storage, owner) == []
    assert my_groups(storage, bob)[0]["owner_id"] == str(bob)


def test_who_left_sees_the_history_until_then_and_after_rejoining_only_from_the_new_join(
        chat, make_user, storage):
    owner, bob = make_user(), make_user()
    group = create_group(storage, owner, "history", [bob])
    chat.message(owner, group_id=group.group_id, content="before")
    remove_member(storage, bob, group.group_id, bob)  # Bob leaves
    chat.message(owner, group_id=group.group_id, content="while away")

    assert _history(storage, bob, group.conversation_id) == ["before"]
    assert _synced(storage, bob) == ["before"]
    assert unread_counts(storage, bob) == {group.conversation_id: 1}  # only what he received
    with pytest.raises(Forbidden):  # he cannot send any more
        chat.send(bob, group_id=group.group_id, content="can I still?")
    assert list_conversations(storage, bob)[0]["group"]["member"] is False

    add_members(storage, owner, group.group_id, [bob])
    chat.message(owner, group_id=group.group_id, content="welcome back")
    chat.message(bob, group_id=group.group_id, content="thanks")
    # From the latest join onward: the old history is no longer shown, the gap never.
    assert _history(storage, bob, group.conversation_id) == ["thanks", "welcome back"]
    assert _synced(storage, bob) == ["before", "welcome back", "thanks"]
    assert _history(storage, owner, group.conversation_id) == ["thanks", "welcome back", "while away", "before"]


def test_a_removed_member_gets_none_of_the_new_messages(chat, make_user, storage):
    owner, bob, carol = make_user(), make_user(), make_user()
    group = create_group(storage, owner, "fanout", [bob, carol])
    remove_member(storage, owner, group.group_id, carol)
    ack = chat.send(owner, group_id=group.group_id, content="without Carol")
    (outcome, fanned), = chat.deliver().values()

    assert [uid for chunk in outcome.chunks for uid in chunk] == sorted([owner, bob])
    assert sum((f.offline_users for f in fanned), []) == [bob]  # the sender needs no push
    assert _synced(storage, carol) == [] and unread_counts(storage, carol) == {}
    assert _synced(storage, bob) == ["without Carol"] and unread_counts(storage, bob) == {ack.conversation_id: 1}


def test_a_redelivered_group_message_does_not_reach_a_member_who_joined_after_it(chat, make_user, storage):
    owner, bob, carol = make_user(), make_user(), make_user()
    group = create_group(storage, owner, "late joiner", [bob])
    chat.message(owner, group_id=group.group_id, content="before Carol")
    add_members(storage, owner, group.group_id, [carol])
    (outcome, _), = chat.redeliver(chat.published).values()  # the worker died before its ack

    assert outcome.stored is False and [uid for chunk in outcome.chunks for uid in chunk] == sorted([owner, bob])
    assert _synced(storage, carol) == [] and unread_counts(storage, carol) == {}
    assert _history(storage, carol, group.conversation_id) == []


def test_a_rename_shows_in_every_list_including_former_members(make_user, storage):
    owner, bob, carol = make_user(), make_user(), make_user()
    group = create_group(storage, owner, "old name", [bob, carol])
    list_conversations(storage, carol)  # cached before the change
    remove_member(storage, carol, group.group_id, carol)
    set_role(storage, owner, group.group_id, bob, "admin")
    rename_group(storage, bob, group.group_id, "new name")
    for user in (owner, bob, carol):
        assert list_conversations(storage, user)[0]["group"]["name"] == "new name"
