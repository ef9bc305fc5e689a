"""The group screens of the chat page, against the groups REST contract (protocol.md §17).

The groups API's answers are scripted with Playwright routes, to check the exact requests
the page makes; everything else (login, socket, lookups) is the real cluster. The socket is
routed through Playwright to record the page's frames and to hand it a group message as the
gateway sends it. test_group_chat.py runs the same screens against the real groups API.
"""
import json
import re
import time

from playwright.sync_api import expect

from tests.browser.conftest import bubbles, conv_item, log_in, send


class FakeGroupsApi:
    def __init__(self, owner, member):
        self.requests: list[tuple[str, str, object]] = []
        self.members = [{"user_id": owner.user_id, "username": owner.username, "role": "owner"},
                        {"user_id": member.user_id, "username": member.username, "role": "member"}]
        self.groups: list[dict] = []
        self.users = {owner.user_id: owner, member.user_id: member}

    def handle(self, route):
        req = route.request
        path = re.sub(r"^https?://[^/]+", "", req.url).split("?")[0]
        body = json.loads(req.post_data) if req.post_data else None
        self.requests.append((req.method, path, body))
        if path == "/api/groups" and req.method == "GET":
            return route.fulfill(json={"groups": self.groups})
        if path == "/api/groups" and req.method == "POST":
            self.groups.append({"group_id": "777", "conversation_id": "g_777", "name": body["name"], "role": "owner",
                                "member_count": 1 + len(body["members"])})
            return route.fulfill(status=201, json={"group_id": "777", "conversation_id": "g_777"})
        if path == "/api/groups/777/members" and req.method == "GET":
            return route.fulfill(json={"members": self.members})
        if path == "/api/groups/777/members" and req.method == "POST":
            for uid in body["user_ids"]:
                self.members.append({"user_id": uid, "username": self.users[uid].username, "role": "member"})
            return route.fulfill(json={"added": body["user_ids"]})
        return route.fulfill(status=404, json={"error": "not_found", "message": "not scripted"})


def test_create_a_group_add_a_member_and_chat_in_it(cluster, make_user, open_page, shot):
    alice, bob, carol = make_user(), make_user(), make_user()
    api = FakeGroupsApi(alice, bob)
    sockets, sent = [], []

    def route_socket(ws):
        server = ws.connect_to_server()
        ws.on_message(lambda message: (sent.append(json.loads(message)), server.send(message)))
        sockets.append(ws)

    def routes(page):
        page.route(re.compile(r".*/api/groups.*"), api.handle)
        page.route_web_socket(re.compile(r".*/ws\?(token|ticket)=.*"), route_socket)

    page = open_page(cluster.gw1.http, before=routes)
    log_in(page, alice.username)
    api.users[carol.user_id] = carol

    page.locator("#new-group").click()
    page.locator("#group-form input[name=name]").fill("Weekend <b>plans</b>")
    page.locator("#group-form input[name=members]").fill(f" {bob.username} ,")
    page.get_by_role("button", name="Create group").click()
    expect(page.locator("#conv-title")).to_have_text("Weekend <b>plans</b>")
    assert ("POST", "/api/groups", {"name": "Weekend <b>plans</b>", "members": [bob.user_id]}) in api.requests
    expect(page.locator("#conv-sub")).to_have_text("2 members")
    expect(conv_item(page, "g_777").locator(".conv-name")).to_have_text("Weekend <b>plans</b>")

    send(page, "hello group")
    expect(bubbles(page, "hello group")).to_have_count(1)
    frame = next(f for f in sent if f.get("type") == "send")
    assert frame["group_id"] == "777" and "to" not in frame and frame["content"] == "hello group"

    # A group message as the gateway sends it: sender named from the member list.
    sockets[-1].send(json.dumps({
        "type": "message", "msg_id": "999999999999999999", "client_msg_id": "bob-1", "conversation_id": "g_777",
        "from": bob.user_id, "to": None, "group_id": "777", "message_type": "text", "content": "hi from bob",
        "extra": {}, "timestamp": int(time.time() * 1000), "status": 0}))
    row = bubbles(page, "hi from bob")
    expect(row.locator(".sender")).to_have_text(bob.username)
    expect(conv_item(page, "g_777").locator(".conv-preview")).to_have_text(f"{bob.username}: hi from bob")

    page.locator("#members").click()
    dialog = page.locator("#members-dialog")
    expect(dialog.locator("#member-list li")).to_have_count(2)
    expect(dialog.locator("#member-list li").filter(has_text=alice.username)).to_contain_text("owner")
    dialog.locator("#add-member input[name=username]").fill(carol.username)
    dialog.get_by_role("button", name="Add", exact=True).click()
    expect(dialog.locator("#member-list li")).to_have_count(3)
    assert ("POST", "/api/groups/777/members", {"user_ids": [carol.user_id]}) in api.requests
    expect(page.locator("#conv-sub")).to_have_text("3 members")
    shot(page, "group-members")
    dialog.get_by_role("button", name="Close").click()
    shot(page, "group-conversation")
    assert page.locator("#app b").count() == 0
    assert page.errors.errors == [] and page.errors.dialogs == []
