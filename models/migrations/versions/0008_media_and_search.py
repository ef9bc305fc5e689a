"""message search index (app.chat.search): message_search with a FULLTEXT index on MySQL,
an FTS5 mirror kept by triggers on SQLite

Revision ID: 0008
Revises: 0005
"""
from alembic import op
import sqlalchemy as sa


revision = '0008'
down_revision = '0005'
branch_labels = None
depends_on = None

# SQLite: an external-content FTS5 table over message_search; the triggers keep it in step
# with every insert and delete the application makes (its rowid is the message id).
SQLITE_FTS = [
    "CREATE VIRTUAL TABLE message_search_fts USING fts5(terms, content='message_search', "
    "content_rowid='message_id', tokenize='ascii')",
    "CREATE TRIGGER message_search_ai AFTER INSERT ON message_search BEGIN "
    "INSERT INTO message_search_fts(rowid, terms) VALUES (new.message_id, new.terms); END",
    "CREATE TRIGGER message_search_ad AFTER DELETE ON message_search BEGIN "
    "INSERT INTO message_search_fts(message_search_fts, rowid, terms) VALUES ('delete', old.message_id, old.terms); "
    "END",
    "CREATE TRIGGER message_search_au AFTER UPDATE ON message_search BEGIN "
    "INSERT INTO message_search_fts(message_search_fts, rowid, terms) VALUES ('delete', old.message_id, old.terms); "
    "INSERT INTO message_search_fts(rowid, terms) VALUES (new.message_id, new.terms); END",
]


def upgrade() -> None:
    op.create_table(
        'message_search',
        sa.Column('message_id', sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column('terms', sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint('message_id', name=op.f('pk_message_search')),
        mysql_engine='InnoDB', mysql_charset='utf8mb4', mysql_collate='utf8mb4_unicode_ci',
    )
    if op.get_bind().dialect.name == 'mysql':
        op.create_index('ft_message_search_terms', 'message_search', ['terms'], mysql_prefix='FULLTEXT')
    else:
        for statement in SQLITE_FTS:
            op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name != 'mysql':
        for name in ('message_search_au', 'message_search_ad', 'message_search_ai'):
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
        op.execute("DROP TABLE IF EXISTS message_search_fts")
    op.drop_table('message_search')
