"""The admin dashboard in a browser: log in, find a failed push, press its Retry button."""
import secrets

from playwright.sync_api import expect
from sqlalchemy import select, update

from models import Device, PushLog, User
from tests.harness import wait_until


def test_the_retry_button_sends_a_failed_push_again(cluster, make_user, connect, storage, open_page, shot):
    alice, bob, admin = make_user(), make_user(), make_user()
    with storage.session() as session:
        session.execute(update(User).where(User.id == int(admin.user_id)).values(is_admin=True))
        token = secrets.token_hex(32)
        session.add(Device(user_id=int(bob.user_id), platform="ios", token=token))
    cluster.fakes.apns.fail_token(token, 400, "BadExpirationDate")
    connect(alice).send_message(bob.user_id, "push me")  # Bob is offline: a push, which APNs refuses

    def bob_pushes():
        with storage.sessions() as session:
            return session.scalars(select(PushLog).where(PushLog.user_id == int(bob.user_id))).all()

    wait_until(lambda: [p.push_status for p in bob_pushes()] == ["failed"], timeout=20, what="a failed push")
    push_id = bob_pushes()[0].id

    page = open_page(cluster.gw1.http)
    page.goto(f"{cluster.gw1.http}/admin/")
    expect(page).to_have_url(f"{cluster.gw1.http}/admin/login?next=/admin/?")
    page.locator("input[name=username]").fill(admin.username)
    page.locator("input[name=password]").fill("correct-horse")
    page.get_by_role("button", name="Log in").click()
    page.get_by_role("textbox", name="User id").fill(bob.user_id)
    page.get_by_role("button", name="Filter", exact=True).click()
    row = page.locator("tbody tr").filter(has=page.locator("td", has_text=str(push_id)))
    expect(row.locator("td.status-failed")).to_have_text("failed")
    expect(row).to_contain_text("BadExpirationDate")
    shot(page, "1-failed-push")

    cluster.fakes.apns.reset()  # APNs accepts the token now
    row.get_by_role("button", name="Retry", exact=True).click()
    expect(page.locator(".notice")).to_have_text(f"Push {push_id} queued for another attempt.")
    wait_until(lambda: [p.push_status for p in bob_pushes()] == ["success"], timeout=20, what="the retried push")
    assert any(n.token == token for n in cluster.fakes.apns.notifications)
    page.get_by_role("combobox", name="Status").select_option("success")
    page.get_by_role("button", name="Filter", exact=True).click()
    expect(page.locator("tbody tr").filter(has=page.locator("td", has_text=str(push_id)))
           .locator("td.status-success")).to_have_text("success")
    shot(page, "2-after-retry")
    assert page.errors.errors == []
