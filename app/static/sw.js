// The NetherLink service worker (served at /sw.js): Web Push for the chat page (docs/push.md §4.4, §8.2).
// The browser decrypts each push (aes128gcm) before this sees it; `kind` says what it is.
"use strict";

self.addEventListener("install", () => self.skipWaiting());
self.addEventListener("activate", (event) => event.waitUntil(self.clients.claim()));

self.addEventListener("push", (event) => {
  let data = {};
  try {
    data = event.data ? event.data.json() : {};
  } catch {
    data = {};
  }
  event.waitUntil(data.kind === "badge_sync" ? syncBadge(data) : showMessage(data));
});

// A message for a user with no open tab: the sender (or group) and a preview, one per conversation.
function showMessage(data) {
  const title = data.title || "NetherLink";
  return self.registration.showNotification(title, {
    body: data.body || "New message",
    tag: data.tag || data.conversation_id || "netherlink",  // a newer one replaces the conversation's last
    renotify: true,
    data: { conversation_id: data.conversation_id || null, msg_id: data.msg_id || null },
  });
}

// Read on another device, or recalled: remove those notifications and set the app badge.
async function syncBadge(data) {
  for (const item of data.withdraw || []) {
    const shown = await self.registration.getNotifications({ tag: item.conversation_id });
    for (const notification of shown) {
      if (!item.msg_id || !notification.data || notification.data.msg_id === item.msg_id) notification.close();
    }
  }
  if ("setAppBadge" in self.navigator) {
    await (data.badge ? self.navigator.setAppBadge(data.badge) : self.navigator.clearAppBadge()).catch(() => {});
  }
}

// A tap opens the chat (or focuses an open tab) on that conversation.
self.addEventListener("notificationclick", (event) => {
  event.notification.close();
  const conversation = event.notification.data && event.notification.data.conversation_id;
  const url = new URL("/", self.location.origin);
  if (conversation) url.hash = `c=${encodeURIComponent(conversation)}`;
  event.waitUntil((async () => {
    const tabs = await self.clients.matchAll({ type: "window", includeUncontrolled: true });
    const tab = tabs.find((c) => new URL(c.url).origin === self.location.origin);
    if (tab) {
      await tab.focus();
      return;
    }
    await self.clients.openWindow(url.href);
  })());
});
