"""Web Push in the chat page: the page registers its service worker, subscribes with the server's
VAPID key on a click and sends the subscription; the server's push (encrypted, VAPID-signed) reaches
the local push service, and the worker shows it as a notification.

Headless Chromium has no push service of its own: `pushManager.subscribe` fails without the
vendor's (Google's) servers. So the test stands in for that one step: `PushManager.subscribe` returns
a subscription the test made at the local push service fake (real P-256 keys and auth secret, kept
by the fake), and records the options the page passed. Everything else is the browser's and the
server's own: the service worker registration, the permission, the REST calls, the server's
encrypted push to the fake (which decrypts it with the subscription's keys), and the worker showing
what the fake decrypted, delivered into it with the DevTools protocol's
`ServiceWorker.deliverPushMessage`.
"""
import json

from playwright.sync_api import expect
from sqlalchemy import select

from models import Device, PushLog
from tests.browser.conftest import log_in
from tests.harness import wait_until

FAKE_SUBSCRIBE = """
(() => {
  const subscription = %s;
  PushManager.prototype.getSubscription = async function () { return window.__nlSubscribed || null; };
  PushManager.prototype.subscribe = async function (options) {
    const key = new Uint8Array(options.applicationServerKey);
    window.__nlSubscribeOptions = {
      userVisibleOnly: options.userVisibleOnly,
      applicationServerKey: btoa(String.fromCharCode(...key)).replace(/\\+/g, "-").replace(/\\//g, "_").replace(/=+$/, ""),
    };
    window.__nlSubscribed = {endpoint: subscription.endpoint, toJSON: () => subscription,
                             unsubscribe: async () => true};
    return window.__nlSubscribed;
  };
})();
"""


def test_the_page_subscribes_and_its_worker_shows_the_pushed_message(cluster, make_user, connect, open_page,
                                                                   storage, shot):
    fake = cluster.fakes.webpush
    alice, bob = make_user(), make_user()
    sub = fake.new_subscription()
    base = cluster.gw1.http

    def before(page):
        page.context.grant_permissions(["notifications"], origin=base)
        page.context.add_init_script(FAKE_SUBSCRIBE % json.dumps(sub.json()))

    page = open_page(base, before=before)
    log_in(page, bob.username)
    worker_url = page.evaluate("navigator.serviceWorker.ready.then(r => r.active.scriptURL)")
    assert worker_url == f"{base}/sw.js"

    button = page.locator("#enable-push")
    expect(button).to_be_visible()
    button.click()
    expect(button).to_be_hidden()
    options = page.evaluate("window.__nlSubscribeOptions")
    assert options == {"userVisibleOnly": True, "applicationServerKey": fake.vapid_public_key}
    with storage.sessions() as session:
        device = session.scalar(select(Device).where(Device.user_id == int(bob.user_id)))
    assert device.platform == "webpush" and device.subscription["endpoint"] == sub.endpoint
    shot(page, "1-subscribed")

    # Bob closes the chat (his socket goes; the worker stays): Alice's message is pushed.
    page.goto(f"{base}/healthz")
    wait_until(lambda: not storage.redis.exists(f"online:user:{bob.user_id}"), timeout=15, what="bob offline")
    ack = connect(alice).send_message(bob.user_id, "see you at 8?")
    wait_until(lambda: fake.deliveries_to(sub), timeout=15, what="the push at the push service")
    [push] = fake.deliveries_to(sub)
    assert push.payload["body"] == "see you at 8?" and push.payload["title"] == alice.username

    def push_status():  # written by the worker once the push service answered, a moment after it got the push
        with storage.sessions() as session:
            return session.scalar(select(PushLog.push_status).where(PushLog.user_id == int(bob.user_id)))

    wait_until(lambda: push_status() == "success", timeout=10, what="the push logged as a success")

    # What the push service decrypted goes into the worker, as the browser would hand it over.
    cdp = page.context.new_cdp_session(page)
    registrations = []
    cdp.on("ServiceWorker.workerRegistrationUpdated", lambda e: registrations.extend(e["registrations"]))
    cdp.send("ServiceWorker.enable")

    def ours():
        page.wait_for_timeout(50)  # Playwright hands over CDP events only while it runs a call
        return [r for r in registrations if r["scopeURL"] == f"{base}/" and not r["isDeleted"]]

    registration = wait_until(ours, what="the worker's registration")[0]
    cdp.send("ServiceWorker.deliverPushMessage", {"origin": base, "registrationId": registration["registrationId"],
                                                  "data": json.dumps(push.payload)})
    shown = wait_until(lambda: page.evaluate(
        "navigator.serviceWorker.getRegistration('/').then(r => r.getNotifications())"
        ".then(ns => ns.map(n => ({title: n.title, body: n.body, tag: n.tag})))"), what="the notification")
    assert shown == [{"title": alice.username, "body": "see you at 8?", "tag": ack["conversation_id"]}]

    # A badge sync (a read on another device) closes it.
    withdraw = {"kind": "badge_sync", "badge": 0,
                "withdraw": [{"conversation_id": ack["conversation_id"], "msg_id": ack["msg_id"]}]}
    cdp.send("ServiceWorker.deliverPushMessage", {"origin": base, "registrationId": registration["registrationId"],
                                                  "data": json.dumps(withdraw)})
    wait_until(lambda: page.evaluate("navigator.serviceWorker.getRegistration('/').then(r => r.getNotifications())"
                                     ".then(ns => ns.length)") == 0, what="the notification withdrawn")
