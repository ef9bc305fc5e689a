"""The chat domain: sends (intake → persist → dispatch), sync streams, unread, receipts,
recall, conversations, groups, presence and live delivery. Plain functions over
Storage: no Flask, Celery, `ws` or `tasks` imports."""
