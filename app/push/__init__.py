"""Push notifications: planning (who gets what, after settings), attempts against the
providers (APNs, FCM, email behind `providers.PushProvider`), user settings and
devices, and the admin's view of push_log. No Flask, Celery, `ws` or `tasks` imports."""
